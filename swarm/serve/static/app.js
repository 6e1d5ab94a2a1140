// The web page of `swarm serve`: a chat over /v1/chat/completions (streamed) and the
// live swarm from /api/swarm/events. Hand-written, no dependencies, no build step.
// Every text from the server or the model goes into the page as text nodes (never as HTML).
"use strict";

const KEY_STORE = "swarm.apiKey";
const CHATS_STORE = "swarm.conversations";
const CURRENT_STORE = "swarm.current";
const MAX_CONVERSATIONS = 50;

const $ = (id) => document.getElementById(id);
const state = { model: null, key: localStorage.getItem(KEY_STORE) || "", chats: [], current: null,
                abort: null, events: null };

// ------------------------------------------------------------------ small helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

function formatBytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KB", "MB", "GB", "TB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1000)));
  return `${(n / 1000 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
}

const pct = (x) => (x === null || x === undefined ? "–" : `${Math.round(100 * x)}%`);
const num = (x, digits = 1) => (x === null || x === undefined ? "–" : x.toFixed(digits));

// ------------------------------------------------------------------ the API, with the key

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function authHeaders() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

async function errorText(response) {
  try {
    const body = await response.json();
    const error = body.error;
    return typeof error === "string" ? error : (error && error.message) || JSON.stringify(body);
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "cannot reach the server: is swarm serve still running?");
  }
  if (!response.ok) {
    const message = await errorText(response);
    if (response.status === 401) askForKey(message);
    throw new ApiError(response.status, message);
  }
  return response;
}

function askForKey(reason) {
  $("key-reason").textContent = reason
    ? `The server refused the request: ${reason}.`
    : "This server needs an API key (the one swarm serve was started with, --api-key).";
  $("key-input").value = state.key;
  $("change-key").hidden = false;
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

$("key-form").addEventListener("submit", () => {
  state.key = $("key-input").value.trim();
  localStorage.setItem(KEY_STORE, state.key);
  $("change-key").hidden = false;
  connect();
});
$("change-key").addEventListener("click", () => askForKey(""));

// ------------------------------------------------------------------ markdown (a safe subset)

function inline(text) {
  // `code` and **bold**; everything else is text.
  const out = document.createDocumentFragment();
  const pattern = /`([^`\n]+)`|\*\*([^*\n]+)\*\*/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    out.append(text.slice(last, match.index));
    out.append(match[1] !== undefined ? el("code", {}, match[1]) : el("strong", {}, match[2]));
    last = match.index + match[0].length;
  }
  out.append(text.slice(last));
  return out;
}

function blocks(text, out) {
  // Paragraphs, and lists of "- ", "* " or "1. " lines (blank lines between items keep one list).
  let list = null, paragraph = null;
  for (const line of text.split("\n")) {
    const bullet = line.match(/^\s*[-*]\s+(.*)$/), numbered = line.match(/^\s*(\d+)[.)]\s+(.*)$/);
    if (bullet || numbered) {
      const tag = bullet ? "ul" : "ol";
      if (!list || list.tagName.toLowerCase() !== tag) {
        list = el(tag);
        if (numbered && numbered[1] !== "1") list.setAttribute("start", numbered[1]);
        out.append(list);
      }
      list.append(el("li", {}, inline(bullet ? bullet[1] : numbered[2])));
      paragraph = null;
    } else if (!line.trim()) {
      paragraph = null;
    } else {
      list = null;
      if (paragraph) paragraph.append(el("br"));
      else { paragraph = el("p"); out.append(paragraph); }
      paragraph.append(inline(line));
    }
  }
}

function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const parts = text.split(/^```[^\n]*$/m);  // even: prose, odd: code (an open fence runs to the end)
  parts.forEach((part, i) => {
    if (i % 2) out.append(el("pre", {}, el("code", {}, part.replace(/^\n/, "").replace(/\n$/, ""))));
    else blocks(part, out);
  });
  return out;
}

// ------------------------------------------------------------------ conversations (localStorage)

function loadChats() {
  try { state.chats = JSON.parse(localStorage.getItem(CHATS_STORE) || "[]"); } catch (_) { state.chats = []; }
  state.current = state.chats.find((c) => c.id === localStorage.getItem(CURRENT_STORE)) || null;
}

function saveChats() {
  state.chats.sort((a, b) => b.updated - a.updated);
  state.chats = state.chats.slice(0, MAX_CONVERSATIONS);
  try {
    localStorage.setItem(CHATS_STORE, JSON.stringify(state.chats));
    localStorage.setItem(CURRENT_STORE, state.current ? state.current.id : "");
  } catch (_) {
    showBanner("this browser's storage is full: conversations are no longer saved");
  }
}

function newChat() {
  stopAnswer();
  state.current = null;
  saveChats();
  renderChat();
  $("prompt").focus();
}

function renderConversations() {
  const list = $("conversation-list");
  list.replaceChildren(...state.chats.map((chat) => {
    const button = el("button", { type: "button", class: "conversation" }, chat.title || "untitled");
    if (chat === state.current) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => { stopAnswer(); state.current = chat; saveChats(); renderChat(); });
    return el("li", {}, button);
  }));
}

function messageNode(message) {
  const body = el("div", { class: "body" });
  if (message.role === "assistant") body.append(renderMarkdown(message.content));
  else body.append(message.content);
  const node = el("li", { class: `message ${message.role}` },
                  el("span", { class: "visually-hidden" }, message.role === "user" ? "You:" : "Answer:"), body);
  if (message.error) node.append(el("p", { class: "error", role: "alert" }, message.error));
  if (message.stats) node.append(el("p", { class: "stats" }, message.stats));
  return node;
}

function renderChat() {
  const messages = state.current ? state.current.messages : [];
  $("messages").replaceChildren(...messages.map(messageNode));
  const last = messages[messages.length - 1];
  $("regenerate").hidden = !last || last.role !== "assistant" || !!state.abort;
  renderConversations();
  $("messages").lastElementChild?.scrollIntoView({ block: "end" });
}

// ------------------------------------------------------------------ streaming an answer

async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function statsText(sent, first, ended, usage) {
  const parts = [];
  if (first !== null) parts.push(`first token ${((first - sent) / 1000).toFixed(2)} s`);
  const tokens = usage ? usage.completion_tokens : null;
  if (tokens !== null && tokens > 1 && ended > first) {
    parts.push(`${((tokens - 1) / ((ended - first) / 1000)).toFixed(1)} tokens/s`);
  }
  if (tokens !== null) parts.push(`${tokens} tokens`);
  return parts.join(" · ");
}

async function answer() {
  const chat = state.current;
  const history = chat.messages.map(({ role, content }) => ({ role, content }));
  const reply = { role: "assistant", content: "" };
  chat.messages.push(reply);
  const controller = new AbortController();
  state.abort = controller;
  $("stop").hidden = false;
  $("send").disabled = true;
  renderChat();
  const node = $("messages").lastElementChild;
  const body = node.querySelector(".body");
  node.setAttribute("aria-busy", "true");
  const sent = performance.now();
  let first = null, usage = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", signal: controller.signal, headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: state.model, messages: history, stream: true,
                             stream_options: { include_usage: true } }),
    });
    for await (const chunk of serverSentEvents(response)) {
      if (chunk.error) throw new ApiError(500, chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
      if (delta) {
        if (first === null) first = performance.now();
        reply.content += delta;
        body.replaceChildren(renderMarkdown(reply.content));
      }
    }
    reply.stats = statsText(sent, first, performance.now(), usage);
  } catch (err) {
    if (err.name === "AbortError") reply.stats = "stopped";
    else reply.error = err.message;
  } finally {
    state.abort = null;
    $("stop").hidden = true;
    $("send").disabled = false;
    chat.updated = Date.now();
    saveChats();
    renderChat();
  }
}

function send(text) {
  if (!state.model) { showBanner("not connected to the server yet"); return; }
  if (!state.current) {
    state.current = { id: `${Date.now()}-${Math.random().toString(36).slice(2)}`, title: text.slice(0, 40),
                      messages: [], updated: Date.now() };
    state.chats.unshift(state.current);
  }
  state.current.messages.push({ role: "user", content: text });
  answer();
}

function stopAnswer() {
  if (state.abort) state.abort.abort();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.abort) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  } else if (event.key === "Escape") {
    stopAnswer();
  }
});
$("stop").addEventListener("click", stopAnswer);
$("new-chat").addEventListener("click", newChat);
$("regenerate").addEventListener("click", () => {
  const messages = state.current && state.current.messages;
  if (!messages || state.abort || messages[messages.length - 1].role !== "assistant") return;
  messages.pop();
  answer();
});

// ------------------------------------------------------------------ the swarm view

function planSummary(plan) {
  if (!plan) return "no plan yet";
  return plan.stages.map((s) => `${s.peer} ${s.start}–${s.end}`).join(" · ");
}

function renderSwarm(swarm) {
  const plan = swarm.plan;
  $("plan-summary").textContent = plan ? `· ${plan.stages.length} stage${plan.stages.length === 1 ? "" : "s"}: `
    + planSummary(plan) : "· not deployed";
  let status;
  if (swarm.recovering) status = "a peer was lost: re-planning and replaying the answers in flight…";
  else if (swarm.deployed) status = `serving ${swarm.plan ? swarm.plan.model : ""} over ${swarm.peers.length} `
    + `device${swarm.peers.length === 1 ? "" : "s"}; ${swarm.requests.active} answering, `
    + `${swarm.requests.waiting} waiting, ${swarm.requests.served} served`;
  else status = "not deployed yet: the first request plans and loads the model. " + (swarm.diagnostic || "");
  $("swarm-status").textContent = [status, ...swarm.notes].join(" ");

  const peerIndex = new Map(swarm.peers.map((p, i) => [p.name, i]));
  const bar = $("layer-bar");
  bar.replaceChildren(...(plan ? plan.stages.map((s) => {
    const part = el("div", { class: `layers c${peerIndex.get(s.peer) % 8}`,
                             title: `${s.peer}: layers ${s.start}–${s.end} of ${plan.num_units}` },
                    `${s.peer} ${s.start}–${s.end}`);
    part.style.flexGrow = String(s.end - s.start);
    return part;
  }) : [el("div", { class: "layers empty" }, "no plan yet")]));
  bar.setAttribute("aria-label", plan ? `the model's ${plan.num_units} layers: ${planSummary(plan)}` : "no plan yet");

  $("stages").tBodies[0].replaceChildren(...(plan ? plan.stages.map((s, k) => el("tr", {},
    el("td", {}, `${k + 1}. ${s.peer}`), el("td", {}, `${s.start}–${s.end}`),
    el("td", {}, `${pct(s.busy_share)} / ${pct(s.predicted_busy_share)}`), el("td", {}, num(s.tokens_per_s)),
    el("td", {}, `${num(s.step_ms)} / ${num(s.predicted_step_ms)}`))) : []));
  const predicted = plan && plan.predicted_tokens_per_s;
  $("rate").textContent = `Whole swarm: ${num(swarm.tokens_per_s)} tokens/s measured`
    + (predicted ? `; ${num(predicted)} tokens/s predicted for one answer` : "");

  $("peers").tBodies[0].replaceChildren(...swarm.peers.map((p, i) => el("tr", {},
    el("td", {}, el("span", { class: `dot c${i % 8}`, "aria-hidden": "true" }), p.name),
    el("td", {}, p.alive ? (p.name === swarm.source ? "this server" : "live") : "lost"),
    el("td", {}, `${formatBytes(p.mem_used)} / ${formatBytes(p.mem_usable)}`),
    el("td", {}, p.decode_ms ? `${p.decode_ms.toFixed(0)} ms per token for the whole model`
                               + (p.threads ? `, ${p.threads} thread${p.threads === 1 ? "" : "s"}` : "") : "–"))));

  $("links").tBodies[0].replaceChildren(...(swarm.links.length ? swarm.links.map((l) => el("tr", {},
    el("td", {}, `${l.a} ↔ ${l.b}`), el("td", {}, l.bandwidth_bps ? `${formatBytes(l.bandwidth_bps)}/s` : "–"),
    el("td", {}, l.rtt_s ? `${(l.rtt_s * 1000).toFixed(2)} ms` : "–")))
    : [el("tr", {}, el("td", { colspan: "3" }, "no links measured yet"))]));

  const moving = swarm.transfers || [];
  $("transfers").replaceChildren(...(moving.length
    ? moving.map((t) => {
      const item = el("li", {}, t.text);
      item.append(el("progress", { max: String(t.total), value: String(t.done), "aria-label": `${t.peer}'s weights` }));
      return item;
    })
    : [el("li", { class: "quiet" }, "none: every peer holds its weights")]));

  $("recoveries").replaceChildren(...(swarm.recoveries.length
    ? swarm.recoveries.slice().reverse().map((r) => el("li", { class: r.failed ? "error" : "" }, r.text))
    : [el("li", { class: "quiet" }, "none: no peer was lost")]));
}

function watchSwarm() {
  if (state.events) state.events.close();
  const query = state.key ? `?key=${encodeURIComponent(state.key)}` : "";
  const events = new EventSource(`/api/swarm/events${query}`);
  state.events = events;
  events.onmessage = (message) => {
    if ($("banner").dataset.source === "events") { showBanner(""); delete $("banner").dataset.source; }
    renderSwarm(JSON.parse(message.data));
  };
  events.onerror = () => {
    $("banner").dataset.source = "events";
    showBanner("the live swarm view lost the server; retrying…");
  };
}

async function showJoin() {
  try {
    const { command } = await (await api("/api/swarm/join")).json();
    const qr = await (await api("/api/swarm/join.svg")).blob();
    $("join-command").textContent = command;
    $("join-qr").src = URL.createObjectURL(qr);
    $("join").hidden = false;
  } catch (err) {
    $("join").hidden = false;
    $("join-command").textContent = err.message;
  }
}

$("show-join").addEventListener("click", showJoin);
$("copy-join").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText($("join-command").textContent);
    $("copy-join").textContent = "Copied";
  } catch (_) {
    window.getSelection().selectAllChildren($("join-command"));  // for Ctrl-C
  }
});

// ------------------------------------------------------------------ tabs and start

function selectTab(tab) {
  for (const other of document.querySelectorAll("[role=tab]")) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  tab.focus();
  history.replaceState(null, "", tab.id === "tab-swarm" ? "#swarm" : "#chat");
}

for (const tab of document.querySelectorAll("[role=tab]")) {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (event) => {
    if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
      const tabs = [...document.querySelectorAll("[role=tab]")];
      const next = tabs[(tabs.indexOf(tab) + (event.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length];
      selectTab(next);
    }
  });
}

async function connect() {
  try {
    const models = await (await api("/v1/models")).json();
    state.model = models.data[0].id;
    $("model-name").textContent = state.model;
    showBanner("");
    watchSwarm();
  } catch (err) {
    $("model-name").textContent = "not connected";
    if (err.status !== 401) showBanner(err.message);
  }
}

window.swarm = { renderMarkdown };  // for tests
loadChats();
renderChat();
$("change-key").hidden = !state.key;
if (location.hash === "#swarm") selectTab($("tab-swarm"));
connect();
