"""Screenshots of the playground for the README (docs/images/playground-{light,dark}.png): the default
model served for real, a few streaming clients keeping slots busy, one chat answered in the page.

    python -m bench.playground_screenshots --out docs/images

Needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and selenium
(the test extra). `chromium_driver` is also what tests/test_playground_browser.py drives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

# Headless and off the network (chromium would try Google's hosts at every start), and able to run as root.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_paths() -> tuple[str | None, str | None]:
    return shutil.which("chromium"), shutil.which("chromedriver")


def chromium_driver(user_data_dir: Path, width: int = 1400, height: int = 1000) -> Any:
    """Debian's chromium through its own chromedriver (same package version): nothing is downloaded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = chromium_paths()
    if chromium is None or chromedriver is None:
        raise RuntimeError("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}", f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)


def background_client(url: str, model: str, stop: threading.Event, seed: int) -> None:
    """A streaming client that keeps one slot busy until told to stop."""
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 400, "stream": True, "seed": seed, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            with client.stream("POST", "/v1/completions", json=body) as response:
                for _ in response.iter_lines():
                    if stop.is_set():
                        return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--clients", type=int, default=3, help="background streams keeping slots busy")
    args = parser.parse_args(argv)
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", str(args.port), "--max-batch-size", "8", "--log-level", "warning"],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not get ready")
            time.sleep(0.5)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        clients = [threading.Thread(target=background_client, args=(url, model, stop, i)) for i in range(args.clients)]
        for client in clients:
            client.start()
        with tempfile.TemporaryDirectory() as profile:
            driver = chromium_driver(Path(profile))
            try:
                driver.get(url + "/")
                box = driver.find_element(By.ID, "message")
                time.sleep(2)
                box.send_keys("What is the capital of France? Answer in one sentence.")
                box.send_keys(Keys.ENTER)
                time.sleep(1)
                while not driver.find_element(By.ID, "send-button").is_enabled():
                    time.sleep(0.2)
                time.sleep(1.5)  # a few more panel updates with the background clients running
                tokens = driver.find_elements(By.CSS_SELECTOR, ".message.assistant .tok")
                if len(tokens) > 4:
                    ActionChains(driver).move_to_element(tokens[4]).perform()
                args.out.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.out / "playground-light.png"))
                driver.find_element(By.ID, "theme-button").click()
                if len(tokens) > 4:
                    ActionChains(driver).move_to_element(tokens[4]).perform()
                time.sleep(0.6)
                driver.save_screenshot(str(args.out / "playground-dark.png"))
            finally:
                driver.quit()
        print(f"wrote {args.out}/playground-light.png and playground-dark.png")
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
