// The visprompt page: images and a question in, the answer streamed out, the conversation kept in
// this page (sent again with each question, images of earlier turns included). Text from the model
// is only ever set as textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  model: null,
  messages: [], // the conversation in OpenAI's format
  pending: [], // images for the next question: {url, name}
  controller: null, // aborts the answer being streamed
};

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function say(text) {
  $("status").textContent = text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("model").textContent = "Model: this server needs an API key (open Settings)";
    return;
  }
  if (!response.ok) {
    $("model").textContent = `Model: ${await errorText(response)}`;
    return;
  }
  const body = await response.json();
  state.model = body.data[0].id;
  $("model").textContent = `Model: ${state.model}`;
}

// ---------------------------------------------------------------------------------------- images

function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      say(`${file.name} is not an image`);
      continue;
    }
    const reader = new FileReader();
    reader.onload = () => {
      state.pending.push({ url: reader.result, name: file.name || "pasted image" });
      drawThumbs();
    };
    reader.readAsDataURL(file);
  }
}

function drawThumbs() {
  const list = $("thumbs");
  list.replaceChildren();
  state.pending.forEach((image, i) => {
    const item = document.createElement("li");
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = image.name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${image.name}`);
    remove.addEventListener("click", () => {
      state.pending.splice(i, 1);
      drawThumbs();
      $("question").focus();
    });
    item.append(img, remove);
    list.append(item);
  });
}

// ---------------------------------------------------------------------------------- conversation

function bubble(role, text, images = []) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  div.append(who);
  for (const image of images) {
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = image.name;
    div.append(img);
  }
  const p = document.createElement("p");
  p.className = "text";
  p.textContent = text;
  div.append(p);
  $("conversation").append(div);
  div.scrollIntoView({ block: "end" });
  return p;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function ask(event) {
  event.preventDefault();
  if (state.controller) return;
  const question = $("question").value.trim();
  if (!question && !state.pending.length) {
    say("Type a question or add an image first");
    return;
  }
  const images = state.pending.splice(0);
  drawThumbs();
  $("question").value = "";
  const content = images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  if (question) content.push({ type: "text", text: question });
  state.messages.push({ role: "user", content });
  bubble("user", question, images);
  const answer = bubble("assistant", "");
  answer.parentElement.setAttribute("aria-busy", "true");
  await stream(answer);
  answer.parentElement.setAttribute("aria-busy", "false");
}

async function stream(answer) {
  state.controller = new AbortController();
  busy(true);
  say("Generating…");
  let text = "";
  let firstAt = null;
  let usage = null;
  const request = {
    messages: state.messages,
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || 128,
    temperature: Number($("temperature").value) || 0,
  };
  if (state.model) request.model = state.model;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(request),
      signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (piece) {
          if (firstAt === null) firstAt = performance.now();
          text += piece;
          answer.textContent = text;
        }
      }
    }
    say("");
    if (usage) showSpeed(usage.completion_tokens, firstAt);
  } catch (error) {
    if (error.name === "AbortError") {
      say("Stopped");
      answer.parentElement.classList.add("stopped");
    } else {
      say(`Error: ${error.message}`);
      answer.parentElement.classList.add("failed");
    }
  } finally {
    state.messages.push({ role: "assistant", content: text });
    state.controller = null;
    busy(false);
    $("question").focus();
  }
}

function showSpeed(tokens, firstAt) {
  const seconds = firstAt === null ? 0 : (performance.now() - firstAt) / 1000;
  const rate = seconds > 0 ? ` · ${(Math.max(tokens - 1, 0) / seconds).toFixed(1)} tokens/s` : "";
  $("speed").textContent = `${tokens} tokens${rate}`;
}

function stop() {
  if (state.controller) state.controller.abort();
}

// ------------------------------------------------------------------------------------------ wiring

function wire() {
  const drop = $("drop");
  const input = $("images");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      input.click();
    }
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles(e.dataTransfer.files);
  });
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";
  });
  document.addEventListener("paste", (e) => {
    const files = [...e.clipboardData.files].filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  $("ask").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("ask").requestSubmit();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") stop();
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    stop();
    state.messages = [];
    $("conversation").replaceChildren();
    $("speed").textContent = "";
    say("New conversation");
    $("question").focus();
  });
  $("api-key").addEventListener("change", loadModel);
  loadModel();
}

wire();
