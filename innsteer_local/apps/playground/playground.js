// The playground: steered and unsteered replies side by side, from the server's own API only.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { base: null, flows: [], controller: null, key: sessionStorage.getItem("innsteer-api-key") || "" };

// a server started with --api-key wants it on every API request; the page keeps it for this tab only
function headers(extra = {}) {
  return state.key ? { ...extra, Authorization: `Bearer ${state.key}` } : extra;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}`;
}

class NeedKey extends Error {}

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers() });
  if (resp.status === 401) throw new NeedKey(await errorMessage(resp));
  if (!resp.ok) throw new Error(await errorMessage(resp));
  return resp.json();
}

function askForKey(message) {
  const form = $("#key-form");
  form.hidden = false;
  $("#key-message").textContent = state.key ? `That key was refused (${message}).` :
    "This server needs its API key (the one `serve` was started with).";
  $("#api-key").focus();
}

// ---- flow controls ---------------------------------------------------------------------------

function flowControl(flow, index) {
  const id = `flow-${index}`;
  const limit = Math.max(4, Math.ceil(Math.abs(flow.default_strength) * 3));
  const use = el("input", { type: "checkbox", id: `${id}-use` });
  use.checked = index === 0;
  const slider = el("input", { type: "range", id: `${id}-strength`, min: -limit, max: limit, step: 0.1,
                               value: flow.default_strength, "aria-label": `${flow.name} strength` });
  const number = el("input", { type: "number", id: `${id}-value`, min: -limit, max: limit, step: 0.1,
                               value: flow.default_strength, "aria-label": `${flow.name} strength value` });
  const gate = el("select", { id: `${id}-gate`, "aria-label": `${flow.name} gate` });
  for (const g of flow.gates) gate.append(el("option", { value: g, text: g }));
  gate.value = flow.default_gate;
  const box = el("fieldset", { class: "flow", "data-flow": flow.name, "data-on": String(use.checked) },
    el("legend", {}, use, " ", el("label", { for: use.id, style: "display:inline", text: flow.name })),
    el("div", { class: "meta", text: [flow.behavior, flow.method, `layers ${flow.layers.join(",")}`,
                                         `default ${flow.default_strength}`].filter(Boolean).join(" · ") }),
    el("label", { for: slider.id, text: "strength (negative steers away)" }),
    el("div", { class: "strength" }, slider, number),
    el("label", { class: "gate", for: gate.id, text: "gate" }), gate);
  slider.addEventListener("input", () => { number.value = slider.value; changed(); });
  number.addEventListener("input", () => { slider.value = number.value; changed(); });
  use.addEventListener("change", () => { box.dataset.on = String(use.checked); changed(); });
  gate.addEventListener("change", changed);
  return box;
}

function steering() {
  const out = [];
  state.flows.forEach((flow, i) => {
    if (!$(`#flow-${i}-use`).checked) return;
    out.push({ flow: flow.name, strength: Number($(`#flow-${i}-value`).value), gate: $(`#flow-${i}-gate`).value });
  });
  return out;
}

function modelId(choices) {
  if (!choices.length) return state.base;
  if (choices.length > 1) return null;
  const c = choices[0];
  const flow = state.flows.find((f) => f.name === c.flow);
  return c.gate === flow.default_gate ? `${state.base}+${c.flow}@${c.strength}` : null;
}

// ---- requests and snippets ---------------------------------------------------------------------

function requestBody(choices, stream) {
  const messages = [];
  const system = $("#system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push({ role: "user", content: $("#prompt").value });
  const body = { model: state.base, messages, max_tokens: Number($("#max-tokens").value),
                 temperature: Number($("#temperature").value), seed: Number($("#seed").value) };
  if (stream) body.stream = true;
  body.steering = choices;
  return body;
}

function changed() {
  const choices = steering();
  const id = modelId(choices);
  $("#model-id").textContent = id || "(several flows or a non-default gate: use the steering field)";
  $("#pane-steered .which").textContent = choices.length
    ? "(" + choices.map((c) => `${c.flow} @ ${c.strength}${c.gate !== "off" ? ", gate " + c.gate : ""}`).join("; ") + ")"
    : "(no flow selected)";
  const body = requestBody(choices, false);
  const url = `${location.origin}/v1/chat/completions`;
  const json = JSON.stringify(body);
  const auth = state.key ? ` -H "Authorization: Bearer $INNSTEER_API_KEY"` : "";
  $("#snippet-curl").textContent =
    `curl -s ${url} -H 'Content-Type: application/json'${auth} \\\n  -d '${json.replace(/'/g, "'\\''")}'`;
  const { steering: chosen, model, messages, ...params } = body;
  const args = Object.entries(params).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ");
  $("#snippet-python").textContent = [
    "from openai import OpenAI",
    "",
    ...(state.key ? ["import os", ""] : []),
    `client = OpenAI(base_url="${location.origin}/v1", api_key=${state.key ? 'os.environ["INNSTEER_API_KEY"]' : '"unused"'})`,
    "reply = client.chat.completions.create(",
    `    model=${JSON.stringify(model)}, messages=${JSON.stringify(messages)},`,
    `    ${args},`,
    `    extra_body={"steering": ${JSON.stringify(chosen)}},`,
    ")",
    "print(reply.choices[0].message.content)",
  ].join("\n");
}

function renderStats(pane, stats, timing) {
  const dl = pane.querySelector(".stats");
  dl.replaceChildren();
  const rows = [["chunks", timing.chunks], ["first token", `${timing.first} ms`], ["total", `${timing.total} ms`]];
  if (stats) {
    rows.push(["rows steered", stats.rows_steered], ["tokens evaluated", stats.tokens_evaluated],
              ["rows steered / token", stats.rows_steered_per_token ?? "–"],
              ["rows rejected (non-finite)", stats.rows_rejected_nonfinite]);
  }
  for (const [k, v] of rows) dl.append(el("dt", { text: k }), el("dd", { text: String(v) }));
}

async function streamInto(pane, choices, signal) {
  const text = pane.querySelector(".text");
  text.textContent = "";
  pane.querySelector(".stats").replaceChildren();
  pane.dataset.state = "running";
  const t0 = performance.now();
  const timing = { chunks: 0, first: "–", total: "–" };
  let stats = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(requestBody(choices, true)), signal });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          const piece = obj.choices && obj.choices[0] && obj.choices[0].delta && obj.choices[0].delta.content;
          if (piece) {
            if (!timing.chunks) timing.first = Math.round(performance.now() - t0);
            timing.chunks += 1;
            text.textContent += piece;
          }
          if (obj.steering_stats) stats = obj.steering_stats;
        }
      }
    }
    timing.total = Math.round(performance.now() - t0);
    renderStats(pane, stats, timing);
    pane.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      pane.dataset.state = "stopped";
      text.textContent += " [stopped]";
      return;
    }
    pane.dataset.state = "error";
    text.textContent = e.message;
    showError(e.message);
  }
}

async function send() {
  if (state.controller) return;
  showError("");
  if (!$("#prompt").value.trim()) {
    showError("Write a prompt first.");
    $("#prompt").focus();
    return;
  }
  const choices = steering();
  state.controller = new AbortController();
  $("#send").disabled = true;
  $("#stop").disabled = false;
  try {
    // both at once: the server decodes them in the same batch, each with its own steering
    for (const pane of [$("#pane-plain"), $("#pane-steered")]) {
      pane.dataset.state = "waiting";
      pane.querySelector(".text").textContent = "";
      pane.querySelector(".stats").replaceChildren();
    }
    await Promise.all([streamInto($("#pane-plain"), [], state.controller.signal),
                       streamInto($("#pane-steered"), choices, state.controller.signal)]);
  } finally {
    state.controller = null;
    $("#send").disabled = false;
    $("#stop").disabled = true;
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

async function copy(targetId, button) {
  const text = document.getElementById(targetId).textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {  // no clipboard API (a plain-http origin other than localhost): select it instead
    const range = document.createRange();
    range.selectNodeContents(document.getElementById(targetId));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

async function init() {
  $("#send").addEventListener("click", send);
  $("#stop").addEventListener("click", stop);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send(); }
    if (e.key === "Escape") stop();
  });
  for (const b of document.querySelectorAll("button[data-copy]")) {
    b.addEventListener("click", () => copy(b.dataset.copy, b));
  }
  for (const id of ["#system", "#prompt", "#max-tokens", "#temperature", "#seed"]) {
    $(id).addEventListener("input", changed);
  }
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("#api-key").value.trim();
    sessionStorage.setItem("innsteer-api-key", state.key);
    $("#key-form").hidden = true;
    load();
  });
  await load();
}

async function load() {
  try {
    const models = await getJSON("/v1/models");
    state.base = models.data[0].id;
    const flows = await getJSON("/v1/steering");
    state.flows = flows.data;
  } catch (e) {
    if (e instanceof NeedKey) {
      askForKey(e.message);
      return;
    }
    showError(`Could not reach the server's API: ${e.message}`);
    return;
  }
  showError("");
  $("#model-line").textContent = `model ${state.base} · ${state.flows.length} flow(s) loaded · ` +
    "steered and unsteered replies are generated side by side, in one batch on the same model";
  const box = $("#flows");
  box.replaceChildren();
  state.flows.forEach((f, i) => box.append(flowControl(f, i)));
  $("#no-flows").hidden = state.flows.length > 0;
  document.body.dataset.ready = "true";
  changed();
}

init();
