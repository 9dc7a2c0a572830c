// The visprompt page. Ask: images and a question in, the answer streamed out, the conversation kept
// in this page (sent again with each question, images of earlier turns included). Describe, Story,
// Lesson, Video and Explain: one request each to /v1/tasks/*, the answer shown when it is whole (a story's
// state is kept here and sent back with the next turn). Text from the model is only ever set as
// textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  model: null,
  messages: [], // the conversation in OpenAI's format
  pending: [], // images for the next question: {url, name}
  controller: null, // aborts the answer being streamed
};

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function headers() {
  return { "Content-Type": "application/json", ...authHeaders() };
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
    $("model").textContent = "Model: this server needs an API key (open API key)";
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

// -------------------------------------------------------------------------------------------- tabs

const TABS = ["ask", "describe", "story", "lesson", "video", "explain"];

function showTab(name, focus = false) {
  for (const tab of TABS) {
    const on = tab === name;
    const button = $(`tab-${tab}`);
    button.setAttribute("aria-selected", String(on));
    button.tabIndex = on ? 0 : -1;
    $(`panel-${tab}`).hidden = !on;
  }
  $("new-chat").hidden = name !== "ask";
  if (focus) $(`tab-${name}`).focus();
}

function wireTabs() {
  for (const tab of TABS) $(`tab-${tab}`).addEventListener("click", () => showTab(tab));
  document.querySelector(".tabs").addEventListener("keydown", (e) => {
    const at = TABS.findIndex((tab) => $(`tab-${tab}`).getAttribute("aria-selected") === "true");
    const moves = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: TABS.length - 1 };
    if (!(e.key in moves)) return;
    e.preventDefault();
    showTab(TABS[(moves[e.key] + TABS.length) % TABS.length], true);
  });
}

// ------------------------------------------------------------------------------------------- tasks

const tasks = { controller: null, story: null };

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function picture(url, name) {
  const img = document.createElement("img");
  img.src = url;
  img.alt = name;
  return img;
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// POST one task (a JSON object, or FormData for an upload) and render its answer; Escape stops it.
async function runTask(name, body, render) {
  if (tasks.controller) return;
  const status = $(`${name}-status`);
  const button = $(`${name}-send`);
  const json = !(body instanceof FormData);
  tasks.controller = new AbortController();
  button.disabled = true;
  status.textContent = "Working…";
  const started = performance.now();
  try {
    const response = await fetch(`/v1/tasks/${name}`, {
      method: "POST",
      headers: json ? headers() : authHeaders(),
      body: json ? JSON.stringify(body) : body,
      signal: tasks.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    render(await response.json());
    status.textContent = `Done in ${((performance.now() - started) / 1000).toFixed(1)} s`;
  } catch (error) {
    status.textContent = error.name === "AbortError" ? "Stopped" : `Error: ${error.message}`;
  } finally {
    tasks.controller = null;
    button.disabled = false;
  }
}

async function describe(event) {
  event.preventDefault();
  const file = $("describe-image").files[0];
  if (!file) {
    $("describe-status").textContent = "Choose an image first";
    return;
  }
  const body = { image: await readDataURL(file) };
  const tone = $("describe-tone").value;
  if (tone) body.tone = tone;
  await runTask("describe", body, (answer) => {
    $("describe-out").replaceChildren(picture(body.image, file.name), element("p", answer.text, "text"));
  });
}

async function story(event) {
  event.preventDefault();
  const status = $("story-status");
  if (tasks.story && tasks.story.ended) {
    status.textContent = "The story has ended: start a new one";
    return;
  }
  const files = [...$("story-images").files];
  if (!files.length && !tasks.story) {
    status.textContent = "A story begins with a picture";
    return;
  }
  const body = { images: await Promise.all(files.map(readDataURL)) };
  const direction = $("story-direction").value.trim();
  if (direction) body.direction = direction;
  if (tasks.story) body.state = tasks.story;
  await runTask("story", body, (answer) => {
    tasks.story = answer.state;
    const out = $("story-out");
    answer.paragraphs.forEach((paragraph, i) => {
      const turn = element("div", undefined, "turn");
      if (body.images[i]) turn.append(picture(body.images[i], files[i].name));
      turn.append(element("p", paragraph, "text"));
      out.append(turn);
    });
    if (answer.ended) out.append(element("p", "The end.", "muted"));
    $("story-images").value = "";
    $("story-direction").value = "";
  });
}

function newStory() {
  tasks.story = null;
  $("story-out").replaceChildren();
  $("story-status").textContent = "New story";
}

function renderLesson(lesson) {
  const quiz = element("ol", undefined, "quiz");
  for (const q of lesson.questions) {
    const choices = document.createElement("ol");
    choices.type = "A";
    for (const choice of q.choices) choices.append(element("li", choice));
    const answer = document.createElement("details");
    answer.append(element("summary", "Answer"), element("p", `${q.answer}. ${q.why}`));
    const item = document.createElement("li");
    item.append(element("p", q.question, "question"), choices, answer);
    quiz.append(item);
  }
  $("lesson-out").replaceChildren(
    element("h2", `Lesson (${lesson.level} level)`),
    element("p", lesson.explanation, "text"),
    quiz,
  );
}

async function lesson(event) {
  event.preventDefault();
  const file = $("lesson-image").files[0];
  if (!file) {
    $("lesson-status").textContent = "Choose an image first";
    return;
  }
  const body = {
    image: await readDataURL(file),
    questions: Number($("lesson-questions").value) || 3,
    level: $("lesson-level").value,
  };
  await runTask("lesson", body, renderLesson);
}

function timestamp(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  return `${String(Math.floor(s / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}

async function video(event) {
  event.preventDefault();
  const file = $("video-file").files[0];
  if (!file) {
    $("video-status").textContent = "Choose a video first";
    return;
  }
  const form = new FormData();
  form.append("video", file, file.name);
  form.append("max_frames", String(Number($("video-frames").value) || 4));
  await runTask("video", form, (summary) => {
    const scenes = element("ul", undefined, "scenes");
    for (const scene of summary.scenes) {
      const item = element("li");
      item.append(element("span", timestamp(scene.start), "time"), element("span", scene.description));
      scenes.append(item);
    }
    $("video-out").replaceChildren(element("p", summary.summary, "text"), scenes);
  });
}

async function explain(event) {
  event.preventDefault();
  const file = $("explain-image").files[0];
  const prompt = $("explain-prompt").value.trim();
  if (!file || !prompt) {
    $("explain-status").textContent = "Choose an image and write a question first";
    return;
  }
  const body = { image: await readDataURL(file), prompt };
  const token = $("explain-token").value.trim();
  if (token) body.token = token;
  await runTask("explain", body, (found) => {
    const heatmap = picture(found.heatmap, `Attention of each answer token on the image: ${found.tokens.join(" ")}`);
    const balance = picture(found.balance_plot, "Per layer, the share of attention on image and text tokens");
    heatmap.className = "plot";
    balance.className = "plot";
    $("explain-out").replaceChildren(element("p", found.answer, "text"), heatmap, balance);
  });
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
    if (e.key !== "Escape") return;
    stop();
    if (tasks.controller) tasks.controller.abort();
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
  $("describe-form").addEventListener("submit", describe);
  $("story-form").addEventListener("submit", story);
  $("story-new").addEventListener("click", newStory);
  $("lesson-form").addEventListener("submit", lesson);
  $("video-form").addEventListener("submit", video);
  $("explain-form").addEventListener("submit", explain);
  wireTabs();
  loadModel();
}

wire();
