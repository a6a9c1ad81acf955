// llamaserve playground: chat and completions over the OpenAI API with streaming, and a live view of
// the engine from GET /engine/snapshot. No framework and no build step.
// Model text is only ever inserted with textContent (never as HTML), and the page's Content Security
// Policy allows no inline script, so nothing a model writes can run here.
"use strict";

const KEY_STORAGE = "llamaserve.apiKey"; // sessionStorage: the key lives as long as this tab
const THEME_STORAGE = "llamaserve.theme";
const POLL_MS = 500; // engine snapshots while the page is visible
const TOP_ALTERNATIVES = 5;

const $ = (id) => document.getElementById(id);
const state = {
  model: null,
  history: [], // chat messages sent so far (system prompt excluded)
  controller: null, // AbortController of the response in flight
  polling: null,
};

// ---------------------------------------------------------------- HTTP

class HTTPError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    askForKey("The server answered 401: it needs an API key.");
    throw new HTTPError(401, "an API key is needed");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) {
      // not JSON: keep the status line
    }
    throw new HTTPError(response.status, message);
  }
  return response;
}

// Server-sent events from a fetch body: yields each `data:` payload (parsed JSON, or the string "[DONE]").
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue; // a keep-alive comment
      yield data === "[DONE]" ? data : JSON.parse(data);
    }
  }
}

// ---------------------------------------------------------------- API key and theme

function askForKey(reason) {
  const dialog = $("key-dialog");
  if (dialog.open) return;
  dialog.querySelector("p").textContent = `${reason} It stays in this tab only (sessionStorage).`;
  $("key-input").value = sessionStorage.getItem(KEY_STORAGE) || "";
  dialog.showModal();
  $("key-input").focus();
}

function setupKeyDialog() {
  const dialog = $("key-dialog");
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const save = event.submitter && event.submitter.value === "save";
    dialog.close();
    if (!save) return;
    const key = $("key-input").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    connect();
  });
  $("key-button").addEventListener("click", () => askForKey("Set the key this server expects."));
}

function applyTheme(theme) {
  const dark = theme === "dark" || (theme == null && matchMedia("(prefers-color-scheme: dark)").matches);
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  const button = $("theme-button");
  button.setAttribute("aria-pressed", String(dark));
  button.textContent = dark ? "Light theme" : "Dark theme";
}

function setupTheme() {
  applyTheme(localStorage.getItem(THEME_STORAGE));
  $("theme-button").addEventListener("click", () => {
    const theme = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    localStorage.setItem(THEME_STORAGE, theme);
    applyTheme(theme);
  });
}

// ---------------------------------------------------------------- the conversation

function mode() {
  return $("mode-completion").checked ? "completion" : "chat";
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = `message ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text;
  box.append(label, body);
  $("transcript").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function samplingFields() {
  const fields = {
    model: state.model,
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberOrNull("temperature") ?? 1,
    top_p: numberOrNull("top-p") ?? 1,
    max_tokens: numberOrNull("max-tokens") ?? 256,
  };
  const topK = numberOrNull("top-k");
  if (topK) fields.top_k = topK;
  const seed = numberOrNull("seed");
  if (seed !== null) fields.seed = seed;
  const stop = $("stop").value.split("\n").filter((s) => s.length > 0);
  if (stop.length) fields.stop = stop.slice(0, 4);
  if ($("json-mode").checked) fields.response_format = { type: "json_object" };
  if ($("ignore-eos").checked) fields.ignore_eos = true;
  return fields;
}

// A probability as a background: red for unlikely tokens through to green for near-certain ones.
function tokenColour(logprob) {
  const p = Math.exp(logprob);
  const hue = Math.round(120 * p);
  const dark = document.documentElement.dataset.theme === "dark";
  return dark ? `hsla(${hue}, 70%, 40%, 0.55)` : `hsla(${hue}, 80%, 65%, 0.45)`;
}

function showTip(span) {
  const tip = $("token-tip");
  const lines = [`${JSON.stringify(span.dataset.token)}  p=${Number(span.dataset.p).toFixed(4)}`];
  for (const [token, logprob] of JSON.parse(span.dataset.top || "[]")) {
    lines.push(`${Math.exp(logprob).toFixed(4)}  ${JSON.stringify(token)}`);
  }
  tip.textContent = lines.join("\n");
  tip.hidden = false;
  const rect = span.getBoundingClientRect();
  const top = rect.bottom + 6 + tip.offsetHeight > innerHeight ? rect.top - tip.offsetHeight - 6 : rect.bottom + 6;
  tip.style.setProperty("left", `${Math.max(4, Math.min(rect.left, innerWidth - tip.offsetWidth - 4))}px`);
  tip.style.setProperty("top", `${Math.max(4, top)}px`);
}

function hideTip() {
  $("token-tip").hidden = true;
}

// One generated token as a coloured, focusable span whose tooltip lists the top alternatives.
function tokenSpan(text, logprob, top) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  span.tabIndex = 0;
  span.dataset.token = text;
  span.dataset.p = String(Math.exp(logprob));
  span.dataset.top = JSON.stringify(top);
  span.style.setProperty("background-color", tokenColour(logprob));
  span.setAttribute("aria-label", `${text}, probability ${Math.exp(logprob).toFixed(3)}`);
  return span;
}

// Tokens of one streamed chunk: [text, logprob, [[alternative, logprob], ...]] from either endpoint's shape.
function chunkTokens(choice) {
  const logprobs = choice.logprobs;
  if (!logprobs) return null;
  if (Array.isArray(logprobs.content)) {
    return logprobs.content.map((t) => [t.token, t.logprob, (t.top_logprobs || []).map((a) => [a.token, a.logprob])]);
  }
  if (Array.isArray(logprobs.tokens)) {
    return logprobs.tokens.map((token, i) => [
      token,
      logprobs.token_logprobs[i],
      Object.entries((logprobs.top_logprobs || [])[i] || {}),
    ]);
  }
  return null;
}

// A display form of a token: byte fallbacks (`bytes:\xNN`) become the replacement character.
function displayToken(token) {
  return token.startsWith("bytes:") ? "\uFFFD" : token;
}

function setBusy(busy) {
  $("send-button").disabled = busy;
  $("stop-button").disabled = !busy;
  $("mode-chat").disabled = busy;
  $("mode-completion").disabled = busy;
}

async function send() {
  const text = $("message").value;
  if (!text.trim() || state.controller) return;
  if (!state.model) {
    await connect();
    if (!state.model) return;
  }
  const chat = mode() === "chat";
  const body = samplingFields();
  const coloured = $("show-logprobs").checked;
  if (chat) {
    const system = $("system-prompt").value.trim();
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history, { role: "user", content: text }];
    body.messages = messages;
    if (coloured) Object.assign(body, { logprobs: true, top_logprobs: TOP_ALTERNATIVES });
  } else {
    body.prompt = text;
    if (coloured) body.logprobs = TOP_ALTERNATIVES;
  }
  addMessage("user", text);
  $("message").value = "";
  const reply = addMessage("assistant", "");
  reply.setAttribute("aria-busy", "true");
  const out = reply.querySelector(".body");
  const stats = document.createElement("span");
  stats.className = "stats";
  reply.append(stats);

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let first = null;
  let received = 0;
  let usage = null;
  let finish = null;
  let answer = "";
  try {
    const response = await api(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    for await (const event of sseEvents(response)) {
      if (event === "[DONE]") break;
      if (event.error) throw new HTTPError(event.error.code || 500, event.error.message);
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const piece = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        const tokens = chunkTokens(choice);
        if (piece || (tokens && tokens.length)) {
          if (first === null) first = performance.now();
          received += tokens ? tokens.length : 1;
        }
        answer += piece;
        if (tokens && coloured) {
          for (const [token, logprob, top] of tokens) out.append(tokenSpan(displayToken(token), logprob, top));
        } else if (piece) {
          out.append(document.createTextNode(piece));
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      reply.scrollIntoView({ block: "end" });
    }
  } catch (error) {
    if (error.name === "AbortError") {
      finish = "stopped";
    } else {
      reply.classList.add("error");
      stats.textContent = `error: ${error.message}`;
    }
  } finally {
    state.controller = null;
    setBusy(false);
    reply.removeAttribute("aria-busy");
  }
  if (chat && answer) state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
  if (!reply.classList.contains("error")) {
    const ended = performance.now();
    const tokens = usage ? usage.completion_tokens : received;
    const parts = [];
    if (first !== null) parts.push(`TTFT ${Math.round(first - started)} ms`);
    if (first !== null && tokens > 1 && ended > first) parts.push(`${((tokens - 1) / ((ended - first) / 1000)).toFixed(1)} tok/s`);
    parts.push(`${tokens} tokens`);
    if (finish) parts.push(`finish: ${finish}`);
    stats.textContent = parts.join(" · ");
    $("response-stats").textContent = parts.join(" · ");
  }
  $("message").focus();
}

function setupComposer() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop-button").addEventListener("click", () => {
    if (state.controller) state.controller.abort(); // the server sees the disconnect and frees the slot
  });
  $("clear-button").addEventListener("click", () => {
    state.history = [];
    $("transcript").replaceChildren();
    $("response-stats").textContent = "";
  });
  for (const radio of [$("mode-chat"), $("mode-completion")]) {
    radio.addEventListener("change", () => {
      state.history = [];
      $("transcript").replaceChildren();
    });
  }
  const transcript = $("transcript");
  for (const [type, handler] of [
    ["mouseover", showTip],
    ["focusin", showTip],
  ]) {
    transcript.addEventListener(type, (event) => {
      if (event.target.classList && event.target.classList.contains("tok")) handler(event.target);
    });
  }
  transcript.addEventListener("mouseout", hideTip);
  transcript.addEventListener("focusout", hideTip);
}

// ---------------------------------------------------------------- the engine panel

const SVG = "http://www.w3.org/2000/svg";

function svgElement(name, attributes) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  return element;
}

// A filled line of `values` (nulls as gaps at zero) over the last minute, with its maximum labelled.
function drawSeries(container, values, unit) {
  const width = 300;
  const height = 64;
  const top = Math.max(1, ...values.map((v) => v || 0));
  const x = (i) => (i / Math.max(values.length - 1, 1)) * width;
  const y = (v) => height - 4 - ((v || 0) / top) * (height - 14);
  const points = values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none" });
  svg.append(
    svgElement("polygon", { class: "area", points: `0,${height - 4} ${points} ${width},${height - 4}` }),
    svgElement("polyline", { class: "line", points }),
  );
  const label = svgElement("text", { x: 2, y: 9 });
  label.textContent = `max ${Math.round(top * 10) / 10} ${unit}`;
  svg.append(label);
  container.replaceChildren(svg);
}

function durationLabel(seconds) {
  return seconds < 1 ? `${Math.round(seconds * 1000)}ms` : `${seconds}s`;
}

function drawHistogram(container, ttft) {
  const width = 300;
  const height = 64;
  const counts = ttft.counts;
  const top = Math.max(1, ...counts);
  const barWidth = width / counts.length;
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none" });
  counts.forEach((count, i) => {
    const h = (count / top) * (height - 22);
    svg.append(svgElement("rect", { class: "bar-rect", x: i * barWidth + 2, y: height - 12 - h, width: barWidth - 4, height: h }));
    const label = svgElement("text", { x: i * barWidth + 2, y: height - 2 });
    label.textContent = i < ttft.bounds_s.length ? durationLabel(ttft.bounds_s[i]) : "more";
    svg.append(label);
    if (count) {
      const n = svgElement("text", { x: i * barWidth + 2, y: height - 14 - h });
      n.textContent = String(count);
      svg.append(n);
    }
  });
  container.replaceChildren(svg);
}

function slotItem(slot, maxSeqLen) {
  const item = document.createElement("li");
  item.className = "slot";
  item.dataset.state = slot.state;
  item.dataset.slot = String(slot.slot);
  const request = slot.request;
  const used = request ? request.tokens_in_cache : slot.cached_tokens;
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = `#${slot.slot} ${slot.state}`;
  const meter = document.createElement("div");
  meter.className = "meter";
  const fill = document.createElement("span");
  fill.style.setProperty("width", `${Math.min(100, (100 * used) / Math.max(maxSeqLen, 1)).toFixed(1)}%`);
  meter.append(fill);
  const detail = document.createElement("div");
  detail.className = "detail";
  if (request) {
    detail.textContent = `${used}/${maxSeqLen} tok · ${request.generated_tokens}/${request.max_tokens} out`;
    detail.title = `${request.id}: prompt ${request.prompt_tokens} (cached ${request.cached_prompt_tokens})`;
  } else {
    detail.textContent = used ? `keeps ${used} tok prefix` : "empty";
  }
  item.setAttribute("aria-label", `slot ${slot.slot}: ${slot.state}, ${used} of ${maxSeqLen} tokens`);
  item.append(name, meter, detail);
  return item;
}

function renderSnapshot(snapshot) {
  const minute = snapshot.last_minute;
  $("fig-running").textContent = `${snapshot.running}/${snapshot.max_batch_size}`;
  $("fig-waiting").textContent = String(snapshot.waiting);
  // The last ten whole seconds (the newest bucket is the second still running): what is happening now.
  const recent = minute.per_second.slice(-11, -1);
  $("fig-toks").textContent = (recent.reduce((sum, s) => sum + s.generated_tok_s, 0) / recent.length).toFixed(1);
  $("fig-step").textContent = minute.step_ms_mean == null ? "–" : `${minute.step_ms_mean.toFixed(1)} ms`;
  $("fig-ttft").textContent = minute.ttft.p50_s == null ? "–" : `${Math.round(1000 * minute.ttft.p50_s)} ms`;
  $("slots").replaceChildren(...snapshot.slots.map((slot) => slotItem(slot, snapshot.max_seq_len)));
  drawSeries($("toks-chart"), minute.per_second.map((s) => s.generated_tok_s), "tok/s");
  drawSeries($("step-chart"), minute.per_second.map((s) => s.step_ms), "ms");
  drawHistogram($("ttft-chart"), minute.ttft);
  $("engine-status").textContent = `${snapshot.phase} · ${snapshot.totals.generated_tokens} tokens served`;
}

async function poll() {
  if (document.visibilityState !== "visible") return;
  try {
    const response = await api("/engine/snapshot");
    renderSnapshot(await response.json());
  } catch (error) {
    $("engine-status").textContent = error.status === 401 ? "needs the API key" : `unavailable: ${error.message}`;
  }
}

function startPolling() {
  if (state.polling) return;
  poll();
  state.polling = setInterval(poll, POLL_MS);
}

// ---------------------------------------------------------------- start

async function connect() {
  try {
    const response = await api("/v1/models");
    const [card] = (await response.json()).data;
    state.model = card.id;
    $("model-name").textContent = `${card.id} · ${card.max_model_len} tokens of context`;
    startPolling();
  } catch (error) {
    $("model-name").textContent = error.status === 401 ? "needs an API key" : `not ready: ${error.message}`;
    if (error.status !== 401) setTimeout(connect, 2000); // loading or warming up
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupTheme();
  setupKeyDialog();
  setupComposer();
  connect();
});
