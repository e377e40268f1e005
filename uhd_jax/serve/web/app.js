// The page served by uhd-serve at /: an image, the model's slice grid over it (POST /v1/slice_plan), and a
// conversation about it through POST /v1/chat/completions with stream: true, each answer shown as its server-sent
// events arrive. Plain browser JavaScript, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const DISPLAY = 640;   // the long side of the drawn panel, in CSS pixels

const state = {
  image: null,     // the chosen file as a data URL: what the server receives
  picture: null,   // the decoded <img>
  plan: null,      // the server's slice plan of it
  turns: [],       // finished {question, answer} pairs, sent back with every question
  busy: false,
  model: "",
};

function showError(text) {
  $("error").textContent = text || "";
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || `${response.status} ${response.statusText}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function decodePicture(url) {
  return new Promise((resolve, reject) => {
    const picture = new Image();
    picture.onload = () => resolve(picture);
    picture.onerror = () => reject(new Error("the browser cannot decode this file as an image"));
    picture.src = url;
  });
}

// ---- the slice grid ------------------------------------------------------------------------------------------

// The cells' boxes are fractions of the picture the model cuts: the image itself, or for SliME the image letterboxed
// (aspect kept, centred on black) into a grid of square tiles.
function cutPicture(plan, picture) {
  const w = picture.naturalWidth, h = picture.naturalHeight;
  if (plan && plan.grid && plan.scheme.startsWith("SliME")) {
    const tile = plan.cells[0].size[0];
    const width = plan.grid[0] * tile, height = plan.grid[1] * tile;
    const scale = Math.min(width / w, height / h);
    const iw = w * scale, ih = h * scale;
    return { width, height, image: [(width - iw) / 2, (height - ih) / 2, iw, ih] };
  }
  return { width: w, height: h, image: [0, 0, w, h] };
}

function label(ctx, text, x, y) {
  ctx.font = "bold 13px system-ui, sans-serif";
  const width = ctx.measureText(text).width + 8;
  ctx.fillStyle = "rgba(0, 0, 0, 0.65)";
  ctx.fillRect(x - width / 2, y - 10, width, 20);
  ctx.fillStyle = "#fff";
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillText(text, x, y);
}

function draw() {
  const canvas = $("panel"), picture = state.picture, plan = state.plan;
  if (!picture) return;
  const cut = cutPicture(plan, picture);
  const scale = DISPLAY / Math.max(cut.width, cut.height);
  canvas.width = Math.round(cut.width * scale);
  canvas.height = Math.round(cut.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const [x, y, w, h] = cut.image.map((v) => v * scale);
  ctx.drawImage(picture, x, y, w, h);
  if (!plan) return;
  if (!plan.cells.length) {
    label(ctx, `one view · ${plan.tokens} tokens`, canvas.width / 2, 16);
    return;
  }
  ctx.lineWidth = 2;
  for (const cell of plan.cells) {
    const [x0, y0, x1, y1] = cell.box;
    ctx.strokeStyle = "#ffcc00";
    ctx.strokeRect(x0 * canvas.width + 1, y0 * canvas.height + 1, (x1 - x0) * canvas.width - 2,
                   (y1 - y0) * canvas.height - 2);
    label(ctx, `${cell.tokens} tok`, (x0 + x1) / 2 * canvas.width, (y0 + y1) / 2 * canvas.height);
  }
}

function describePlan(plan) {
  const [w, h] = plan.input_size;
  const cut = plan.grid ? `grid ${plan.grid[0]}×${plan.grid[1]} (${plan.cells.length} slices)` : "no slices";
  $("plan-summary").textContent = `${plan.scheme}: ${w}×${h} px, ${cut}; overview ${plan.overview_tokens} tokens; ` +
    `${plan.tokens} image tokens in the prompt`;
  const panel = $("panel");
  panel.dataset.grid = plan.grid ? `${plan.grid[0]}x${plan.grid[1]}` : "none";
  panel.dataset.tokens = String(plan.tokens);
  const rows = [["overview", "", plan.overview_tokens]];
  const cols = plan.grid ? plan.grid[0] : 1;
  plan.cells.forEach((cell, i) => {
    rows.push([`slice row ${Math.floor(i / cols) + 1}, column ${(i % cols) + 1}`, `${cell.size[0]}×${cell.size[1]}`,
               cell.tokens]);
  });
  const body = $("slices").querySelector("tbody");
  body.replaceChildren(...rows.map((row) => {
    const tr = document.createElement("tr");
    for (const value of row) {
      const td = document.createElement("td");
      td.textContent = String(value);
      tr.appendChild(td);
    }
    return tr;
  }));
  $("slices").hidden = false;
}

async function chooseImage() {
  const file = $("file").files[0];
  if (!file) return;
  showError("");
  let url, picture;
  try {
    url = await readAsDataURL(file);
    picture = await decodePicture(url);
  } catch (e) {
    showError(e.message);
    return;
  }
  Object.assign(state, { image: url, picture, plan: null });
  newConversation();   // an image belongs to the first turn: a new image starts over
  $("plan-summary").textContent = "Asking the model how it slices this image…";
  $("slices").hidden = true;
  draw();
  const response = await fetch("/v1/slice_plan", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ image_url: url }),
  });
  if (state.image !== url) return;   // another image was chosen meanwhile
  if (!response.ok) {
    showError(await errorText(response));
    $("plan-summary").textContent = "";
    return;
  }
  state.plan = await response.json();
  draw();
  describePlan(state.plan);
}

// ---- the conversation ----------------------------------------------------------------------------------------

function newConversation() {
  state.turns = [];
  $("turns").replaceChildren();
  showError("");
}

function userMessage(text, first) {
  if (!first || !state.image) return { role: "user", content: text };
  return { role: "user", content: [{ type: "text", text }, { type: "image_url", image_url: { url: state.image } }] };
}

function addTurn(question) {
  const li = document.createElement("li");
  const q = document.createElement("div");
  q.className = "question";
  q.textContent = question;
  const a = document.createElement("div");
  a.className = "answer";
  a.dataset.state = "streaming";
  a.dataset.chunks = "0";
  li.append(q, a);
  $("turns").appendChild(li);
  return a;
}

// Server-sent events from a fetch body: calls onEvent(data) for each `data:` line, until the body ends.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onEvent(line.slice(6));
      }
    }
  }
}

function samplingFields() {
  const out = {};
  const maxTokens = $("max-tokens").value.trim();
  if (maxTokens) out.max_tokens = parseInt(maxTokens, 10);
  const temperature = $("temperature").value.trim();
  if (temperature) out.temperature = parseFloat(temperature);
  return out;
}

async function ask(question) {
  const messages = [];
  state.turns.forEach((turn, i) => {
    messages.push(userMessage(turn.question, i === 0), { role: "assistant", content: turn.answer });
  });
  messages.push(userMessage(question, state.turns.length === 0));
  const answer = addTurn(question);
  let text = "", chunks = 0, finished = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: state.model, messages, stream: true, ...samplingFields() }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (data) => {
      if (data === "[DONE]") {
        finished = true;
        return;
      }
      const payload = JSON.parse(data);
      if (payload.error) throw new Error(payload.error.message);
      const delta = payload.choices && payload.choices[0] && payload.choices[0].delta;
      if (delta && delta.content) {
        text += delta.content;
        chunks += 1;
        answer.textContent = text;
        answer.dataset.chunks = String(chunks);
      }
    });
    if (!finished) throw new Error("the answer stopped before its end (the server closed the stream)");
    state.turns.push({ question, answer: text });
    answer.dataset.state = "done";
  } catch (e) {
    answer.dataset.state = "error";   // not part of the conversation: the next question does not see it
    answer.closest("li").classList.add("failed");
    showError(e.message);
  }
}

$("file").addEventListener("change", chooseImage);
$("reset").addEventListener("click", newConversation);
$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.busy) return;
  state.busy = true;
  $("send").disabled = true;
  showError("");
  $("question").value = "";
  try {
    await ask(question);
  } finally {
    state.busy = false;
    $("send").disabled = false;
    $("question").focus();
  }
});
$("question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
fetch("/v1/models").then((r) => r.json()).then((body) => {
  state.model = body.data[0].id;
  $("model").textContent = state.model;
}).catch(() => {});
