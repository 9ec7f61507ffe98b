// The blind rating page of `alpaca-forge eval rate`: ask the server for this rater's next item
// (GET /api/next), show it, send the verdict with the token it came with (POST /api/rate), repeat.
// The page never knows which system wrote which response. Texts are only ever put into the page
// as text (textContent), never as HTML.
"use strict";

const RATER_STORAGE = "alpaca-forge.rater";
const RATER_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$/;
const KEYS = { 1: "A", a: "A", 2: "tie", t: "tie", 3: "B", b: "B" };

const $ = (id) => document.getElementById(id);
const state = { rater: null, current: null, busy: false };

// -- the server ------------------------------------------------------------------------------

// {status, data}; a network failure throws.
async function api(method, path, body) {
  const init = { method, headers: {}, cache: "no-store" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  return { status: response.status, data };
}

function errorText(result) {
  const message = result.data && result.data.error && result.data.error.message;
  return `The server answered ${result.status}${message ? ": " + message : ""}`;
}

// -- storage (a browser may refuse it: the page then asks the name each time) -------------------

function remembered() {
  try {
    return localStorage.getItem(RATER_STORAGE);
  } catch (_) {
    return null;
  }
}

function remember(name) {
  try {
    if (name === null) localStorage.removeItem(RATER_STORAGE);
    else localStorage.setItem(RATER_STORAGE, name);
  } catch (_) {
    /* not remembered: asked again next time */
  }
}

// -- what is shown ---------------------------------------------------------------------------

function notice(text, kind = "info") {
  const box = $("notice");
  box.textContent = text || "";
  box.className = "notice" + (kind === "error" ? " error" : "");
  box.hidden = !text;
}

function show(section) {
  for (const id of ["name-form", "rating", "done"]) $(id).hidden = id !== section;
  $("rater-bar").hidden = section === "name-form";
}

function setText(id, text) {
  const el = $(id);
  const empty = !text.trim();
  el.textContent = empty ? "(an empty response)" : text;
  el.classList.toggle("empty", empty);
}

function setBusy(busy) {
  state.busy = busy;
  for (const button of document.querySelectorAll(".choice")) button.disabled = busy;
}

function progress(data) {
  const shown = data.done ? `${data.rated} of ${data.total} rated` : `Item ${data.rated + 1} of ${data.total}`;
  $("progress").textContent = shown;
  $("bar-fill").style.width = `${data.total ? (100 * data.rated) / data.total : 0}%`;
  $("undo").disabled = data.rated === 0;
  $("done-undo").disabled = data.rated === 0;
}

function render(data) {
  progress(data);
  if (data.done) {
    state.current = null;
    $("done-text").textContent = `You have rated all ${data.total} items as ${data.rater}.`;
    show("done");
    return;
  }
  const item = data.item;
  state.current = item;
  $("rating").dataset.item = item.id;
  $("instruction").textContent = item.instruction;
  $("input").textContent = item.input;
  $("input-block").hidden = !item.input.trim();
  setText("response-a", item.response_a);
  setText("response-b", item.response_b);
  for (const button of document.querySelectorAll(".choice")) button.classList.remove("chosen");
  if (document.activeElement === $("rater-name")) $("rater-name").blur(); // keys go to the page now
  show("rating");
  setBusy(false);
  window.scrollTo(0, 0);
}

function askName(error) {
  state.rater = null;
  state.current = null;
  $("progress").textContent = "";
  $("bar-fill").style.width = "0%";
  show("name-form");
  const field = $("rater-name");
  field.value = error ? field.value : remembered() || "";
  $("name-error").textContent = error || "";
  $("name-error").hidden = !error;
  field.setAttribute("aria-invalid", error ? "true" : "false");
  field.focus();
}

// -- what the rater does -----------------------------------------------------------------------

async function loadNext(message, kind) {
  setBusy(true);
  let result;
  try {
    result = await api("GET", `/api/next?rater=${encodeURIComponent(state.rater)}`);
  } catch (_) {
    setBusy(false);
    notice("Cannot reach the rating server. Is it still running? Reload this page to try again.", "error");
    return;
  }
  if (result.status === 400) {
    askName(errorText(result));
    return;
  }
  if (result.status !== 200) {
    setBusy(false);
    notice(errorText(result), "error");
    return;
  }
  notice(message || "", kind);
  render(result.data);
}

async function begin(name) {
  state.rater = name;
  $("rater-shown").textContent = name;
  await loadNext();
}

async function choose(verdict) {
  const item = state.current;
  if (state.busy || !item) return;
  setBusy(true);
  const button = document.querySelector(`.choice[data-verdict="${verdict}"]`);
  button.classList.add("chosen");
  let result;
  try {
    result = await api("POST", "/api/rate", { rater: state.rater, item: item.id, verdict, token: item.token });
  } catch (_) {
    button.classList.remove("chosen");
    setBusy(false);
    notice("Cannot reach the rating server: your rating was not recorded. Try again.", "error");
    return;
  }
  if (result.status === 200) {
    await loadNext();
  } else if (result.status === 409) {
    // a restarted server, or another tab: nothing was recorded here; show what is next now
    await loadNext(`${errorText(result)}.`, "info");
  } else {
    button.classList.remove("chosen");
    setBusy(false);
    notice(errorText(result), "error");
  }
}

async function undo() {
  if (state.busy || !state.rater) return;
  setBusy(true);
  let result;
  try {
    result = await api("POST", "/api/undo", { rater: state.rater });
  } catch (_) {
    setBusy(false);
    notice("Cannot reach the rating server: nothing was undone.", "error");
    return;
  }
  if (result.status !== 200) {
    setBusy(false);
    notice(errorText(result), "error");
    return;
  }
  await loadNext(result.data.undone ? "Your last rating was taken back: rate it again." : "Nothing to undo.");
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  const target = event.target;
  if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA")) return;
  const key = event.key.toLowerCase();
  if (key === "u") {
    event.preventDefault();
    undo();
  } else if (KEYS[key] && !$("rating").hidden) {
    event.preventDefault();
    choose(KEYS[key]);
  }
}

function init() {
  $("name-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("rater-name").value.trim();
    if (!RATER_NAME.test(name)) {
      askName("Use 1 to 40 letters, digits, '.', '_' or '-', starting with a letter or digit.");
      return;
    }
    remember(name);
    notice("");
    begin(name);
  });
  $("switch-rater").addEventListener("click", () => {
    remember(null);
    notice("");
    askName();
  });
  for (const button of document.querySelectorAll(".choice")) {
    button.addEventListener("click", () => choose(button.dataset.verdict));
  }
  $("undo").addEventListener("click", undo);
  $("done-undo").addEventListener("click", undo);
  document.addEventListener("keydown", onKey);
  const name = remembered();
  if (name && RATER_NAME.test(name)) begin(name);
  else askName();
}

window.alpacaRate = { state };
init();
