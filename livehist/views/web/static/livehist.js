// livehist web view: binary frames from /ws drawn on canvases (no libraries, no CDN).
// Frames: uint32 LE header length, JSON header, padding to 8, then the array (see frames.py):
// spectra float64; images uint8/16/32 (counts, the smallest type that holds them) or float32.
"use strict";

const LH = (window.livehist = {
  info: null, configs: {}, status: {}, metadata: {}, data: {}, panels: [],
  frames: 0, paints: {}, latencies: [], offsets: [], lastError: "", dragging: null,
});
const SEP = "\u0000";
const $ = (id) => document.getElementById(id);

// --- frames ------------------------------------------------------------------------------
const TYPED = { f8: Float64Array, f4: Float32Array, u4: Uint32Array, u2: Uint16Array, u1: Uint8Array };
function decode(buf) {
  const n = new DataView(buf).getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
  let array = null;
  if (header.dtype) {
    const start = 4 + n + ((8 - ((4 + n) % 8)) % 8);
    const count = header.shape.reduce((a, b) => a * b, 1);
    array = new TYPED[header.dtype](buf, start, count);
  }
  return [header, array];
}

function onFrame(buf) {
  const [h, array] = decode(buf);
  LH.frames++;
  LH.offsets.push(h.t_sent * 1000 - Date.now());
  if (LH.offsets.length > 64) LH.offsets.shift();
  if (h.kind === "config") {
    const old = LH.configs[h.device];
    LH.configs[h.device] = h;
    if (!old || JSON.stringify(old.histograms) !== JSON.stringify(h.histograms)) build();
  } else if (h.kind === "status") {
    LH.status[h.device] = h;
    markDevice(h.device, "status");
  } else if (h.kind === "metadata") {
    LH.metadata[h.device] = h;
    markDevice(h.device, "metadata");
  } else {
    LH.data[h.device + SEP + h.name] = { h, array, painted: false, recv: performance.timeOrigin + performance.now() };
    markDevice(h.device, h.name);
  }
}

function markDevice(device, what) {
  for (const p of LH.panels) if (p.device === device && (p.name === what || p.kind === what)) p.dirty = true;
}

// --- the socket, reconnecting ------------------------------------------------------------
function connect() {
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
    location.pathname.replace(/[^/]*$/, "") + "ws";
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => setBadge("link", "live", "ok");
  ws.onmessage = (ev) => onFrame(ev.data);
  ws.onclose = () => {
    setBadge("link", "disconnected: retrying", "bad");
    setTimeout(connect, 1000);
  };
}

function setBadge(id, text, cls) {
  const el = $(id);
  el.textContent = text;
  el.className = "badge " + (cls || "");
}

function clockOffset() { return LH.offsets.length ? Math.max(...LH.offsets) : 0; }
function ageOf(tPub) { return tPub ? (Date.now() + clockOffset()) / 1000 - tPub : null; }

// --- layout -> panels --------------------------------------------------------------------
function build() {
  const lay = LH.info.layout;
  const grid = $("grid");
  grid.style.gridTemplateColumns = `repeat(${lay.columns}, minmax(0, 1fr))`;
  const named = new Set(lay.panels.filter((p) => !["status", "metadata", "histograms"].includes(p.show))
    .map((p) => p.device + SEP + p.show));
  const wanted = [];
  for (const p of lay.panels) {
    if (p.show === "status" || p.show === "metadata") wanted.push({ ...p, kind: p.show, name: p.show });
    else if (p.show === "histograms") {
      const cfg = LH.configs[p.device];
      for (const h of cfg ? cfg.histograms : []) {
        if (named.has(p.device + SEP + h.name)) continue;
        wanted.push({ ...p, kind: "histogram", name: h.name, scale: h.kind === "image" || h.kind === "pixel_tof" ? "log" : p.scale });
      }
    } else wanted.push({ ...p, kind: "histogram", name: p.show });
  }
  const keep = {};
  for (const old of LH.panels) keep[old.device + SEP + old.name] = old;
  grid.textContent = "";
  LH.panels = wanted.map((w) => {
    const old = keep[w.device + SEP + w.name];
    const panel = old && old.kind === w.kind ? old : makePanel(w);
    panel.el.style.gridColumn = `span ${w.width}`;
    panel.dirty = true;
    grid.appendChild(panel.el);
    return panel;
  });
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function makePanel(w) {
  const p = { device: w.device, name: w.name, kind: w.kind, scale: w.scale, dirty: true };
  p.title = el("span", {}, w.kind === "histogram" ? w.name : w.kind);
  p.total = el("span", { class: "total" });
  p.el = el("section", { class: "panel", "data-device": w.device, "data-name": w.name, "data-kind": w.kind },
    el("h2", {}, p.title, el("span", { class: "dev" }, w.device), p.total));
  if (w.kind === "status") makeStatus(p);
  else if (w.kind === "metadata") makeMetadata(p);
  else makeHistogram(p);
  return p;
}

// --- status: state, status, counters, age, buttons ---------------------------------------
const COUNTER_LABELS = [["EventRate", "events/s"], ["EventCount", "events"], ["ElapsedTime", "s"],
  ["MessageCount", "messages"], ["DroppedMessageCount", "dropped messages"],
  ["BadMessageCount", "bad messages"], ["UpdateCounter", "publishes"]];

function makeStatus(p) {
  p.state = el("span", { class: "state" }, "?");
  p.title.replaceWith(p.state);
  p.statusText = el("div", { class: "status-text" });
  p.cells = {};
  const table = el("table", { class: "counters" });
  for (const [name, unit] of COUNTER_LABELS) {
    p.cells[name] = el("td", { class: "v", "data-counter": name }, "-");
    table.append(el("tr", {}, el("td", {}, name), p.cells[name], el("td", {}, unit)));
  }
  p.age = el("td", { class: "v", "data-counter": "age" }, "-");
  table.append(el("tr", {}, el("td", {}, "data age"), p.age, el("td", {}, "s")));
  p.error = el("span", { class: "error" });
  const tools = el("div", { class: "tools" });
  for (const cmd of ["Start", "Stop", "Reset"]) {
    const b = el("button", { "data-command": cmd, onclick: () => command(p, cmd) }, cmd);
    if (!LH.info.control) { b.disabled = true; b.title = "read-only: start livehist web with --control-token"; }
    tools.append(b);
  }
  tools.append(p.error);
  p.el.append(p.statusText, table, tools);
  p.draw = () => {
    const s = LH.status[p.device];
    if (!s) return;
    p.state.textContent = s.state;
    p.state.className = "state " + s.state;
    p.statusText.textContent = s.status || "";
    for (const [name] of COUNTER_LABELS) {
      const v = s.counters[name];
      p.cells[name].textContent = v === undefined || v === null ? "-" :
        name === "EventRate" || name === "ElapsedTime" ? fmt(v) : Number(v).toLocaleString("en");
    }
  };
}

function makeMetadata(p) {
  p.state = el("span", { class: "state" }, "?");
  p.title.after(p.state);
  p.table = el("table", { class: "counters" });
  p.el.append(p.table);
  p.draw = () => {
    const m = LH.metadata[p.device];
    if (!m) return;
    p.state.textContent = m.state;
    p.state.className = "state " + m.state;
    p.table.textContent = "";
    const md = m.metadata || {};
    for (const [k, label] of [["Proposal", "proposal"], ["Title", "title"], ["SampleName", "sample"], ["DatasetName", "dataset"]]) {
      p.table.append(el("tr", {}, el("td", {}, label), el("td", { "data-meta": label }, md[k] == null ? "-" : String(md[k]))));
    }
    if (m.state === "DOWN") p.table.append(el("tr", {}, el("td", {}, "status"), el("td", {}, m.status)));
  };
}

async function post(path, body) {
  const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json",
    "X-Livehist-Token": $("token").value }, body: JSON.stringify(body) });
  let answer = {};
  try { answer = await r.json(); } catch (e) { answer = { error: `HTTP ${r.status}` }; }
  if (!r.ok || !answer.ok) throw new Error(answer.error || `HTTP ${r.status}`);
  return answer;
}

function showError(p, text) {
  LH.lastError = text;
  p.error.textContent = text;
  p.error.className = text ? "error" : "ok";
  const m = $("message");
  m.textContent = text;
  m.className = text ? "shown" : "";
}

async function command(p, cmd) {
  try {
    await post("api/command", { device: p.device, command: cmd });
    showError(p, "");
    p.error.textContent = `${cmd}: done`;
  } catch (e) { showError(p, e.message); }
}

// --- histograms: spectra and images ------------------------------------------------------
function makeHistogram(p) {
  p.canvas = el("canvas", { height: 260 });
  const scale = el("select", { "data-scale": "", onchange: (e) => { p.scale = e.target.value; p.dirty = true; } },
    el("option", { value: "linear" }, "linear"), el("option", { value: "log" }, "log"));
  scale.value = p.scale;
  p.scaleSelect = scale;
  p.error = el("span", { class: "error" });
  p.tools = el("div", { class: "tools" }, el("label", {}, "scale ", scale), p.error);
  p.el.append(p.tools, p.canvas);
  p.draw = () => drawHistogram(p);
  p.canvas.addEventListener("mousedown", (e) => roiStart(p, e));
}

// one pair of window listeners for every panel (per panel, each Configure's new panels added
// a pair that outlived them): the drag follows the panel it began on
window.addEventListener("mousemove", (e) => { if (LH.dragging) roiMove(LH.dragging, e); });
window.addEventListener("mouseup", (e) => {
  const p = LH.dragging;
  LH.dragging = null;
  if (p) roiEnd(p, e);
});

function histConfig(p) {
  const cfg = LH.configs[p.device];
  return cfg ? cfg.histograms.find((h) => h.name === p.name) : null;
}

function drawHistogram(p) {
  const d = LH.data[p.device + SEP + p.name];
  const hc = histConfig(p);
  if (hc && hc.kind === "image" && !p.roiTools) addRoiTools(p);
  if (!d) { p.total.textContent = hc ? "waiting for data" : "not on the device"; return; }
  p.total.textContent = `total ${d.h.total.toLocaleString("en")}`;
  if (d.h.kind === "image") drawImage(p, d, hc); else drawSpectrum(p, d, hc);
  if (!d.painted) {
    d.painted = true;
    const key = p.device + SEP + p.name;
    LH.paints[key] = (LH.paints[key] || 0) + 1;
    if (d.h.t_pub) {
      const now = performance.timeOrigin + performance.now();  // epoch ms, like t_pub from the device
      LH.latencies.push({ key, kind: d.h.kind, ms: now - d.h.t_pub * 1000,
        server: (d.h.t_sent - d.h.t_pub) * 1000, page: now - d.recv });
      if (LH.latencies.length > 20000) LH.latencies.splice(0, 10000);
    }
    LH.shown = Math.max(LH.shown || 0, d.h.t_pub || 0);
    const st = LH.panels.find((q) => q.kind === "status" && q.device === p.device);
    if (st) st.tPub = Math.max(st.tPub || 0, d.h.t_pub || 0);
  }
}

function fitCanvas(c, height) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(100, Math.round(c.clientWidth * dpr)), h = Math.round(height * dpr);
  if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
  const ctx = c.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return [ctx, w / dpr, h / dpr];
}

function fmt(v) {
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e5 || a < 1e-2) return v.toExponential(1).replace("e+", "e");
  return String(Math.round(v * 100) / 100);
}

function ticks(lo, hi, n) {
  const span = hi - lo || 1, step0 = span / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
  return out;
}

function drawSpectrum(p, d, hc) {
  const [ctx, W, H] = fitCanvas(p.canvas, 260);
  const y = d.array, n = y.length, log = p.scale === "log";
  const edges = hc && hc.edges && hc.edges.length === n + 1 ? hc.edges : null;
  const x0 = edges ? edges[0] : 0, x1 = edges ? edges[n] : n;
  let max = 0, minPos = Infinity;
  for (let i = 0; i < n; i++) { if (y[i] > max) max = y[i]; if (y[i] > 0 && y[i] < minPos) minPos = y[i]; }
  const L = 62, R = 10, T = 8, B = 34, pw = W - L - R, ph = H - T - B;
  let ylo, yhi, ty;
  if (log) {
    ylo = Math.floor(Math.log10(minPos === Infinity ? 1 : minPos)); yhi = Math.max(ylo + 1, Math.ceil(Math.log10(Math.max(max, 1)) + 0.05));
    ty = (v) => T + ph - ((Math.log10(Math.max(v, Math.pow(10, ylo))) - ylo) / (yhi - ylo)) * ph;
  } else {
    ylo = 0; yhi = max > 0 ? max * 1.05 : 1;
    ty = (v) => T + ph - (v / yhi) * ph;
  }
  const tx = (v) => L + ((v - x0) / (x1 - x0 || 1)) * pw;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "11px system-ui, sans-serif";
  ctx.strokeStyle = "#e5e7eb"; ctx.fillStyle = "#374151"; ctx.lineWidth = 1;
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (const v of ticks(x0, x1, 6)) {
    const X = tx(v); ctx.beginPath(); ctx.moveTo(X, T); ctx.lineTo(X, T + ph); ctx.stroke();
    ctx.fillText(fmt(v), X, T + ph + 3);
  }
  ctx.fillText(edges ? `time of flight (${hc.unit})` : "bin", L + pw / 2, T + ph + 18);
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  const yt = log ? Array.from({ length: yhi - ylo + 1 }, (_, i) => Math.pow(10, ylo + i)) : ticks(0, yhi, 5);
  for (const v of yt) {
    const Y = ty(v); ctx.beginPath(); ctx.moveTo(L, Y); ctx.lineTo(L + pw, Y); ctx.stroke();
    ctx.fillText(fmt(v), L - 4, Y);
  }
  ctx.save(); ctx.translate(12, T + ph / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = "center";
  ctx.fillText("counts", 0, 0); ctx.restore();
  ctx.strokeStyle = "#1d4ed8"; ctx.lineWidth = 1.2; ctx.beginPath();
  for (let i = 0; i < n; i++) {
    const a = tx(edges ? edges[i] : i), b = tx(edges ? edges[i + 1] : i + 1), Y = ty(y[i]);
    if (i === 0) ctx.moveTo(a, Y); else ctx.lineTo(a, Y);
    ctx.lineTo(b, Y);
  }
  ctx.stroke();
  ctx.strokeStyle = "#9ca3af"; ctx.strokeRect(L, T, pw, ph);
}

// viridis, 9 anchors interpolated to 256 entries
const VIRIDIS = (() => {
  const a = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
  const lut = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const f = (i / 255) * (a.length - 1), k = Math.min(a.length - 2, Math.floor(f)), t = f - k;
    for (let c = 0; c < 3; c++) lut[i * 3 + c] = a[k][c] + (a[k + 1][c] - a[k][c]) * t;
  }
  return lut;
})();

const LOG1P = (() => { const t = new Float32Array(65536); for (let i = 0; i < 65536; i++) t[i] = Math.log10(1 + i); return t; })();
let RGBA = null;
function rgbaLut() {  // one 32-bit RGBA word per colour (little-endian: bytes R, G, B, A)
  if (!RGBA) {
    RGBA = new Uint32Array(256);
    const b = new Uint8Array(RGBA.buffer);
    for (let i = 0; i < 256; i++) b.set([VIRIDIS[i * 3], VIRIDIS[i * 3 + 1], VIRIDIS[i * 3 + 2], 255], i * 4);
  }
  return RGBA;
}

let BAR = null;
function colourBar() {
  if (!BAR) {
    BAR = document.createElement("canvas"); BAR.width = 1; BAR.height = 256;
    const c = BAR.getContext("2d"), img = c.createImageData(1, 256);
    for (let i = 0; i < 256; i++) {
      const k = (255 - i) * 3;
      img.data.set([VIRIDIS[k], VIRIDIS[k + 1], VIRIDIS[k + 2], 255], i * 4);
    }
    c.putImageData(img, 0, 0);
  }
  return BAR;
}

function drawImage(p, d, hc) {
  const [ny, nx] = d.h.shape, v = d.array, log = p.scale === "log";
  let max = 0;
  for (let i = 0; i < v.length; i++) if (v[i] > max) max = v[i];
  if (!p.off || p.off.width !== nx || p.off.height !== ny) {
    p.off = document.createElement("canvas"); p.off.width = nx; p.off.height = ny;
    p.pixels = p.off.getContext("2d").createImageData(nx, ny);
  }
  const top = log ? Math.log10(1 + max) : max, k = top > 0 ? 255 / top : 0;
  const px = new Uint32Array(p.pixels.data.buffer), lut = rgbaLut();
  for (let i = 0; i < v.length; i++) {  // counts: log10(1 + n) from a table below 65536
    const n = v[i] > 0 ? v[i] : 0;
    const t = log ? (n < 65536 ? LOG1P[n | 0] : Math.log10(1 + n)) : n;
    px[i] = lut[Math.min(255, Math.round(t * k))];
  }
  p.off.getContext("2d").putImageData(p.pixels, 0, 0);
  const width = p.canvas.clientWidth || 400, bar = 70;
  // one scale for both axes, but never thinner than MIN_SIDE pixels: a 1xN image stays visible
  // (and an ROI can be drawn on it), stretched across its short side
  const side = Math.min(width - bar, 420), s1 = side / Math.max(nx, ny), MIN_SIDE = 24;
  const sx = Math.max(s1, MIN_SIDE / nx), sy = Math.max(s1, MIN_SIDE / ny);
  const [ctx, W, H] = fitCanvas(p.canvas, Math.max(140, ny * sy + 10));
  ctx.clearRect(0, 0, W, H);
  ctx.imageSmoothingEnabled = false;
  p.box = { x: 4, y: 4, w: nx * sx, h: ny * sy, nx, ny };
  ctx.drawImage(p.off, p.box.x, p.box.y, p.box.w, p.box.h);
  // colour bar: one 1x256 strip made once, stretched
  const bx = p.box.x + p.box.w + 12, bh = Math.max(p.box.h, 64);  // room for its three labels
  ctx.drawImage(colourBar(), bx, p.box.y, 12, bh);
  ctx.fillStyle = "#374151"; ctx.font = "11px system-ui, sans-serif"; ctx.textAlign = "left";
  ctx.textBaseline = "top"; ctx.fillText(fmt(max), bx + 15, p.box.y);
  ctx.textBaseline = "bottom"; ctx.fillText("0", bx + 15, p.box.y + bh);
  ctx.textBaseline = "middle"; ctx.fillText(log ? "log" : "lin", bx + 15, p.box.y + bh / 2);
  // ROIs of this image, and the one being drawn
  const f = hc && hc.factor ? hc.factor : 1, cfg = LH.configs[p.device];
  ctx.lineWidth = 1.5; ctx.font = "11px system-ui, sans-serif"; ctx.textBaseline = "bottom";
  for (const h of cfg && hc && hc.kind === "image" ? cfg.histograms : []) {
    if (h.kind !== "roi" || !h.spec.roi || !h.spec.roi.rows) continue;
    const [r0, r1] = h.spec.roi.rows, [c0, c1] = h.spec.roi.cols;
    ctx.strokeStyle = "#f43f5e"; ctx.fillStyle = "#f43f5e";
    ctx.strokeRect(p.box.x + (c0 / f) * sx, p.box.y + (r0 / f) * sy, ((c1 - c0) / f) * sx, ((r1 - r0) / f) * sy);
    ctx.fillText(h.name, p.box.x + (c0 / f) * sx + 2, p.box.y + (r0 / f) * sy);
  }
  if (p.drag) {
    ctx.strokeStyle = "#fff"; ctx.setLineDash([4, 3]);
    ctx.strokeRect(p.drag.x0, p.drag.y0, p.drag.x1 - p.drag.x0, p.drag.y1 - p.drag.y0);
    ctx.setLineDash([]);
  }
}

// --- drawing an ROI with the mouse -> Configure on the device ----------------------------
function addRoiTools(p) {
  const used = new Set(LH.configs[p.device].histograms.map((h) => h.name));
  let k = 1; while (used.has(`roi_${k}`)) k++;
  p.roiName = el("input", { size: 10, value: `roi_${k}`, "data-roi-name": "" });
  p.roiTools = el("span", {}, "draw an ROI; name ", p.roiName);
  if (!LH.info.control) p.roiTools.title = "read-only: start livehist web with --control-token";
  p.tools.insertBefore(p.roiTools, p.error);
}

function canvasPoint(p, e) {
  const r = p.canvas.getBoundingClientRect();
  return [e.clientX - r.left, e.clientY - r.top];
}

function roiStart(p, e) {
  const hc = histConfig(p);
  if (!p.box || !hc || hc.kind !== "image") return;
  const [x, y] = canvasPoint(p, e);
  if (x < p.box.x || y < p.box.y || x > p.box.x + p.box.w || y > p.box.y + p.box.h) return;
  p.drag = { x0: x, y0: y, x1: x, y1: y };
  LH.dragging = p;
  e.preventDefault();
}

function roiMove(p, e) {
  if (!p.drag) return;
  const [x, y] = canvasPoint(p, e);
  p.drag.x1 = Math.min(Math.max(x, p.box.x), p.box.x + p.box.w);
  p.drag.y1 = Math.min(Math.max(y, p.box.y), p.box.y + p.box.h);
  p.dirty = true;
}

async function roiEnd(p, e) {
  if (!p.drag) return;
  const g = p.drag; p.drag = null; p.dirty = true;
  const hc = histConfig(p), f = hc.factor || 1, b = p.box, sx = b.w / b.nx, sy = b.h / b.ny;
  const [ny, nx] = hc.shape;
  const toPix = (v, o, n, s) => Math.min(n, Math.max(0, Math.round(((v - o) / s) * f)));
  const rows = [toPix(Math.min(g.y0, g.y1), b.y, ny, sy), toPix(Math.max(g.y0, g.y1), b.y, ny, sy)];
  const cols = [toPix(Math.min(g.x0, g.x1), b.x, nx, sx), toPix(Math.max(g.x0, g.x1), b.x, nx, sx)];
  if (rows[1] <= rows[0] || cols[1] <= cols[0]) return;  // a click, not a rectangle
  const name = p.roiName.value.trim();
  try {
    await post("api/roi", { device: p.device, image: p.name, name, rows, cols });
    showError(p, "");
    p.error.textContent = `${name}: rows ${rows[0]}-${rows[1]}, cols ${cols[0]}-${cols[1]} configured`;
    p.roiTools.remove(); p.roiTools = null;  // a fresh default name next time
  } catch (err) { showError(p, err.message); }
}

// --- the paint loop ----------------------------------------------------------------------
let lastAgeText = 0;
function paint() {
  for (const p of LH.panels) {
    if (p.dirty && p.draw) { p.dirty = false; p.draw(); }
  }
  const now = performance.now();
  if (now - lastAgeText > 250) {
    lastAgeText = now;
    const age = ageOf(LH.shown);
    setBadge("age", age === null ? "data age: -" : `data age: ${age.toFixed(1)} s`,
      age === null ? "" : age < 2 ? "ok" : age < 10 ? "warn" : "bad");
    for (const p of LH.panels) {
      if (p.kind !== "status") continue;
      const a = ageOf(p.tPub);
      p.age.textContent = a === null ? "-" : a.toFixed(1);
    }
  }
  requestAnimationFrame(paint);
}

async function main() {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token) {  // out of the address bar and the history (it may be shared or logged), before any request
    sessionStorage.setItem("livehist-token", token);
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
  LH.info = await (await fetch("api/info")).json();
  document.title = $("title").textContent = LH.info.layout.title;
  if (LH.info.control) {
    $("tokenbox").hidden = false;
    $("token").value = token || sessionStorage.getItem("livehist-token") || "";
    $("token").addEventListener("change", () => sessionStorage.setItem("livehist-token", $("token").value));
    setBadge("mode", "control", "warn");
  } else setBadge("mode", "read-only", "");
  build();
  window.addEventListener("resize", () => LH.panels.forEach((p) => (p.dirty = true)));
  connect();
  requestAnimationFrame(paint);
}
main();
