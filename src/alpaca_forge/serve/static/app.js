// The chat page of `alpaca-forge serve`: the model's card (GET /v1/models), then one streamed
// POST /v1/chat/completions per turn carrying the whole conversation. Model output is only ever
// put into the page as text (Text nodes, textContent), never as HTML.
"use strict";

const KEY_STORAGE = "alpaca-forge.api-key";
const LOADING_RETRY_MS = 2000;

// -- server-sent events ---------------------------------------------------------------------

// Splits a byte stream's text into SSE events, however the network cut it: a line (or a UTF-8
// character, which TextDecoder keeps whole) may arrive in several pieces. `push` returns the data
// of every event completed so far; multi-line data is joined with "\n", as the SSE spec says.
class SseParser {
  constructor() {
    this.buffer = "";
    this.data = [];
  }

  push(text) {
    this.buffer += text;
    const events = [];
    let newline;
    while ((newline = this.buffer.search(/\r\n|\r|\n/)) >= 0) {
      const width = this.buffer.startsWith("\r\n", newline) ? 2 : 1;
      if (width === 1 && this.buffer[newline] === "\r" && newline === this.buffer.length - 1) {
        break; // a lone "\r" at the end may be the first half of "\r\n"
      }
      const line = this.buffer.slice(0, newline);
      this.buffer = this.buffer.slice(newline + width);
      this.line(line, events);
    }
    return events;
  }

  // The end of the stream: an event the server never closed with a blank line still counts.
  end() {
    const events = [];
    if (this.buffer) {
      this.line(this.buffer, events);
      this.buffer = "";
    }
    this.line("", events);
    return events;
  }

  line(line, events) {
    if (line === "") {
      if (this.data.length) events.push(this.data.join("\n"));
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return; // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
  }
}

async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const parser = new SseParser();
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        finished = true;
        yield* parser.push(decoder.decode());
        yield* parser.end();
        return;
      }
      yield* parser.push(decoder.decode(value, { stream: true }));
    }
  } finally {
    // A reader left early (an error chunk, [DONE], Stop) closes the connection, so the server
    // stops generating what nobody reads.
    if (!finished) reader.cancel().catch(() => {});
  }
}

// -- the page's parts -----------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const ui = {
  modelName: $("model-name"),
  modelMeta: $("model-meta"),
  settings: $("settings"),
  settingsToggle: $("settings-toggle"),
  newChat: $("new-chat"),
  temperature: $("temperature"),
  topP: $("top-p"),
  maxTokens: $("max-tokens"),
  maxTokensHint: $("max-tokens-hint"),
  systemPrompt: $("system-prompt"),
  apiKey: $("api-key"),
  notice: $("notice"),
  scroller: $("scroller"),
  empty: $("empty"),
  messages: $("messages"),
  composer: $("composer"),
  input: $("message-input"),
  send: $("send"),
  stop: $("stop"),
};

const state = {
  model: null, // the card from /v1/models
  turns: [], // {user, assistant, keep}: what the next request sends (kept turns only)
  controller: null, // the AbortController of the answer streaming now
  loadingTimer: null,
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showNotice(parts, kind) {
  ui.notice.replaceChildren(...parts);
  ui.notice.classList.toggle("error", kind === "error");
  ui.notice.hidden = false;
}

function hideNotice() {
  ui.notice.hidden = true;
  ui.notice.replaceChildren();
}

function setSettingsOpen(open) {
  ui.settings.hidden = !open;
  ui.settingsToggle.setAttribute("aria-expanded", String(open));
}

// A button that opens the settings with the key field focused: where every 401 points.
function keyFieldButton() {
  const button = el("button", "link", "Settings → API key");
  button.type = "button";
  button.addEventListener("click", pointAtKeyField);
  return button;
}

function pointAtKeyField() {
  setSettingsOpen(true);
  ui.apiKey.setAttribute("aria-invalid", "true");
  ui.apiKey.focus();
}

function authMessage(serverMessage) {
  const refused = ui.apiKey.value.trim() !== "";
  const lead = refused
    ? `The API key was refused (${serverMessage}). Check it in `
    : "This server needs an API key. Enter it in ";
  return [
    document.createTextNode(lead),
    keyFieldButton(),
    document.createTextNode("; it is kept in this browser."),
  ];
}

// -- talking to the server ------------------------------------------------------------------

function authHeaders() {
  const key = ui.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The message of an error response ({"error": {"message"}}), or the status line.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch {
    // not JSON: fall through to the status
  }
  return `${response.status} ${response.statusText}`.trim();
}

// -> {card} or {status, message}; while the model loads (503) it retries on its own.
async function loadModel() {
  clearTimeout(state.loadingTimer);
  let response;
  try {
    response = await fetch("/v1/models", { headers: authHeaders(), cache: "no-store" });
  } catch (err) {
    const message = `The server cannot be reached (${err.message}).`;
    showNotice([document.createTextNode(message)], "error");
    ui.modelName.textContent = "Not connected";
    return { status: 0, message };
  }
  if (!response.ok) {
    const message = await errorText(response);
    if (response.status === 401) {
      showNotice(authMessage(message), "error");
      ui.modelName.textContent = "API key needed";
    } else if (response.status === 503) {
      showNotice([document.createTextNode(`Waiting for the model: ${message}`)]);
      ui.modelName.textContent = "Loading…";
      state.loadingTimer = setTimeout(loadModel, LOADING_RETRY_MS);
    } else {
      showNotice([document.createTextNode(`The server answered ${response.status}: ${message}`)], "error");
    }
    return { status: response.status, message };
  }
  const body = await response.json();
  const card = body.data && body.data[0];
  if (!card) {
    const message = "the server lists no model";
    showNotice([document.createTextNode(message)], "error");
    return { status: response.status, message };
  }
  showModel(card, response.headers.get("x-model-id"));
  hideNotice();
  ui.apiKey.removeAttribute("aria-invalid");
  return { card };
}

function showModel(card, modelId) {
  state.model = card;
  ui.modelName.textContent = card.id;
  ui.modelName.title = modelId || card.id;
  document.title = `${card.id} · alpaca-forge chat`;
  const meta = [card.fingerprint, card.prompt_format && `format: ${card.prompt_format}`];
  if (card.context_tokens) meta.push(`context ${card.context_tokens.toLocaleString()} tokens`);
  ui.modelMeta.textContent = meta.filter(Boolean).join(" · ");
  // What the server gives a request that leaves a setting out (the model's generation config,
  // else serve's --default-* flags), shown in each field the user has not changed.
  const defaults = card.defaults || {};
  const fields = [[ui.temperature, "temperature"], [ui.topP, "top_p"], [ui.maxTokens, "max_tokens"]];
  for (const [field, name] of fields) {
    if (typeof defaults[name] === "number" && field.value === field.defaultValue) {
      field.value = String(defaults[name]);
    }
  }
  if (card.max_tokens) {
    ui.maxTokens.max = String(card.max_tokens);
    if (Number(ui.maxTokens.value) > card.max_tokens) ui.maxTokens.value = String(card.max_tokens);
    ui.maxTokensHint.textContent = `the longest answer, in tokens (this server allows ${card.max_tokens})`;
  }
}

// -- one message in the list ----------------------------------------------------------------

class AssistantView {
  constructor() {
    this.item = el("li", "msg assistant");
    this.item.dataset.testid = "assistant-message";
    this.item.dataset.state = "waiting";
    this.item.setAttribute("aria-busy", "true");
    const role = el("div", "role", state.model ? state.model.id : "model");
    this.bubble = el("div", "bubble");
    this.text = document.createTextNode("");
    const span = el("span", "text");
    span.dataset.testid = "assistant-text";
    span.append(this.text);
    this.bubble.append(span);
    this.item.append(role, this.bubble);
    ui.messages.append(this.item);
  }

  append(piece) {
    const follow = nearBottom();
    this.item.dataset.state = "streaming";
    this.text.appendData(piece);
    if (follow) scrollToBottom();
  }

  filtered(info) {
    const stage = info.stage ? ` (${info.stage})` : "";
    const categories = (info.categories || []).join(", ") || "unsafe";
    const notice = el("div", "filter-notice", `Blocked by the content filter${stage}: ${categories}`);
    notice.dataset.testid = "filter-notice";
    notice.setAttribute("role", "note");
    if (info.source) notice.title = `decided by: ${info.source}`;
    this.item.append(notice);
  }

  error(parts) {
    const box = el("div", "error-message");
    box.dataset.testid = "error-message";
    box.setAttribute("role", "alert");
    box.append(...(typeof parts === "string" ? [document.createTextNode(parts)] : parts));
    this.item.append(box);
    if (!this.text.length) this.bubble.hidden = true;
  }

  finish(outcome, stats) {
    this.item.dataset.state = outcome;
    this.item.removeAttribute("aria-busy");
    const line = el("div", "stats");
    line.dataset.testid = "message-stats";
    if (outcome === "stopped") {
      const badge = el("span", "badge", "stopped");
      badge.dataset.testid = "stopped-mark";
      line.append(badge);
    }
    line.append(document.createTextNode(stats));
    this.item.append(line);
    if (!this.text.length && outcome !== "error") this.bubble.hidden = true;
    if (nearBottom()) scrollToBottom();
  }
}

function addUserMessage(text) {
  const item = el("li", "msg user");
  item.dataset.testid = "user-message";
  item.append(el("div", "role", "You"), el("div", "bubble", text));
  ui.messages.append(item);
  ui.empty.hidden = true;
  scrollToBottom();
}

function nearBottom() {
  const s = ui.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function scrollToBottom() {
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
}

// -- a turn ---------------------------------------------------------------------------------

// The settings as request fields, or null after pointing at the first bad one.
function readSettings() {
  for (const field of [ui.temperature, ui.topP, ui.maxTokens]) {
    if (!field.checkValidity()) {
      setSettingsOpen(true);
      field.setAttribute("aria-invalid", "true");
      field.focus();
      field.reportValidity();
      return null;
    }
    field.removeAttribute("aria-invalid");
  }
  return {
    temperature: Number(ui.temperature.value),
    top_p: Number(ui.topP.value),
    max_tokens: Number(ui.maxTokens.value),
  };
}

// The system prompt, then every turn kept so far, then the new message.
function conversationWith(text) {
  const messages = [];
  const system = ui.systemPrompt.value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const turn of state.turns) {
    if (!turn.keep) continue;
    messages.push({ role: "user", content: turn.user }, { role: "assistant", content: turn.assistant });
  }
  messages.push({ role: "user", content: text });
  return messages;
}

function setStreaming(on) {
  const hadFocus = document.activeElement;
  ui.send.hidden = on;
  ui.stop.hidden = !on;
  // The button pressed disappears: its focus moves to the one that replaces it, or to the input.
  if (on && hadFocus === ui.send) ui.stop.focus();
  if (!on && (hadFocus === ui.stop || document.activeElement === document.body)) ui.input.focus();
}

function formatStats(answer, outcome) {
  if (outcome === "error" && !answer.pieces) return "not sent with the next message";
  const parts = [];
  const elapsed_s = (answer.ended - answer.started) / 1000;
  const tokens = answer.usage ? answer.usage.completion_tokens : answer.pieces;
  const approx = answer.usage ? "" : "≈";
  parts.push(`${approx}${tokens} token${tokens === 1 ? "" : "s"}`);
  if (answer.firstPiece !== null) {
    // tokens/s of generation: from the first token to the last, so queueing and prompt time do not count
    const generating_s = (answer.ended - answer.firstPiece) / 1000;
    if (tokens > 1 && generating_s > 0) parts.push(`${((tokens - 1) / generating_s).toFixed(1)} tokens/s`);
    parts.push(`first token ${((answer.firstPiece - answer.started) / 1000).toFixed(2)} s`);
  }
  if (answer.usage) parts.push(`prompt ${answer.usage.prompt_tokens} tokens`);
  parts.push(`${elapsed_s.toFixed(2)} s`);
  if (answer.finish && answer.finish !== "stop") parts.push(`finish: ${answer.finish}`);
  if (!answer.keep) parts.push("not sent with the next message");
  return parts.join(" · ");
}

async function send() {
  const text = ui.input.value.trim();
  if (!text || state.controller) return;
  const settings = readSettings();
  if (!settings) return;
  const messages = conversationWith(text);
  const turn = { user: text, assistant: "", keep: false };
  state.turns.push(turn);
  ui.input.value = "";
  fitInput();
  addUserMessage(text);
  const view = new AssistantView();
  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  const answer = {
    started: performance.now(),
    ended: 0,
    firstPiece: null,
    pieces: 0,
    usage: null,
    finish: null,
    keep: false,
  };
  let outcome = "done";
  try {
    outcome = await stream(messages, settings, controller, view, turn, answer);
  } catch (err) {
    if (err.name === "AbortError") {
      outcome = "stopped";
    } else {
      view.error(`The connection failed: ${err.message}`);
      outcome = "error";
    }
  } finally {
    answer.ended = performance.now();
    // A stopped answer stays in the conversation as far as it got; a failed or filtered turn
    // is left out of what later requests send.
    answer.keep = outcome === "done" || (outcome === "stopped" && turn.assistant !== "");
    turn.keep = answer.keep;
    view.finish(outcome, formatStats(answer, outcome));
    if (state.controller === controller) {
      state.controller = null;
      setStreaming(false);
    }
  }
}

// -> "done", "filtered" or "error"; an abort (Stop) throws AbortError.
async function stream(messages, settings, controller, view, turn, answer) {
  if (!state.model) {
    const loaded = await loadModel();
    if (!loaded.card) {
      view.error(loaded.status === 401 ? authMessage(loaded.message) : loaded.message);
      return "error";
    }
  }
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify({
      model: state.model.id,
      messages,
      stream: true,
      stream_options: { include_usage: true },
      ...settings,
    }),
    signal: controller.signal,
  });
  if (!response.ok) {
    const message = await errorText(response);
    if (response.status === 401) {
      view.error(authMessage(message));
      showNotice(authMessage(message), "error");
    } else {
      view.error(`The server answered ${response.status}: ${message}`);
    }
    return "error";
  }
  let outcome = "done";
  for await (const data of sseEvents(response.body)) {
    if (data === "[DONE]") break;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      view.error(`The server sent something that is not JSON: ${data.slice(0, 200)}`);
      return "error";
    }
    if (chunk.error) {
      view.error(`The answer failed: ${chunk.error.message || JSON.stringify(chunk.error)}`);
      return "error";
    }
    if (chunk.usage) answer.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      if (choice.index !== 0) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        if (answer.firstPiece === null) answer.firstPiece = performance.now();
        answer.pieces += 1;
        turn.assistant += piece;
        view.append(piece);
      }
      if (choice.finish_reason) answer.finish = choice.finish_reason;
    }
    if (chunk.content_filter && chunk.content_filter.flagged) {
      view.filtered(chunk.content_filter);
      outcome = "filtered";
    } else if (answer.finish === "content_filter" && outcome !== "filtered") {
      view.filtered({});
      outcome = "filtered";
    }
  }
  return outcome;
}

function stop() {
  if (state.controller) state.controller.abort(); // closing the connection stops the generation
}

function newChat() {
  stop();
  state.turns = [];
  ui.messages.replaceChildren();
  ui.empty.hidden = false;
  ui.input.value = "";
  fitInput();
  ui.input.focus();
}

function fitInput() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${ui.input.scrollHeight + 2}px`;
}

// -- wiring ---------------------------------------------------------------------------------

function init() {
  ui.apiKey.value = localStorage.getItem(KEY_STORAGE) || "";
  let keyTimer = null;
  ui.apiKey.addEventListener("input", () => {
    const key = ui.apiKey.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    ui.apiKey.removeAttribute("aria-invalid");
    clearTimeout(keyTimer);
    keyTimer = setTimeout(() => {
      if (!state.model || !ui.notice.hidden) loadModel();
    }, 300);
  });
  ui.settingsToggle.addEventListener("click", () => setSettingsOpen(ui.settings.hidden));
  ui.newChat.addEventListener("click", newChat);
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.stop.addEventListener("click", stop);
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.input.addEventListener("input", fitInput);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.controller) stop();
  });
  for (const field of [ui.temperature, ui.topP, ui.maxTokens]) {
    field.addEventListener("input", () => field.removeAttribute("aria-invalid"));
  }
  loadModel();
  ui.input.focus();
}

// Exposed for the browser test of the stream parser; the page itself does not need it.
window.alpacaChat = { SseParser };
init();
