// The live-captions page: microphone or file audio to /v1/realtime (vLLM's dialect, audio
// as PCM16 at the capture rate, resampled by the server), captions as the model decides
// them, word times, subtitles of the session. No dependencies, no build step.

import { segmentsFromWords, toSRT, toVTT } from "./subtitles.js";

const DELAYS = Array.from({ length: 30 }, (_, i) => 80 * (i + 1)); // 80 ... 2400 ms
const DEFAULT_DELAY = 480;
const DEFAULT_FAST_DELAY = 160;
const CHUNK_SECONDS = 0.1;
const FILE_RATE = 16000; // files are decoded at the model's rate: a 16 kHz file goes sample for sample
const KEY_SUBPROTOCOL = "openai-insecure-api-key.";

const MESSAGES = {
  denied: "Microphone access was denied. Allow the microphone for this page in the browser's site " +
    "settings, then press Start microphone again.",
  noMic: "No microphone was found. Connect one, or stream a file instead.",
  micBusy: "The microphone could not be started: another application may be using it.",
  insecure: "This browser offers the microphone only to secure pages: open this page on localhost " +
    "or 127.0.0.1 (the same port), or serve it over https.",
  noWorklet: "This browser cannot capture audio here (no AudioWorklet support).",
  busy: "The server is at capacity: all its live sessions are in use. Try again in a moment.",
  lost: "Lost the connection to the server. The captions so far are kept; start again to go on.",
  refused: "The server refused the live session. Check the API key, and that the server allows " +
    "this page's origin (--allow-origin).",
  unreachable: "The server cannot be reached. Is mlx-voxtral serve still running?",
  needKey: "This server needs an API key: type the key it was started with (--api-key).",
  wrongKey: "The server did not accept this API key.",
  keyChars: "This API key has characters a browser cannot send on a websocket; start the server " +
    "with a key of letters, digits and - _ . ~ only.",
  idle: "The server closed the session after a long silence from this page.",
  tooLong: "The session reached the server's limit on audio; start again to go on.",
};

const $ = (id) => document.getElementById(id);
const ui = {
  start: $("start"), stop: $("stop"), file: $("file"), delay: $("delay"), dual: $("dual"),
  fastDelay: $("provisional-delay"), key: $("key"), message: $("message"), status: $("status"),
  captions: $("captions"), wordTime: $("word-time"), srt: $("srt"), vtt: $("vtt"), clear: $("clear"),
  model: $("model"),
};

// ---------------------------------------------------------------------------------------
// captions: one paragraph per turn, final text (words wrapped in timed spans) + provisional

const turns = [];

class Turn {
  constructor(offset) {
    this.offset = offset; // seconds of the page's session before this connection's audio
    this.text = "";
    this.wrapped = 0; // text[0:wrapped] is in word spans and plain text nodes; the rest in tail
    this.words = [];
    this.el = document.createElement("p");
    this.el.className = "turn";
    this.finalEl = document.createElement("span");
    this.finalEl.className = "final";
    this.tail = document.createTextNode("");
    this.finalEl.append(this.tail);
    this.provEl = document.createElement("span");
    this.provEl.className = "provisional";
    this.provEl.setAttribute("aria-hidden", "true"); // a preview: screen readers get the final text only
    this.el.append(this.finalEl, this.provEl);
    ui.captions.append(this.el);
    turns.push(this);
  }

  add(delta) {
    this.text += delta;
    this.tail.data += delta;
    this.el.scrollIntoView({ block: "nearest" });
  }

  provisional(text) {
    this.provEl.textContent = text;
  }

  word(event) {
    const word = { text: event.text, start: this.offset + event.start, end: this.offset + event.end };
    this.words.push(word);
    const at = word.text ? this.text.indexOf(word.text, this.wrapped) : -1;
    if (at < 0) return; // not in the text as shown: timed for subtitles, not shown as a span
    const before = this.text.slice(this.wrapped, at);
    const span = document.createElement("span");
    span.className = "word";
    span.tabIndex = -1;
    span.textContent = word.text;
    span.dataset.start = word.start.toFixed(2);
    span.dataset.end = word.end.toFixed(2);
    span.title = `${word.start.toFixed(2)}–${word.end.toFixed(2)} s`;
    const parts = before ? [document.createTextNode(before), span] : [span];
    this.tail.before(...parts);
    this.wrapped = at + word.text.length;
    this.tail.data = this.text.slice(this.wrapped);
  }

  done(text) {
    this.provisional("");
    if (text !== this.text) { // never expected: the deltas joined are the final text
      this.finalEl.replaceChildren(this.tail = document.createTextNode(text));
      this.text = text;
      this.wrapped = text.length;
    }
  }
}

function sessionSegments() {
  return turns.flatMap((t) => segmentsFromWords(t.words));
}

function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function showWordTime(span) {
  ui.wordTime.textContent = span ? `“${span.textContent}”: ${span.dataset.start}–${span.dataset.end} s` : "";
}

// ---------------------------------------------------------------------------------------
// messages and controls

function say(text) {
  ui.message.textContent = text;
}

function status(text) {
  ui.status.textContent = text;
}

function refreshControls() {
  const busy = run !== null;
  ui.start.disabled = busy;
  ui.file.disabled = busy;
  ui.stop.disabled = !busy || run.stopping;
  for (const el of [ui.delay, ui.dual, ui.key]) el.disabled = busy;
  ui.fastDelay.disabled = busy || !ui.dual.checked;
  const words = turns.some((t) => t.words.length);
  ui.srt.disabled = ui.vtt.disabled = !words;
  ui.clear.disabled = busy || !turns.length;
}

function fillDelays() {
  for (const ms of DELAYS) ui.delay.add(new Option(`${ms} ms`, String(ms), ms === DEFAULT_DELAY, ms === DEFAULT_DELAY));
  fillFastDelays();
}

function fillFastDelays() {
  const delay = Number(ui.delay.value);
  const keep = Number(ui.fastDelay.value) || DEFAULT_FAST_DELAY;
  ui.fastDelay.replaceChildren();
  const choices = DELAYS.filter((ms) => ms < delay);
  const pick = choices.includes(keep) ? keep : choices.includes(DEFAULT_FAST_DELAY) ? DEFAULT_FAST_DELAY : choices[0];
  for (const ms of choices) ui.fastDelay.add(new Option(`${ms} ms`, String(ms), ms === pick, ms === pick));
  if (!choices.length) ui.dual.checked = false;
  ui.dual.disabled = !choices.length;
  refreshControls();
}

function micMessage(error) {
  switch (error && error.name) {
    case "NotAllowedError": case "SecurityError": return MESSAGES.denied;
    case "NotFoundError": case "OverconstrainedError": return MESSAGES.noMic;
    case "NotReadableError": case "AbortError": return MESSAGES.micBusy;
    default: return `The microphone could not be opened: ${error && error.message || error}`;
  }
}

function errorMessage(error) {
  switch (error.code) {
    case "server_busy": return MESSAGES.busy;
    case "idle_timeout": return MESSAGES.idle;
    case "session_too_long": return MESSAGES.tooLong;
    case "invalid_api_key": return MESSAGES.wrongKey;
    default: return `The server reported an error: ${error.message}`;
  }
}

// ---------------------------------------------------------------------------------------
// a run: one websocket session, fed by the microphone or a file

let run = null;
let sessionSeconds = 0; // audio of the finished runs: word times go on from there

function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.toBase64) return bytes.toBase64();
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

class Run {
  constructor(rate, label) {
    this.rate = rate;
    this.label = label;
    this.offset = sessionSeconds;
    this.samples = 0;
    this.turn = null;
    this.stopping = false; // the audio has ended; waiting for the final text
    this.over = false;
    this.cleanup = [];
  }

  /** Check the key, open the websocket, configure the session; false (said why) if refused. */
  async open() {
    const key = ui.key.value;
    status("Connecting…");
    let models;
    try {
      models = await fetch("/v1/models", { headers: key ? { Authorization: `Bearer ${key}` } : {}, cache: "no-store" });
    } catch {
      say(MESSAGES.unreachable);
      return false;
    }
    if (models.status === 401) {
      say(key ? MESSAGES.wrongKey : MESSAGES.needKey);
      return false;
    }
    if (!models.ok) {
      say(`The server answered ${models.status} to /v1/models.`);
      return false;
    }
    const model = (await models.json()).data?.[0]?.id ?? "default";
    const url = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/v1/realtime`;
    try {
      this.ws = new WebSocket(url, key ? ["realtime", KEY_SUBPROTOCOL + key] : ["realtime"]);
    } catch {
      say(MESSAGES.keyChars);
      return false;
    }
    const opened = await new Promise((resolve) => {
      this.ws.onmessage = (e) => resolve(JSON.parse(e.data).type === "session.created");
      this.ws.onclose = () => resolve(false);
    });
    if (!opened) {
      say(MESSAGES.refused);
      this.ws.onclose = null;
      this.ws.close();
      return false;
    }
    this.ws.onmessage = (e) => this.onEvent(JSON.parse(e.data));
    this.ws.onclose = (e) => this.onClose(e);
    const update = { type: "session.update", model, delay_ms: Number(ui.delay.value),
                     audio_format: { encoding: "pcm_s16le", sample_rate: this.rate } };
    if (ui.dual.checked) update.provisional_delay_ms = Number(ui.fastDelay.value);
    this.ws.send(JSON.stringify(update));
    return true;
  }

  send(buffer) {
    if (this.over || this.stopping || this.ws.readyState !== WebSocket.OPEN) return;
    this.samples += buffer.byteLength / 2;
    this.ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: base64(buffer) }));
    status(`${this.label}: ${(this.samples / this.rate).toFixed(1)} s sent`);
  }

  /** No more audio: the server finishes the text, then the run ends. */
  commit() {
    if (this.over || this.stopping) return;
    this.stopping = true;
    this.release();
    if (this.samples === 0) return this.end("Stopped before any audio was sent.");
    this.ws.send(JSON.stringify({ type: "input_audio_buffer.commit", final: true }));
    status(`${this.label}: finishing the captions…`);
    refreshControls();
  }

  currentTurn() {
    return this.turn ??= new Turn(this.offset);
  }

  onEvent(event) {
    if (event.type === "transcription.delta") {
      this.currentTurn().add(event.delta);
    } else if (event.type === "transcription.word") {
      this.currentTurn().word(event);
      refreshControls();
    } else if (event.type === "transcription.provisional") {
      if (event.text || this.turn) this.currentTurn().provisional(event.text);
    } else if (event.type === "transcription.done") {
      if (event.text || this.turn) this.currentTurn().done(event.text);
      this.turn = null;
      if (this.stopping) this.end(`${this.label}: done, ${(this.samples / this.rate).toFixed(1)} s transcribed.`);
    } else if (event.type === "error") {
      say(errorMessage(event.error || {}));
      this.end("Stopped.");
    }
  }

  onClose(event) {
    if (this.over) return;
    say(event.code === 1013 ? MESSAGES.busy : MESSAGES.lost);
    this.end("Disconnected.");
  }

  release() {
    for (const fn of this.cleanup.splice(0)) {
      try { fn(); } catch { /* already released */ }
    }
  }

  end(text) {
    if (this.over) return;
    this.over = true;
    this.release();
    if (this.ws) {
      this.ws.onclose = null;
      if (this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000);
    }
    sessionSeconds += this.samples / this.rate;
    if (this.turn) this.turn.provisional("");
    run = null;
    status(text);
    refreshControls();
  }
}

async function startMicrophone() {
  say("");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) return say(MESSAGES.insecure);
  if (typeof AudioWorkletNode === "undefined") return say(MESSAGES.noWorklet);
  ui.start.disabled = true;
  status("Asking for the microphone…");
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
  } catch (error) {
    say(micMessage(error));
    status("Not listening.");
    return refreshControls();
  }
  const context = new AudioContext();
  let released = false;
  const stopAll = () => {
    if (released) return;
    released = true;
    stream.getTracks().forEach((t) => t.stop());
    context.close();
  };
  const current = run = new Run(context.sampleRate, `Microphone (${context.sampleRate} Hz)`);
  refreshControls();
  try {
    await context.audioWorklet.addModule("/static/pcm16-worklet.js");
  } catch (error) {
    stopAll();
    say(`The audio capture could not start: ${error.message}`);
    return current.end("Not listening.");
  }
  if (!(await current.open())) {
    stopAll();
    return current.end("Not listening.");
  }
  const node = new AudioWorkletNode(context, "pcm16-capture", {
    processorOptions: { chunkSamples: Math.round(context.sampleRate * CHUNK_SECONDS) },
  });
  node.port.onmessage = (e) => {
    if (e.data instanceof ArrayBuffer) current.send(e.data);
    else if (e.data.flushed) { stopAll(); current.commit(); }
  };
  const source = context.createMediaStreamSource(stream);
  source.connect(node);
  node.connect(context.destination); // silent: the worklet writes no output
  await context.resume();
  current.stopCapture = () => node.port.postMessage("flush"); // the last partial chunk, then commit
  current.cleanup.push(() => source.disconnect(), stopAll);
  for (const track of stream.getAudioTracks()) track.onended = () => current.stopCapture();
  status(`${current.label}: listening…`);
  refreshControls();
}

async function streamFile(file) {
  say("");
  status(`Reading ${file.name}…`);
  let audio;
  try {
    audio = await new OfflineAudioContext(1, 1, FILE_RATE).decodeAudioData(await file.arrayBuffer());
  } catch {
    say(`${file.name} could not be decoded as audio by this browser.`);
    return status("Not streaming.");
  }
  const channels = Array.from({ length: audio.numberOfChannels }, (_, c) => audio.getChannelData(c));
  const pcm = new ArrayBuffer(audio.length * 2);
  const view = new DataView(pcm);
  for (let i = 0; i < audio.length; i++) {
    let x = 0;
    for (const data of channels) x += data[i];
    x /= channels.length;
    const s = Math.round(x * 32768); // as the worklet: a 16-bit sample comes back as itself
    view.setInt16(i * 2, s > 32767 ? 32767 : s < -32768 ? -32768 : s, true);
  }
  const current = run = new Run(FILE_RATE, file.name);
  refreshControls();
  if (!(await current.open())) return current.end("Not streaming.");
  let stopped = false;
  current.stopCapture = () => { stopped = true; current.commit(); };
  const chunk = Math.round(FILE_RATE * CHUNK_SECONDS) * 2;
  const t0 = performance.now();
  for (let at = 0, k = 1; at < pcm.byteLength; at += chunk, k++) {
    const wait = t0 + k * CHUNK_SECONDS * 1000 - performance.now(); // real time: a chunk once it has "played"
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    if (stopped || current.over) return;
    current.send(pcm.slice(at, at + chunk));
  }
  current.commit();
}

// ---------------------------------------------------------------------------------------
// wiring

function wordSpans() {
  return Array.from(ui.captions.querySelectorAll(".word"));
}

function init() {
  fillDelays();
  ui.delay.addEventListener("change", fillFastDelays);
  ui.dual.addEventListener("change", refreshControls);
  ui.start.addEventListener("click", startMicrophone);
  ui.stop.addEventListener("click", () => run && run.stopCapture && run.stopCapture());
  ui.file.addEventListener("change", () => {
    const file = ui.file.files[0];
    ui.file.value = "";
    if (file) streamFile(file);
  });
  ui.srt.addEventListener("click", () => download("captions.srt", toSRT(sessionSegments()), "application/x-subrip"));
  ui.vtt.addEventListener("click", () => download("captions.vtt", toVTT(sessionSegments()), "text/vtt"));
  ui.clear.addEventListener("click", () => {
    turns.length = 0;
    sessionSeconds = 0;
    ui.captions.replaceChildren();
    showWordTime(null);
    say("");
    refreshControls();
  });
  ui.captions.addEventListener("mouseover", (e) => e.target.classList.contains("word") && showWordTime(e.target));
  ui.captions.addEventListener("focusin", (e) => e.target.classList.contains("word") && showWordTime(e.target));
  ui.captions.addEventListener("keydown", (e) => {
    const spans = wordSpans();
    if (!spans.length) return;
    const at = spans.indexOf(document.activeElement);
    const next = { ArrowRight: at + 1, ArrowDown: at + 1, ArrowLeft: at - 1, ArrowUp: at - 1, Home: 0,
                   End: spans.length - 1 }[e.key];
    if (e.key === "Escape") return ui.captions.focus();
    if (next === undefined) return;
    e.preventDefault();
    spans[Math.max(0, Math.min(spans.length - 1, at < 0 && next < 0 ? 0 : next))].focus();
  });
  refreshControls();
  fetch("/health", { cache: "no-store" }).then((r) => r.json()).then((health) => {
    ui.model.textContent = `Model: ${health.model}`;
    status("Ready: start the microphone or pick a file.");
  }).catch(() => say(MESSAGES.unreachable));
}

init();
