"""The playground in a real browser (issue 15): Debian's chromium, headless, driven by Selenium through
Debian's chromedriver (the same package version, so nothing is downloaded at test time).

One server with an API key on the tiny model, slowed so that tokens arrive one by one; one browser.
The page asks for the key, a chat message streams in incrementally while a slot turns busy and free
again, model-facing text stays text, a long generation is stopped and its slot freed, and the page
works at phone width. Screenshots (light and dark) go to $LLAMASERVE_SCREENSHOTS (docs/images for
the README) or to the test's temporary folder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from bench.playground_screenshots import chromium_driver, chromium_paths
from tests.support.api import settings, slowed, tiny_loaded, uvicorn_thread

API_KEY = "sk-browser"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Any]]:
    with uvicorn_thread(settings(api_key=API_KEY), slowed(tiny_loaded(), delay=0.04)) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if None in chromium_paths():
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them: missing there is a broken set-up, not a reason to skip
        pytest.skip(message)
    driver = chromium_driver(tmp_path_factory.mktemp("chromium"))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], timeout: float = 10, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


def open_page(driver: Any, url: str) -> None:
    """Load the page and get it connected, giving the key when it asks (a new tab has none)."""
    driver.get(url + "/")
    asked = "return document.getElementById('key-dialog').open"
    wait_for(lambda: driver.execute_script(asked) or "tiny" in driver.find_element(By.ID, "model-name").text, what="the page")
    if driver.execute_script(asked):
        driver.find_element(By.ID, "key-input").send_keys(API_KEY)
        driver.find_element(By.ID, "key-save").click()
    wait_for(lambda: "tiny" in driver.find_element(By.ID, "model-name").text, what="the model name")


def slot_states(driver: Any) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#slots .slot')].map(s => s.dataset.state)")


def token_count(driver: Any) -> int:
    return driver.execute_script(
        "const m = document.querySelectorAll('.message.assistant');"
        "return m.length ? m[m.length - 1].querySelectorAll('.tok').length : 0"
    )


def set_field(driver: Any, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def screenshots_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("LLAMASERVE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_chat_streams_stops_and_the_engine_panel_follows(browser: Any, server: tuple[str, Any], tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    url, state = server
    driver = browser
    driver.get(url + "/")

    # The server wants a key: the page asks, keeps it in sessionStorage only, then connects.
    wait_for(lambda: driver.execute_script("return document.getElementById('key-dialog').open"), what="the key dialog")
    driver.find_element(By.ID, "key-input").send_keys(API_KEY)
    driver.find_element(By.ID, "key-save").click()
    wait_for(lambda: "tiny" in driver.find_element(By.ID, "model-name").text, what="the model name")
    assert driver.execute_script("return sessionStorage.getItem('llamaserve.apiKey')") == API_KEY
    assert driver.execute_script("return localStorage.getItem('llamaserve.apiKey')") is None
    wait_for(lambda: slot_states(driver) == ["free"] * 4, what="four free slots")

    # A chat message, sent with Enter, streams in token by token while a slot is busy.
    set_field(driver, "max-tokens", "60")
    driver.find_element(By.ID, "ignore-eos").click()
    hostile = "<img src=x onerror=pwned=1>"  # the tiny model's context is 128 bytes: keep prompts short
    message = driver.find_element(By.ID, "message")
    message.send_keys(hostile)
    message.send_keys(Keys.ENTER)
    counts, busy_seen = [], False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counts.append(token_count(driver))
        busy_seen |= any(s in ("prefilling", "decoding") for s in slot_states(driver))
        if not driver.find_element(By.ID, "stop-button").is_enabled() and counts[-1] > 0:
            break
        time.sleep(0.05)
    counts.append(token_count(driver))  # after the answer ended
    assert counts[-1] == 60, (counts[-5:], driver.find_element(By.ID, "transcript").text)
    assert len({c for c in counts if 0 < c < 60}) >= 3, "tokens did not arrive incrementally"
    assert busy_seen, "no slot was seen busy while the answer streamed"
    wait_for(lambda: slot_states(driver) == ["free"] * 4, what="the slot to be free again")
    stats = driver.find_element(By.ID, "response-stats").text
    assert "TTFT" in stats and "tok/s" in stats and "60 tokens" in stats and "finish: length" in stats, stats
    # Text typed (and generated) is text: nothing ran, nothing became an element.
    user = driver.find_elements(By.CSS_SELECTOR, ".message.user .body")[-1]
    assert user.text == hostile
    assert driver.execute_script("return window.pwned === undefined && !document.querySelector('#transcript img')")
    assert driver.execute_script("return document.activeElement.id") == "message"  # focus back for the next message

    # Hover a token: its probability and the top alternatives. The widest token: a random model writes
    # control bytes too, which render with no width and cannot be hovered.
    token = driver.execute_script(
        "return [...document.querySelectorAll('.message.assistant .tok')]"
        ".sort((a, b) => b.getBoundingClientRect().width - a.getBoundingClientRect().width)[0]"
    )
    webdriver.ActionChains(driver).move_to_element(token).perform()
    tip = driver.find_element(By.ID, "token-tip")
    wait_for(tip.is_displayed, what="the token tooltip")
    assert "p=" in tip.text and len(tip.text.splitlines()) >= 2, tip.text
    webdriver.ActionChains(driver).move_to_element(driver.find_element(By.ID, "settings-title")).perform()
    wait_for(lambda: not tip.is_displayed(), what="the tooltip to go")
    driver.execute_script("arguments[0].focus()", token)  # the keyboard's way to the same tooltip
    wait_for(tip.is_displayed, what="the token tooltip on focus")
    driver.execute_script("arguments[0].blur()", token)

    # The engine panel has counted it.
    wait_for(lambda: driver.find_element(By.ID, "fig-ttft").text.endswith("ms"), what="the TTFT figure")
    assert driver.find_elements(By.CSS_SELECTOR, "#ttft-chart svg rect") and driver.find_elements(
        By.CSS_SELECTOR, "#toks-chart svg"
    )

    folder = screenshots_dir(tmp_path)
    driver.save_screenshot(str(folder / "playground-light.png"))
    driver.find_element(By.ID, "theme-button").click()
    assert driver.execute_script("return document.documentElement.dataset.theme") == "dark"
    driver.save_screenshot(str(folder / "playground-dark.png"))
    light, dark = (ImageStat.Stat(Image.open(folder / f"playground-{t}.png").convert("L")).mean[0] for t in ("light", "dark"))
    assert dark < light - 50, (light, dark)
    driver.find_element(By.ID, "theme-button").click()

    # Stop a long generation: the request is cancelled on the server and its slot comes back.
    driver.find_element(By.ID, "clear-button").click()
    set_field(driver, "max-tokens", "90")
    message.send_keys("Count")
    driver.find_element(By.ID, "send-button").click()
    wait_for(lambda: token_count(driver) >= 5, what="the long answer to start")
    wait_for(lambda: "decoding" in slot_states(driver), what="a decoding slot")
    driver.find_element(By.ID, "stop-button").click()
    stopped_at = time.monotonic()
    wait_for(lambda: state.engine.stats().running == 0, timeout=5, what="the server to free the slot")
    wait_for(lambda: slot_states(driver) == ["free"] * 4, timeout=5, what="the panel to show the slot free")
    assert time.monotonic() - stopped_at < 5
    assert token_count(driver) < 90 and "finish: stopped" in driver.find_element(By.ID, "response-stats").text


def test_the_page_fits_a_phone(browser: Any, server: tuple[str, Any]) -> None:
    url, _ = server
    driver = browser
    driver.set_window_size(390, 844)
    try:
        driver.get(url + "/")
        wait_for(lambda: driver.find_element(By.ID, "message").is_displayed(), what="the page")
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        tops = driver.execute_script(
            "return ['conversation-panel', 'settings-panel', 'engine-panel']"
            ".map(id => document.getElementById(id).getBoundingClientRect().top)"
        )
        assert tops == sorted(tops) and len(set(tops)) == 3, tops  # one column, conversation first
    finally:
        driver.set_window_size(1400, 1000)


def test_completion_mode_streams_coloured_tokens_with_their_alternatives(browser: Any, server: tuple[str, Any]) -> None:
    url, _ = server
    driver = browser
    open_page(driver, url)
    driver.find_element(By.ID, "mode-completion").click()
    set_field(driver, "max-tokens", "20")
    driver.find_element(By.ID, "ignore-eos").click()
    message = driver.find_element(By.ID, "message")
    message.send_keys("Once upon")
    message.send_keys(Keys.ENTER)
    wait_for(lambda: driver.find_element(By.ID, "send-button").is_enabled() and token_count(driver) > 0, what="the answer")
    assert token_count(driver) == 20
    assert "finish: length" in driver.find_element(By.ID, "response-stats").text
    top = driver.execute_script("return JSON.parse(document.querySelector('.message.assistant .tok').dataset.top)")
    # logprobs=5 on /v1/completions: the 5 most likely plus the sampled token when it is not among them (as OpenAI).
    assert 1 <= len(top) <= 6 and all(isinstance(t, str) and lp <= 0 for t, lp in top), top
