// mnistconv's page: draw, POST /api/explain, draw every map it returns; and the training view,
// which polls /api/train/status. No dependencies, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { target: null, inflight: false, dirty: false, hasInk: false, model: null, renders: 0 };

// ---------- colours ----------
// Diverging, centred on 0: blue (negative) – white – red (positive).
function diverging(t) { // t in [-1, 1]
  t = Math.max(-1, Math.min(1, t));
  if (t >= 0) return [255, Math.round(255 * (1 - 0.8 * t)), Math.round(255 * (1 - 0.9 * t))];
  const u = -t;
  return [Math.round(255 * (1 - 0.9 * u)), Math.round(255 * (1 - 0.6 * u)), 255];
}
// Sequential, for values ≥ 0: near-black → purple → orange → pale yellow (inferno-like).
const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function sequential(t) { // t in [0, 1]
  t = Math.max(0, Math.min(1, t)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(t)), f = t - i;
  return STOPS[i].map((a, k) => Math.round(a + f * (STOPS[i + 1][k] - a)));
}
const maxAbs = (arrs) => arrs.reduce((m, a) => a.reduce((m2, v) => Math.max(m2, Math.abs(v)), m), 0);
const minOf = (arrs) => arrs.reduce((m, a) => a.reduce((m2, v) => Math.min(m2, v), m), Infinity);
const fmt = (v) => (Math.abs(v) >= 0.01 || v === 0 ? v.toFixed(3) : v.toExponential(2));

// Paints a side×side map on a canvas; signed maps use the diverging scale.
function paint(canvas, data, side, scale, signed) {
  canvas.width = side; canvas.height = side;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(side, side);
  for (let i = 0; i < side * side; i++) {
    const v = data[i] || 0;
    const c = signed ? diverging(scale > 0 ? v / scale : 0) : sequential(scale > 0 ? v / scale : 0);
    img.data[4 * i] = c[0]; img.data[4 * i + 1] = c[1]; img.data[4 * i + 2] = c[2]; img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

// A grid of maps (one figure per map), reusing the canvases between updates.
function maps(container, arrs, side, opts) {
  const el = $(container);
  if (el.children.length !== arrs.length) {
    el.innerHTML = "";
    arrs.forEach((_, n) => {
      const f = document.createElement("figure");
      f.innerHTML = `<canvas></canvas><figcaption>${opts.caption ? opts.caption(n) : "n=" + n}</figcaption>`;
      el.appendChild(f);
    });
  }
  const signed = opts.signed || minOf(arrs) < 0;
  const scale = signed ? maxAbs(arrs) : Math.max(0, ...arrs.map((a) => Math.max(...a)));
  arrs.forEach((a, n) => paint(el.children[n].querySelector("canvas"), a, side, scale, signed));
  if (opts.scaleEl) $(opts.scaleEl).textContent = signed ? `colour: −${fmt(scale)} blue · 0 white · +${fmt(scale)} red` : `colour: 0 dark … ${fmt(scale)} bright`;
}

// Bars for a vector; signed vectors grow from a zero line.
function bars(canvas, values, opts) {
  const c = $(canvas), ctx = c.getContext("2d"), W = c.width, H = c.height;
  ctx.clearRect(0, 0, W, H);
  const n = values.length, labelH = opts.labels ? 16 : 2, top = 14;
  const lo = opts.lo !== undefined ? opts.lo : Math.min(0, ...values);
  const hi = opts.hi !== undefined ? opts.hi : Math.max(1e-9, ...values);
  const y = (v) => top + (H - labelH - top) * (hi - v) / (hi - lo || 1);
  const bw = W / n;
  ctx.strokeStyle = "#bbb"; ctx.beginPath(); ctx.moveTo(0, y(0)); ctx.lineTo(W, y(0)); ctx.stroke();
  ctx.font = "11px sans-serif"; ctx.textAlign = "center";
  values.forEach((v, i) => {
    ctx.fillStyle = opts.color ? opts.color(i, v) : (v >= 0 ? "#c0392b" : "#2c6fbb");
    const y0 = y(0), y1 = y(v);
    ctx.fillRect(i * bw + (n > 20 ? 0 : 3), Math.min(y0, y1), Math.max(1, bw - (n > 20 ? 1 : 6)), Math.max(1, Math.abs(y1 - y0)));
    if (opts.labels) { ctx.fillStyle = "#333"; ctx.fillText(opts.labels[i], i * bw + bw / 2, H - 3); }
    if (opts.values) { ctx.fillStyle = "#333"; ctx.fillText(opts.values(v), i * bw + bw / 2, Math.max(11, Math.min(y0, y1) - 2)); }
  });
}

// ---------- drawing pad ----------
const pad = $("pad"), pctx = pad.getContext("2d");
function clearPad() {
  pctx.fillStyle = "#fff"; pctx.fillRect(0, 0, pad.width, pad.height);
  state.hasInk = false;
  $("prediction").textContent = "–";
  $("pred-note").textContent = "draw something";
  document.body.dataset.state = "empty";
}
clearPad();
let last = null;
function point(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}
function stroke(a, b) {
  pctx.strokeStyle = "#000"; pctx.lineWidth = 20; pctx.lineCap = "round"; pctx.lineJoin = "round";
  pctx.beginPath(); pctx.moveTo(a[0], a[1]); pctx.lineTo(b[0], b[1]); pctx.stroke();
  state.hasInk = true;
}
pad.addEventListener("pointerdown", (e) => {
  e.preventDefault();
  try { pad.setPointerCapture(e.pointerId); } catch (_) { /* synthetic pointers */ }
  last = point(e); stroke(last, last); request();
});
pad.addEventListener("pointermove", (e) => {
  if (!last) return;
  e.preventDefault();
  const p = point(e); stroke(last, p); last = p; request();
});
const up = () => { if (last) { last = null; request(); } };
pad.addEventListener("pointerup", up);
pad.addEventListener("pointercancel", up);
$("clear").addEventListener("click", clearPad);

// ---------- target label ----------
function labelButtons(classes) {
  const el = $("labels"); el.innerHTML = "";
  const mk = (text, value) => {
    const b = document.createElement("button");
    b.textContent = text; b.dataset.value = value === null ? "" : value;
    b.addEventListener("click", () => { state.target = value; markTarget(); request(); });
    el.appendChild(b);
  };
  mk("predicted", null);
  for (let c = 0; c < classes; c++) mk(String(c), c);
  markTarget();
}
function markTarget() {
  for (const b of $("labels").children) b.classList.toggle("on", b.dataset.value === (state.target === null ? "" : String(state.target)));
}

// ---------- the explain round trip ----------
function request() {
  if (state.inflight) { state.dirty = true; return; }
  if (!state.hasInk) return;
  state.inflight = true; state.dirty = false;
  const rgba = pctx.getImageData(0, 0, pad.width, pad.height).data;
  const pixels = new Array(pad.width * pad.height);
  for (let i = 0; i < pixels.length; i++) pixels[i] = rgba[4 * i];
  const body = { width: pad.width, height: pad.height, pixels };
  if (state.target !== null) body.label = state.target;
  fetch("/api/explain", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) })
    .then((r) => r.json().then((j) => ({ ok: r.ok, j })))
    .then(({ ok, j }) => {
      if (!ok) throw new Error(j.error || "request failed");
      render(j);
    })
    .catch((e) => { $("pred-note").innerHTML = `<span class="err">${String(e.message || e)}</span>`; })
    .finally(() => { state.inflight = false; if (state.dirty) request(); });
}

function render(j) {
  const m = state.model, names = j.class_names;
  const name = (c) => (names && names[c] ? `${c} ${names[c]}` : String(c));
  const [img] = j.shapes.input;
  // The input as MNIST shows it: bright ink on black, grey levels.
  const ictx = $("input").getContext("2d"), id = ictx.createImageData(img, img);
  j.input.forEach((v, i) => { const g = Math.round(255 * v); id.data.set([g, g, g, 255], 4 * i); });
  ictx.putImageData(id, 0, 0);
  $("prediction").textContent = names && names[j.predicted] ? names[j.predicted] : String(j.predicted);
  $("pred-note").textContent = `y = ${(100 * j.probs[j.predicted]).toFixed(1)}% for class ${j.predicted}`;
  const classes = j.probs.map((_, c) => String(c));
  bars("probs", j.probs, { lo: 0, hi: 1, labels: classes, values: (v) => (v >= 0.005 ? (100 * v).toFixed(0) + "%" : ""),
    color: (i) => (i === j.predicted ? "#c0392b" : i === j.label ? "#e67e22" : "#7f8c9a") });
  bars("ymd", j.y_minus_d, { lo: -1, hi: 1, labels: classes, values: (v) => (Math.abs(v) >= 0.01 ? v.toFixed(2) : "") });
  $("loss").textContent = `d = e${j.label} (target ${name(j.label)}${state.target === null ? ", the predicted class" : ""}) · L = Σ −dᵢ log yᵢ = ${j.loss.toFixed(4)}`;
  bars("hidden", j.hidden, { color: () => "#8e44ad" });
  const [, c] = j.shapes.conv, [, pd] = j.shapes.pooled, [, k] = j.shapes.kernels;
  maps("conv", j.conv, c, { scaleEl: "s-conv" });
  maps("pooled", j.pooled, pd, { scaleEl: "s-pooled" });
  maps("dy3", j.dL_dy3, c, { signed: true, scaleEl: "s-dy3" });
  pairs(j.kernels, j.grad_kernels, k);
  state.renders += 1;
  document.body.dataset.renders = state.renders;
  document.body.dataset.state = "ready";
  if (m) $("status").textContent = `${m.source} · ${m.config.n_kernels} kernels ${k}×${k}, ${m.config.conv_act} conv, ${m.config.pooling} pooling, φ = ${m.config.act}`;
}

// Each kernel beside its gradient; each family on its own symmetric scale.
function pairs(ks, gs, side) {
  const el = $("pairs");
  if (el.children.length !== ks.length) {
    el.innerHTML = "";
    ks.forEach((_, n) => {
      const f = document.createElement("figure");
      f.innerHTML = `<figcaption>n=${n}</figcaption><canvas title="k${n}"></canvas><canvas title="∂J/∂k${n}"></canvas>`;
      el.appendChild(f);
    });
  }
  const sk = maxAbs(ks), sg = maxAbs(gs);
  ks.forEach((kv, n) => {
    const cs = el.children[n].querySelectorAll("canvas");
    paint(cs[0], kv, side, sk, true); paint(cs[1], gs[n], side, sg, true);
  });
  $("s-kernels").textContent = `colour: kₙ ±${fmt(sk)}, ∂J/∂kₙ ±${fmt(sg)} (blue − · white 0 · red +)`;
}

function titles(f) {
  const set = (id, key) => { if (f[key]) $(id).textContent = f[key]; };
  set("t-input", "input"); set("t-conv", "conv"); set("t-pooled", "pooled"); set("t-hidden", "hidden");
  set("t-probs", "probs"); set("t-ymd", "y_minus_d"); set("t-dy3", "dL_dy3"); set("t-kernels", "kernels"); set("t-grads", "grad_kernels");
}

function loadModel() {
  return fetch("/api/model").then((r) => r.json()).then((m) => {
    if (!m.loaded) { state.model = null; $("status").textContent = "no weights yet: waiting for the training run's first snapshot"; return; }
    state.model = m;
    titles(m.formulas);
    if ($("labels").children.length !== m.config.classes + 1) labelButtons(m.config.classes);
    $("status").textContent = `${m.source} · ${m.config.n_kernels} kernels ${m.config.ksize}×${m.config.ksize}, ${m.config.conv_act} conv, ${m.config.pooling} pooling, φ = ${m.config.act}`;
  }).catch((e) => { $("status").textContent = "cannot reach the server: " + e; });
}

// ---------- training view ----------
function chart(id, series, yMin, yMax, xMax, yLabel) {
  const c = $(id), ctx = c.getContext("2d"), W = c.width, H = c.height, L = 46, R = 10, T = 10, B = 26;
  ctx.clearRect(0, 0, W, H);
  const X = (x) => L + (W - L - R) * x / (xMax || 1), Y = (y) => T + (H - T - B) * (yMax - y) / (yMax - yMin || 1);
  ctx.strokeStyle = "#ddd"; ctx.fillStyle = "#555"; ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const v = yMin + (yMax - yMin) * i / 4;
    ctx.beginPath(); ctx.moveTo(L, Y(v)); ctx.lineTo(W - R, Y(v)); ctx.stroke();
    ctx.textAlign = "right"; ctx.fillText(yLabel(v), L - 4, Y(v) + 4);
  }
  ctx.textAlign = "center";
  const step = Math.max(1, Math.ceil(xMax / 10));
  for (let e = 0; e <= xMax; e += step) ctx.fillText(String(e), X(e), H - 10);
  ctx.fillText("epoch", W - 30, H - 10);
  ctx.save(); ctx.beginPath(); ctx.rect(L, T - 4, W - L - R, H - T - B + 8); ctx.clip();
  series.forEach((s) => {
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 1.5;
    if (s.line) {
      ctx.beginPath();
      s.points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
      ctx.stroke();
    }
    if (s.dots) s.points.forEach(([x, y]) => { ctx.beginPath(); ctx.arc(X(x), Y(y), 3.5, 0, 7); ctx.fill(); });
  });
  ctx.restore();
  let lx = L + 8;
  series.forEach((s) => {
    ctx.fillStyle = s.color; ctx.textAlign = "left";
    ctx.fillRect(lx, T + 4, 10, 3); ctx.fillText(s.label, lx + 14, T + 10); lx += 20 + ctx.measureText(s.label).width + 10;
  });
  ctx.lineWidth = 1;
}

let lastVersion = -1;
function pollTrain() {
  fetch("/api/train/status").then((r) => r.json()).then((s) => {
    if (!s.active) return;
    if (s.version !== lastVersion) { lastVersion = s.version; renderTrain(s); }
    if (!s.done) setTimeout(pollTrain, 1000);
  }).catch(() => { $("train-progress").textContent += " (server gone)"; });
}

function renderTrain(s) {
  const E = s.recipe.epochs, st = s.step, h = s.history;
  let p = st ? `epoch ${st.epoch}/${E} · step ${st.step}/${st.steps} · running loss ${st.loss.toFixed(4)} · train accuracy ${(100 * st.accuracy).toFixed(2)}% · ${st.images_per_second.toFixed(0)} images/s` : "waiting for the first step…";
  p += ` · ${s.train_images} training images, batch ${s.recipe.batch}, lr ${s.recipe.lr}, momentum ${s.recipe.momentum}`;
  if (s.done) p = (s.error ? `stopped: ${s.error}` : `done: ${h.length} epochs`) + " · " + p;
  $("train-progress").textContent = p;
  const lossMax = Math.max(0.1, ...s.points.map((q) => q[1]), ...h.map((e) => e.train_loss));
  chart("loss-chart", [
    { label: "running loss", color: "#2c6fbb", line: true, points: s.points.map((q) => [q[0], q[1]]) },
    { label: "epoch mean", color: "#c0392b", dots: true, points: h.map((e) => [e.epoch, e.train_loss]) },
  ], 0, lossMax * 1.05, E, (v) => v.toFixed(2));
  const accs = [{ label: "running train", color: "#2c6fbb", line: true, points: s.points.map((q) => [q[0], q[2]]) },
    { label: "train", color: "#7f8c9a", dots: true, points: h.map((e) => [e.epoch, e.train_accuracy]) }];
  if (h.some((e) => e.val_accuracy !== null)) accs.push({ label: "val", color: "#27ae60", dots: true, line: true, points: h.filter((e) => e.val_accuracy !== null).map((e) => [e.epoch, e.val_accuracy]) });
  if (h.some((e) => e.test_accuracy !== null)) accs.push({ label: "test", color: "#c0392b", dots: true, line: true, points: h.filter((e) => e.test_accuracy !== null).map((e) => [e.epoch, e.test_accuracy]) });
  const lo = Math.min(0.9, ...s.points.map((q) => q[2]).slice(Math.floor(s.points.length / 10)));
  chart("acc-chart", accs, Math.max(0, Math.floor(lo * 10) / 10), 1, E, (v) => (100 * v).toFixed(0) + "%");
  if (s.kernels.length) {
    maps("train-kernels", s.kernels, s.net.ksize, { signed: true, caption: (n) => "k" + n });
    $("train-kernels-at").textContent = `at epoch ${s.kernels_at.toFixed(2)}; colour ±${fmt(maxAbs(s.kernels))}, blue − · white 0 · red +`;
  }
}

// ---------- views ----------
function show(view) {
  $("draw-view").classList.toggle("hidden", view !== "draw");
  $("train-view").classList.toggle("hidden", view !== "train");
  $("tab-draw").classList.toggle("on", view === "draw");
  $("tab-train").classList.toggle("on", view === "train");
  if (view === "draw") loadModel().then(() => { if (state.hasInk) request(); });
}
$("tab-draw").addEventListener("click", () => show("draw"));
$("tab-train").addEventListener("click", () => show("train"));

loadModel();
fetch("/api/train/status").then((r) => r.json()).then((s) => {
  if (!s.active) return;
  $("tab-train").classList.remove("hidden");
  pollTrain();
  if (location.pathname === "/train") show("train");
}).catch(() => {});
