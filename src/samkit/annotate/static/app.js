// samkit annotate: the page. Plain JS, no build step. Talks to the JSON API in samkit/annotate/app.py.
// Frames: prompts and masks are in original-image pixels; the view maps them to the screen by
// screen = image * view.s + (view.tx, view.ty), in CSS pixels.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");

const LIVE_RGBA = [30, 144, 255, 130];
const SELECTED_RGBA = [255, 255, 0, 150];
const DRAG_PX = 5;

const S = {
  images: [],
  index: -1,
  image: null, // the open image's record from /api/images/{id}
  img: null, // HTMLImageElement, or null while loading / when missing
  objects: [],
  layer: null, // all objects composited at image resolution
  selected: null, // object id
  selectedCanvas: null,
  prompt: { points: [], box: null },
  history: [], // prompt actions, for undo: "point" | {box: previous box}
  promptStart: null, // performance.now() of the first prompt of the current object
  candidates: [],
  cand: 0,
  candCanvases: [],
  seq: 0, // last predict request sent
  view: { s: 1, tx: 0, ty: 0 },
  mouse: null, // {x, y, button, shift, alt, moved, pan}
  dragBox: null,
  spaceDown: false,
  latencies: [], // click -> mask drawn, ms
  serverMs: [], // time spent inside the server for the same requests, ms
  busy: false,
};
window.samkit = S; // for tests and curious users

// --- API ------------------------------------------------------------------------------------------------

async function api(path, options = {}) {
  const init = { method: options.method || "GET", headers: {} };
  if (options.body !== undefined) {
    init.body = JSON.stringify(options.body);
    init.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(path, init);
  let data = null;
  try {
    data = await res.json();
  } catch (e) {
    data = null;
  }
  if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
  return data;
}

function annotator() {
  return $("annotator").value.trim();
}

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function report(err) {
  setStatus(err.message || String(err), true);
}

// --- view -----------------------------------------------------------------------------------------------

function resizeCanvas() {
  const r = canvas.parentElement.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(r.width * dpr));
  canvas.height = Math.max(1, Math.round(r.height * dpr));
  canvas.style.width = `${r.width}px`;
  canvas.style.height = `${r.height}px`;
}

function fit() {
  if (!S.image || !S.image.width) return;
  const r = canvas.parentElement.getBoundingClientRect();
  const s = Math.min(r.width / S.image.width, r.height / S.image.height) * 0.98;
  S.view = { s, tx: (r.width - S.image.width * s) / 2, ty: (r.height - S.image.height * s) / 2 };
  render();
}

function zoomAt(factor, sx, sy) {
  const v = S.view;
  const s = Math.min(64, Math.max(0.05, v.s * factor));
  const k = s / v.s;
  S.view = { s, tx: sx - (sx - v.tx) * k, ty: sy - (sy - v.ty) * k };
  render();
}

function toImage(e) {
  const r = canvas.getBoundingClientRect();
  const sx = e.clientX - r.left;
  const sy = e.clientY - r.top;
  return { sx, sy, x: (sx - S.view.tx) / S.view.s, y: (sy - S.view.ty) / S.view.s };
}

function inside(p) {
  return S.image && p.x >= 0 && p.y >= 0 && p.x <= S.image.width && p.y <= S.image.height;
}

// --- drawing --------------------------------------------------------------------------------------------

function colorOf(id) {
  const hue = (id * 137.508) % 360;
  const c = (n) => {
    const k = (n + hue / 30) % 12;
    return Math.round(255 * (0.55 - 0.45 * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [c(0), c(8), c(4), 120];
}

function maskCanvas(rle, rgba) {
  return RLE.toCanvas(RLE.toBitmap(rle), rle.size[0], rle.size[1], rgba);
}

function rebuildLayer() {
  if (!S.image || !S.image.width) {
    S.layer = null;
    return;
  }
  const layer = document.createElement("canvas");
  layer.width = S.image.width;
  layer.height = S.image.height;
  const lctx = layer.getContext("2d");
  for (const o of S.objects) lctx.drawImage(maskCanvas(o.rle, colorOf(o.id)), 0, 0);
  S.layer = layer;
  const sel = S.objects.find((o) => o.id === S.selected);
  S.selectedCanvas = sel ? maskCanvas(sel.rle, SELECTED_RGBA) : null;
}

function liveCanvas() {
  const i = S.cand;
  if (!S.candidates[i]) return null;
  if (!S.candCanvases[i]) S.candCanvases[i] = maskCanvas(S.candidates[i].rle, LIVE_RGBA);
  return S.candCanvases[i];
}

function render() {
  const dpr = window.devicePixelRatio || 1;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#222";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const v = S.view;
  ctx.setTransform(dpr * v.s, 0, 0, dpr * v.s, dpr * v.tx, dpr * v.ty);
  ctx.imageSmoothingEnabled = v.s < 2;
  if (S.img) ctx.drawImage(S.img, 0, 0);
  if (S.layer) ctx.drawImage(S.layer, 0, 0);
  if (S.selectedCanvas) ctx.drawImage(S.selectedCanvas, 0, 0);
  const live = liveCanvas();
  if (live) ctx.drawImage(live, 0, 0);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  const box = S.dragBox || S.prompt.box;
  if (box) {
    ctx.strokeStyle = "#ffd400";
    ctx.lineWidth = 2;
    ctx.setLineDash([6, 4]);
    const [x0, y0, x1, y1] = box;
    ctx.strokeRect(x0 * v.s + v.tx, y0 * v.s + v.ty, (x1 - x0) * v.s, (y1 - y0) * v.s);
    ctx.setLineDash([]);
  }
  for (const [x, y, label] of S.prompt.points) {
    ctx.beginPath();
    ctx.arc(x * v.s + v.tx, y * v.s + v.ty, 6, 0, 2 * Math.PI);
    ctx.fillStyle = label === 1 ? "#19c319" : "#e8322a";
    ctx.fill();
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
  canvas.dataset.objects = String(S.objects.length);
  canvas.dataset.live = live ? "1" : "0";
}

// --- image list and progress ----------------------------------------------------------------------------

function statusOf(im) {
  return im.missing ? "missing" : im.status;
}

function renderImageList() {
  const ul = $("image-list");
  ul.replaceChildren();
  S.images.forEach((im, i) => {
    const li = document.createElement("li");
    li.dataset.id = im.id;
    li.dataset.status = statusOf(im);
    li.classList.toggle("current", i === S.index);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = im.path;
    const badge = document.createElement("span");
    badge.className = `badge ${statusOf(im).replace(" ", "-")}`;
    badge.textContent = statusOf(im);
    const count = document.createElement("span");
    count.className = "count";
    count.textContent = `${im.objects}`;
    count.title = "objects";
    const emb = document.createElement("span");
    emb.className = "emb";
    emb.textContent = im.embedded ? "●" : "○";
    emb.title = im.embedded ? "embedded" : "not embedded yet";
    li.append(emb, name, badge, count);
    li.addEventListener("click", () => openImage(i));
    ul.append(li);
  });
}

async function refreshImages() {
  const [images, progress] = await Promise.all([api("/api/images"), api("/api/progress")]);
  S.images = images;
  renderImageList();
  const pct = progress.total ? (100 * progress.done) / progress.total : 100;
  $("progress-fill").style.width = `${pct}%`;
  $("progress-text").textContent =
    `embeddings ${progress.done}/${progress.total}` + (progress.current ? ` · ${progress.current}` : "");
  const cur = S.image && images.find((im) => im.id === S.image.id);
  if (cur && !S.busy && cur.objects !== S.objects.length) await reloadObjects(); // another tab changed it
}

// --- opening images -------------------------------------------------------------------------------------

async function openImage(i) {
  if (i < 0 || i >= S.images.length) return;
  S.index = i;
  clearPrompt(false);
  S.selected = null;
  S.img = null;
  const id = S.images[i].id;
  renderImageList();
  try {
    S.image = await api(`/api/images/${id}`);
    S.objects = S.image.objects;
    $("image-name").textContent = S.image.path;
    $("mark-done").textContent = S.image.status === "done" ? "Reopen" : "Mark done";
    $("overlay-msg").textContent = "";
    rebuildLayer();
    renderObjectList();
    fit();
    if (S.image.missing) {
      $("overlay-msg").textContent = `image file missing: ${S.image.path}`;
      setStatus(`${S.image.path} is missing from the images folder; its objects are kept`, true);
      render();
      return;
    }
    const img = new Image();
    img.onload = () => {
      if (S.image && S.image.id === id) {
        S.img = img;
        render();
      }
    };
    img.onerror = () => setStatus(`cannot load ${S.image.path}`, true);
    img.src = `/api/images/${id}/file`;
    const opened = await api(`/api/images/${id}/open?annotator=${encodeURIComponent(annotator())}`, {
      method: "POST",
    });
    setStatus(opened.embedded ? "ready: click the object" : "embedding this image first…");
    history.replaceState(null, "", `#${id}`);
  } catch (err) {
    report(err);
  }
}

async function reloadObjects() {
  if (!S.image) return;
  const data = await api(`/api/images/${S.image.id}`);
  S.objects = data.objects;
  if (!S.objects.some((o) => o.id === S.selected)) S.selected = null;
  rebuildLayer();
  renderObjectList();
  render();
}

// --- prompting ------------------------------------------------------------------------------------------

function clearPrompt(draw = true) {
  S.prompt = { points: [], box: null };
  S.history = [];
  S.promptStart = null;
  S.candidates = [];
  S.candCanvases = [];
  S.cand = 0;
  S.seq++;
  updateCandInfo();
  if (draw) render();
}

function addPoint(p, label, t0) {
  if (!inside(p)) return setStatus("that click is outside the image", true);
  if (S.promptStart === null) S.promptStart = t0;
  S.prompt.points.push([Math.round(p.x * 10) / 10, Math.round(p.y * 10) / 10, label]);
  S.history.push("point");
  render();
  predict(t0);
}

function setBox(a, b, t0) {
  const W = S.image.width;
  const H = S.image.height;
  const clamp = (v, hi) => Math.round(Math.min(hi, Math.max(0, v)) * 10) / 10;
  const box = [clamp(Math.min(a.x, b.x), W), clamp(Math.min(a.y, b.y), H), clamp(Math.max(a.x, b.x), W), clamp(Math.max(a.y, b.y), H)];
  if (box[2] - box[0] < 2 || box[3] - box[1] < 2) return;
  if (S.promptStart === null) S.promptStart = t0;
  S.history.push({ box: S.prompt.box });
  S.prompt.box = box;
  render();
  predict(t0);
}

async function predict(t0) {
  const seq = ++S.seq;
  const imageId = S.image.id;
  if (!S.prompt.points.length && !S.prompt.box) {
    S.candidates = [];
    S.candCanvases = [];
    updateCandInfo();
    render();
    return;
  }
  try {
    const res = await api(`/api/images/${imageId}/predict`, { method: "POST", body: S.prompt });
    if (seq !== S.seq || !S.image || S.image.id !== imageId) return; // a newer prompt is on its way
    S.candidates = res.candidates;
    S.candCanvases = [];
    S.cand = 0;
    updateCandInfo();
    render();
    // The next animation frame is when the drawn mask reaches the screen.
    requestAnimationFrame(() => {
      const ms = performance.now() - t0;
      S.latencies.push(ms);
      S.serverMs.push(res.server_ms);
      canvas.dataset.drawnSeq = String(seq);
      $("latency").textContent = `mask in ${ms.toFixed(0)} ms (server ${res.server_ms.toFixed(0)} ms)`;
    });
    setStatus("Enter accepts, Tab cycles candidates, Esc discards");
  } catch (err) {
    if (seq === S.seq) report(err);
  }
}

function updateCandInfo() {
  const n = S.candidates.length;
  const el = $("cand-info");
  if (!n) {
    el.textContent = "no mask";
  } else {
    const c = S.candidates[S.cand];
    el.textContent = `mask ${S.cand + 1}/${n} · predicted IoU ${c.score.toFixed(3)}`;
  }
  el.dataset.candidate = String(S.cand);
  el.dataset.count = String(n);
}

function cycle(step) {
  const n = S.candidates.length;
  if (!n) return;
  S.cand = (S.cand + step + n) % n;
  updateCandInfo();
  render();
}

function pick(i) {
  if (i < S.candidates.length) {
    S.cand = i;
    updateCandInfo();
    render();
  }
}

function undo() {
  const last = S.history.pop();
  if (last === undefined) return setStatus("nothing to undo");
  if (last === "point") S.prompt.points.pop();
  else S.prompt.box = last.box;
  api("/api/events", { method: "POST", body: { kind: "undo", image_id: S.image.id, annotator: annotator() } }).catch(() => {});
  if (!S.prompt.points.length && !S.prompt.box) {
    clearPrompt();
    return;
  }
  render();
  predict(performance.now());
}

function discard() {
  if (!S.prompt.points.length && !S.prompt.box) {
    select(null);
    return;
  }
  const ms = S.promptStart === null ? null : performance.now() - S.promptStart;
  api("/api/events", {
    method: "POST",
    body: { kind: "discard", image_id: S.image.id, annotator: annotator(), duration_ms: ms },
  }).catch(() => {});
  clearPrompt();
  setStatus("discarded");
}

async function accept() {
  if (!S.candidates.length || S.busy) return;
  S.busy = true;
  const body = {
    ...S.prompt,
    candidate: S.cand,
    label: $("label").value.trim() || "object",
    annotator: annotator(),
    duration_ms: S.promptStart === null ? null : performance.now() - S.promptStart,
  };
  try {
    const obj = await api(`/api/images/${S.image.id}/objects`, { method: "POST", body });
    S.objects.push(obj);
    clearPrompt(false);
    rebuildLayer();
    renderObjectList();
    render();
    setStatus(`object #${obj.id} saved (${obj.area} px)`);
    const im = S.images[S.index];
    if (im) {
      im.objects = S.objects.length;
      if (im.status === "todo") im.status = "in progress";
      renderImageList();
    }
  } catch (err) {
    report(err);
  } finally {
    S.busy = false;
  }
}

// --- objects --------------------------------------------------------------------------------------------

function renderObjectList() {
  const ul = $("object-list");
  ul.replaceChildren();
  $("object-count").textContent = String(S.objects.length);
  for (const o of S.objects) {
    const li = document.createElement("li");
    li.dataset.id = o.id;
    li.classList.toggle("selected", o.id === S.selected);
    const sw = document.createElement("span");
    sw.className = "swatch";
    const [r, g, b] = colorOf(o.id);
    sw.style.background = `rgb(${r},${g},${b})`;
    const id = document.createElement("span");
    id.className = "oid";
    id.textContent = `#${o.id}`;
    const label = document.createElement("input");
    label.className = "olabel";
    label.value = o.label;
    label.addEventListener("change", () => relabel(o.id, label.value));
    label.addEventListener("keydown", (e) => {
      if (e.key === "Enter") label.blur();
    });
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${o.source}${o.predicted_iou != null ? ` ${o.predicted_iou.toFixed(2)}` : ""}`;
    const del = document.createElement("button");
    del.textContent = "×";
    del.title = "delete";
    del.className = "odelete";
    del.addEventListener("click", (e) => {
      e.stopPropagation();
      deleteObject(o.id);
    });
    li.append(sw, id, label, meta, del);
    li.addEventListener("click", () => select(o.id));
    ul.append(li);
  }
}

function select(id) {
  S.selected = id;
  const sel = S.objects.find((o) => o.id === id);
  S.selectedCanvas = sel ? maskCanvas(sel.rle, SELECTED_RGBA) : null;
  for (const li of $("object-list").children) li.classList.toggle("selected", Number(li.dataset.id) === id);
  render();
}

function selectAt(p) {
  if (!inside(p)) return;
  const x = Math.floor(p.x);
  const y = Math.floor(p.y);
  // Newest first: the object drawn on top wins.
  for (let i = S.objects.length - 1; i >= 0; i--) {
    const o = S.objects[i];
    const [bx, by, bw, bh] = o.bbox;
    if (x < bx || y < by || x > bx + bw || y > by + bh) continue;
    if (RLE.toBitmap(o.rle)[y * o.rle.size[1] + x]) return select(o.id);
  }
  select(null);
}

async function deleteObject(id) {
  try {
    await api(`/api/objects/${id}?annotator=${encodeURIComponent(annotator())}`, { method: "DELETE" });
    S.objects = S.objects.filter((o) => o.id !== id);
    if (S.selected === id) S.selected = null;
    rebuildLayer();
    renderObjectList();
    render();
    setStatus(`object #${id} deleted`);
    const im = S.images[S.index];
    if (im) {
      im.objects = S.objects.length;
      renderImageList();
    }
  } catch (err) {
    report(err);
  }
}

async function relabel(id, label) {
  try {
    const obj = await api(`/api/objects/${id}`, { method: "PATCH", body: { label, annotator: annotator() } });
    const o = S.objects.find((x) => x.id === id);
    if (o) o.label = obj.label;
    setStatus(`object #${id} is now "${obj.label}"`);
  } catch (err) {
    report(err);
    renderObjectList();
  }
}

function focusLabelOfSelected() {
  if (S.selected === null) return setStatus("select an object first (Shift+click or the list)");
  const input = $("object-list").querySelector(`li[data-id="${S.selected}"] .olabel`);
  if (input) {
    input.focus();
    input.select();
  }
}

// --- auto mode and status -------------------------------------------------------------------------------

async function runAuto() {
  if (!S.image || S.image.missing || S.busy) return;
  S.busy = true;
  $("auto-run").disabled = true;
  setStatus("auto mode: generating masks…");
  try {
    const res = await api(`/api/images/${S.image.id}/auto`, {
      method: "POST",
      body: {
        points_per_side: Number($("auto-pps").value),
        prompts: $("auto-prompts").value,
        pred_iou_thresh: Number($("auto-iou").value),
        stability_score_thresh: Number($("auto-stab").value),
        label: $("label").value.trim() || "object",
        annotator: annotator(),
      },
    });
    await reloadObjects();
    setStatus(`auto mode: ${res.objects.length} confident masks pre-filled in ${res.seconds.toFixed(1)} s`);
    await refreshImages();
  } catch (err) {
    report(err);
  } finally {
    S.busy = false;
    $("auto-run").disabled = false;
  }
}

async function toggleDone() {
  if (!S.image) return;
  const status = S.image.status === "done" ? "in progress" : "done";
  try {
    await api(`/api/images/${S.image.id}/status`, { method: "POST", body: { status, annotator: annotator() } });
    S.image.status = status;
    $("mark-done").textContent = status === "done" ? "Reopen" : "Mark done";
    await refreshImages();
  } catch (err) {
    report(err);
  }
}

// --- input ----------------------------------------------------------------------------------------------

canvas.addEventListener("contextmenu", (e) => e.preventDefault());

canvas.addEventListener("mousedown", (e) => {
  if (!S.image) return;
  const p = toImage(e);
  if (document.activeElement instanceof HTMLElement) document.activeElement.blur();
  const pan = e.button === 1 || (e.button === 0 && S.spaceDown);
  S.mouse = { ...p, button: e.button, shift: e.shiftKey, alt: e.altKey, moved: false, pan, t0: performance.now() };
  e.preventDefault();
});

window.addEventListener("mousemove", (e) => {
  const m = S.mouse;
  if (!m) return;
  const p = toImage(e);
  if (!m.moved && Math.hypot(p.sx - m.sx, p.sy - m.sy) > DRAG_PX) m.moved = true;
  if (m.pan) {
    S.view.tx += p.sx - m.sx;
    S.view.ty += p.sy - m.sy;
    m.sx = p.sx;
    m.sy = p.sy;
    render();
  } else if (m.moved && m.button === 0 && !m.shift && !S.image.missing) {
    S.dragBox = [Math.min(m.x, p.x), Math.min(m.y, p.y), Math.max(m.x, p.x), Math.max(m.y, p.y)];
    render();
  }
});

window.addEventListener("mouseup", (e) => {
  const m = S.mouse;
  if (!m) return;
  S.mouse = null;
  const t0 = performance.now();
  if (m.pan || S.image.missing) return;
  const p = toImage(e);
  if (S.dragBox) {
    S.dragBox = null;
    setBox(m, p, t0);
    return;
  }
  if (m.moved) return;
  if (m.button === 0 && m.shift) selectAt(m);
  else if (m.button === 2 || (m.button === 0 && m.alt)) addPoint(m, 0, t0);
  else if (m.button === 0) addPoint(m, 1, t0);
});

canvas.addEventListener(
  "wheel",
  (e) => {
    e.preventDefault();
    const p = toImage(e);
    zoomAt(Math.exp(-e.deltaY * 0.0015), p.sx, p.sy);
  },
  { passive: false },
);

document.addEventListener("keydown", (e) => {
  const typing = e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement;
  if (typing) {
    if (e.key === "Escape") e.target.blur();
    return;
  }
  const r = canvas.getBoundingClientRect();
  const key = e.key;
  if ((e.ctrlKey || e.metaKey) && key.toLowerCase() === "z") {
    e.preventDefault();
    undo();
  } else if (e.ctrlKey || e.metaKey) {
    return;
  } else if (key === "Tab") {
    e.preventDefault();
    cycle(e.shiftKey ? -1 : 1);
  } else if (key === "Enter") {
    e.preventDefault();
    accept();
  } else if (key === "Escape") {
    discard();
  } else if (key === "Delete" || key === "Backspace") {
    if (S.selected !== null) deleteObject(S.selected);
  } else if (key === "1" || key === "2" || key === "3") {
    pick(Number(key) - 1);
  } else if (key === " ") {
    e.preventDefault();
    S.spaceDown = true;
  } else if (key === "+" || key === "=") {
    zoomAt(1.25, r.width / 2, r.height / 2);
  } else if (key === "-") {
    zoomAt(0.8, r.width / 2, r.height / 2);
  } else {
    const k = key.toLowerCase();
    if (k === "f" || k === "0") fit();
    else if (k === "a") runAuto();
    else if (k === "d") toggleDone();
    else if (k === "l") {
      e.preventDefault();
      focusLabelOfSelected();
    } else if (k === "n" || key === "ArrowRight") openImage(S.index + 1);
    else if (k === "p" || key === "ArrowLeft") openImage(S.index - 1);
  }
});

document.addEventListener("keyup", (e) => {
  if (e.key === " ") S.spaceDown = false;
});

$("prev-image").addEventListener("click", () => openImage(S.index - 1));
$("next-image").addEventListener("click", () => openImage(S.index + 1));
$("cand-prev").addEventListener("click", () => cycle(-1));
$("cand-next").addEventListener("click", () => cycle(1));
$("accept").addEventListener("click", accept);
$("discard").addEventListener("click", discard);
$("undo").addEventListener("click", undo);
$("zoom-fit").addEventListener("click", fit);
$("mark-done").addEventListener("click", toggleDone);
$("auto-run").addEventListener("click", runAuto);
// the grid size only matters for grid prompts
$("auto-prompts").addEventListener("change", () => {
  $("auto-pps").disabled = $("auto-prompts").value === "learned";
});
$("annotator").value = localStorage.getItem("samkit.annotator") || "annotator";
$("annotator").addEventListener("change", () => localStorage.setItem("samkit.annotator", annotator()));
// Buttons keep no focus, so Enter/Space after a click go to the shortcuts, not to the button.
for (const b of document.querySelectorAll("button")) b.addEventListener("mouseup", () => b.blur());

window.addEventListener("resize", () => {
  resizeCanvas();
  render();
});

async function main() {
  resizeCanvas();
  try {
    await refreshImages();
    const fromHash = Number(location.hash.slice(1));
    const start = S.images.findIndex((im) => im.id === fromHash);
    if (S.images.length) await openImage(start >= 0 ? start : 0);
    else setStatus("no images in this project", true);
  } catch (err) {
    report(err);
  }
  setInterval(() => refreshImages().catch(report), 2000);
}

main();
