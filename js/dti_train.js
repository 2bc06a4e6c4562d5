// DTI Train, live: draws the loss curve and each encoder's vector norm against m* on the node
// while it trains, from the dti.* messages the Python node sends to the client that queued it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const CHART_H = 170;
const AXIS_W = 52;
const STOPPED_COLOR = "#ff9040";
const COLORS = { clip_l: "#e8643c", clip_g: "#3c8ce8", clip_h: "#3cb45a" };
// A run's chart data: { steps, loss: [], norms: {key: []}, mStar: {}, done, running, stopped: {kind, step, checkpoint} }.
// It belongs to the node object that draws it (charts): a node inside a subgraph knows only its inner id
// (3), which can repeat in other graphs, while the server names it by its execution id ("5:3"). runs maps the
// execution ids of the messages to the same objects.
const charts = new WeakMap();
const runs = new Map();

function newState() {
  return { steps: 0, start: 0, loss: [], norms: {}, mStar: {}, done: null, updates: 0,
           running: false, stopped: null, name: null, saveEvery: 0, note: null };
}

// The node an execution id names: "12" at the top, "5:3" for node 3 in the subgraph that node 5
// instantiates, "5:3:7" deeper. The walk starts at the root graph whichever graph the canvas shows.
function nodeFor(execId) {
  let graph = app.graph?.rootGraph ?? app.graph;
  let node = null;
  for (const part of String(execId).split(":")) {
    if (!graph) return null;
    node = graph.getNodeById?.(Number(part)) ?? graph.getNodeById?.(part) ?? null;
    graph = node?.subgraph;
  }
  return node;
}

// The data for a message's node, bound to that node. A node without a live run adopts it: after a page
// reload mid-run, the restored points keep growing.
function stateFor(execId) {
  const key = String(execId);
  const node = nodeFor(key);
  const train = node?.type === "DTITrain" ? node : null;
  let s = runs.get(key) ?? (train && charts.get(train)) ?? newState();
  runs.set(key, s);
  if (train) charts.set(train, s);
  return s;
}

// The last run's history is kept in the node's properties (saved with the workflow, which the
// frontend restores on a page reload), thinned to at most KEEP_POINTS points per series.
const HISTORY_PROP = "dti_history";
const KEEP_POINTS = 400;

function thin(pts) {
  if (pts.length <= KEEP_POINTS) return pts.slice();
  const out = [];
  for (let i = 0; i < KEEP_POINTS; i++) out.push(pts[Math.round((i * (pts.length - 1)) / (KEEP_POINTS - 1))]);
  return out;
}

function remember(node, s) {
  if (!s) return;
  const norms = Object.fromEntries(Object.entries(s.norms).map(([k, v]) => [k, thin(v)]));
  node.properties ??= {};
  node.properties[HISTORY_PROP] = {
    steps: s.steps, start: s.start, loss: thin(s.loss), norms, mStar: s.mStar, done: s.done,
    stopped: s.stopped, name: s.name, saveEvery: s.saveEvery, updates: s.updates,
  };
}

// A node configured from a saved workflow (page reload, opening a file) shows its last run again.
function restore(node) {
  if (charts.get(node)?.running) return; // a live run's messages are newer
  const h = node.properties?.[HISTORY_PROP];
  if (!h || !Array.isArray(h.loss)) {
    charts.delete(node);
    return;
  }
  charts.set(node, { steps: h.steps || 0, start: h.start || 0, loss: h.loss, norms: h.norms || {}, mStar: h.mStar || {},
                     done: h.done ?? null, updates: h.updates || 0, running: false, stopped: h.stopped ?? null,
                     name: h.name ?? null, saveEvery: h.saveEvery || 0, note: null, restored: true });
}

// The frontend keeps the open workflow (restored on a page reload) when its change tracker sees the
// graph change, which it checks on clicks and key presses: a property set from a message would wait
// for the next click. Ask it to look now (captureCanvasState on 1.5x, checkState before).
function persist() {
  const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker;
  try {
    if (typeof tracker?.captureCanvasState === "function") tracker.captureCanvasState();
    else tracker?.checkState?.();
  } catch (e) {
    console.debug("DTI: could not mark the workflow changed", e);
  }
}

function redraw(execId) {
  const node = nodeFor(execId);
  if (node?.type !== "DTITrain") return;
  remember(node, runs.get(String(execId)));
  node.setDirtyCanvas(true, true);
  // The Vue node renderer ("Nodes 2.0") draws the chart on a canvas of its own, only when asked.
  node.widgets?.find((w) => w.name === "dti_chart")?.triggerDraw?.();
}

// Listeners at module top level, so they exist before the first message arrives.
api.addEventListener("dti.start", ({ detail }) => {
  const s = stateFor(detail.node);
  const node = nodeFor(detail.node);
  const saveEvery = Number(node?.widgets?.find((w) => w.name === "save_every")?.value ?? 0);
  Object.assign(s, { steps: detail.steps, start: detail.start || 0, loss: [], norms: {}, mStar: detail.m_star || {},
                    done: null, updates: 0, running: true, stopped: null, name: detail.name, saveEvery, note: null });
  redraw(detail.node);
});

api.addEventListener("dti.progress", ({ detail }) => {
  const s = stateFor(detail.node);
  s.steps = detail.steps;
  s.loss.push([detail.step, detail.loss]);
  for (const [k, v] of Object.entries(detail.norms || {})) (s.norms[k] ??= []).push([detail.step, v]);
  s.updates += 1;
  redraw(detail.node);
});

api.addEventListener("dti.done", ({ detail }) => {
  const s = stateFor(detail.node);
  s.done = detail;
  s.running = false;
  redraw(detail.node);
  persist();
  if (!detail.reused) refreshFileLists(); // the new file, in every resume_from / DTI Load Embedding list
});

// After a run wrote files (an embedding, NAME-stepK checkpoints), refresh the nodes' file lists as
// the R key does, so they can be picked at once. Several writes in a row refresh once.
let refreshTimer = null;
export function refreshFileLists() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(async () => {
    try {
      await app.refreshComboInNodes();
    } catch (e) {
      for (const s of runs.values()) s.note = "press R to see new files in the lists";
    }
  }, 250);
}

// The newest NAME-stepK checkpoint of this run (as resume_from lists it), or null.
async function lastCheckpoint(name, upTo) {
  try {
    const res = await api.fetchApi("/embeddings");
    const names = await res.json();
    const prefix = `${name}-step`;
    let best = null;
    for (const n of names) {
      if (!n.startsWith(prefix)) continue;
      const k = Number(n.slice(prefix.length));
      if (Number.isInteger(k) && k > 0 && k <= upTo && (!best || k > best.step)) best = { step: k, file: `${n}.safetensors` };
    }
    return best;
  } catch (e) {
    return null;
  }
}

// Cancel (or an error) stops a run between dti.progress messages: say so on the chart, name the
// checkpoint to resume from, and list it in resume_from without a manual refresh.
async function stopped(kind, detail) {
  for (const [id, s] of runs) {
    if (!s.running) continue;
    s.running = false;
    const last = s.loss.length ? s.loss[s.loss.length - 1][0] : s.start || 0;
    s.stopped = { kind, step: last, message: detail?.exception_message || "", checkpoint: null };
    redraw(id);
    persist();
    if (s.saveEvery > 0 && s.name) {
      s.stopped.checkpoint = await lastCheckpoint(s.name, last + 1);
      redraw(id);
      persist();
      if (s.stopped.checkpoint) refreshFileLists();
    }
  }
}
api.addEventListener("execution_interrupted", ({ detail }) => stopped("cancelled", detail));
api.addEventListener("execution_error", ({ detail }) => stopped("failed", detail));

// Steps xMin..xMax span the full width.
function drawSeries(ctx, pts, x0, y0, w, h, xMin, xMax, yMin, yMax, color) {
  if (!pts.length) return;
  const span = yMax - yMin || 1;
  const toX = (x) => x0 + (w * (x - xMin)) / Math.max(1, xMax - xMin);
  const toY = (y) => y0 + h - (h * (Math.min(yMax, Math.max(yMin, y)) - yMin)) / span;
  ctx.strokeStyle = color;
  ctx.fillStyle = color;
  ctx.lineWidth = 1.5;
  if (pts.length === 1) {
    ctx.beginPath();
    ctx.arc(toX(pts[0][0]), toY(pts[0][1]), 2.5, 0, 2 * Math.PI);
    ctx.fill();
    return;
  }
  ctx.beginPath();
  pts.forEach(([x, y], i) => {
    if (i === 0) ctx.moveTo(toX(x), toY(y));
    else ctx.lineTo(toX(x), toY(y));
  });
  ctx.stroke();
}

// Numbers for the axes: short, whatever their scale.
function fmt(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(1);
  return a >= 100 ? v.toFixed(0) : v.toPrecision(3);
}

// The chart lives in its own canvas widget, last on the node, so the node's layout reserves its
// height (drawing in onDrawForeground at the node's bottom edge put it underneath the last widgets:
// the frontend stretches the multiline custom_templates box to fill all free space).
// Layout, top to bottom: status line; loss (its range on the left axis); vector lengths around m*
// (dashed, 0.5 m* .. 1.5 m* on the left axis); step numbers; one legend entry per encoder.
function drawChart(node, ctx, top, width) {
  const s = charts.get(node);
  const pad = 8;
  const w = width - 2 * pad;
  const axis = AXIS_W;
  const px = pad + axis; // plots start right of the axis labels
  const pw = w - axis - 4;
  // a second status line (the checkpoint to resume from, a note) pushes the plots down
  const head = s && (s.stopped || s.note) ? 30 : 18;
  const half = (CHART_H - 28 - head) / 2;
  ctx.save();
  ctx.fillStyle = "#18181c";
  ctx.fillRect(pad, top, w, CHART_H);
  ctx.font = "11px sans-serif";
  ctx.textAlign = "left";
  if (!s || (!s.loss.length && !s.done && !s.stopped)) {
    ctx.fillStyle = "#888";
    ctx.fillText("Live chart: loss, and each vector's length against m*, while it trains.", pad + 6, top + CHART_H / 2);
    ctx.restore();
    return;
  }
  ctx.fillStyle = "#ddd";
  const last = s.loss[s.loss.length - 1];
  ctx.fillText(last ? `step ${last[0]}/${s.steps}  loss ${last[1].toFixed(5)}` : "", pad + 4, top + 12);
  const x0 = (s.start || 0) + 1;
  // loss curve, its range on the axis
  const ly = top + head;
  const ys = s.loss.map((p) => p[1]);
  ctx.fillStyle = "#999";
  ctx.textAlign = "right";
  if (ys.length) {
    const lo = Math.min(...ys), hi = Math.max(...ys);
    drawSeries(ctx, s.loss, px, ly, pw, half, x0, s.steps, lo, hi, "#f0c040");
    ctx.fillStyle = "#999";
    ctx.fillText(fmt(hi), px - 4, ly + 8);
    ctx.fillText(fmt(lo), px - 4, ly + half);
  }
  // norms against m*: every encoder on its own scale around m*, which is the dashed line
  const ny = ly + half + 4;
  ctx.strokeStyle = "#444";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(px, ly - 1);
  ctx.lineTo(px, ny + half);
  ctx.lineTo(px + pw, ny + half);
  ctx.stroke();
  ctx.setLineDash([4, 3]);
  ctx.strokeStyle = "#888";
  ctx.beginPath();
  ctx.moveTo(px, ny + half / 2);
  ctx.lineTo(px + pw, ny + half / 2);
  ctx.stroke();
  ctx.setLineDash([]);
  const normKeys = Object.keys(s.norms);
  if (normKeys.length) {
    const m0 = s.mStar[normKeys[0]] || s.norms[normKeys[0]][0][1];
    ctx.fillStyle = COLORS[normKeys[0]] || "#999";
    ctx.fillText(fmt(1.5 * m0), px - 4, ny + 8);
    ctx.fillText(`m* ${fmt(m0)}`, px - 4, ny + half / 2 + 4);
    ctx.fillText(fmt(0.5 * m0), px - 4, ny + half);
  }
  // step numbers under the plots
  const sy = ny + half + 12;
  ctx.fillStyle = "#999";
  ctx.textAlign = "left";
  ctx.fillText(`step ${x0}`, px, sy);
  ctx.textAlign = "center";
  if (s.steps - x0 >= 4) ctx.fillText(String(Math.round((x0 + s.steps) / 2)), px + pw / 2, sy);
  ctx.textAlign = "right";
  ctx.fillText(String(s.steps), px + pw, sy);
  ctx.textAlign = "left";
  let lx = pad + 4;
  for (const [k, pts] of Object.entries(s.norms)) {
    const m = s.mStar[k] || pts[0][1];
    drawSeries(ctx, pts, px, ny, pw, half, x0, s.steps, m * 0.5, m * 1.5, COLORS[k] || "#ccc");
    ctx.fillStyle = COLORS[k] || "#ccc";
    const label = `${k} |v| ${pts[pts.length - 1][1].toFixed(4)} / m* ${m.toFixed(4)}`;
    ctx.fillText(label, lx, top + CHART_H - 4);
    lx += ctx.measureText(label).width + 10;
  }
  if (s.done) {
    ctx.fillStyle = "#7f7";
    const text = s.done.reused ? `reused embedding:${s.done.name}` : `saved embedding:${s.done.name}`;
    ctx.fillText(text, pad + w - ctx.measureText(text).width - 4, top + 12);
  } else if (s.stopped) {
    ctx.fillStyle = STOPPED_COLOR;
    const text = `${s.stopped.kind} at step ${s.stopped.step}/${s.steps}`;
    ctx.fillText(text, pad + w - ctx.measureText(text).width - 4, top + 12);
    const ck = s.stopped.checkpoint;
    const hint = ck ? `resume: pick ${ck.file} in resume_from`
      : s.saveEvery > 0 ? "no checkpoint saved yet" : "no checkpoint (save_every = 0)";
    ctx.fillText(hint, pad + w - ctx.measureText(hint).width - 4, top + 26);
  }
  if (s.note) {
    ctx.fillStyle = "#aaa";
    ctx.fillText(s.note, pad + 4, top + 26);
  }
  ctx.restore();
}

function chartWidget(node) {
  return {
    name: "dti_chart",
    type: "dti_chart",
    value: null,
    serialize: false, // not in widgets_values
    options: { serialize: false }, // not in the queued prompt
    computeSize(width) {
      return [width ?? node.size[0], CHART_H];
    },
    draw(ctx, n, width, y) {
      drawChart(n, ctx, y, width);
    },
    mouse() {
      return false;
    },
  };
}

app.registerExtension({
  name: "DTI.TrainChart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "DTITrain") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      if (!this.widgets?.some((w) => w.name === "dti_chart")) {
        this.addCustomWidget(chartWidget(this));
        const min = this.computeSize();
        this.setSize([Math.max(this.size[0], min[0]), Math.max(this.size[1], min[1])]);
      }
      showWhenUsed(this);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      restore(this);
      showWhenUsed(this);
      return r;
    };
    const onAdded = nodeType.prototype.onAdded;
    nodeType.prototype.onAdded = function () {
      const r = onAdded?.apply(this, arguments);
      showWhenUsed(this);
      return r;
    };
  },
});

// Inputs that only matter for one choice of another: shown only then. Hidden widgets keep their
// value, which is still saved in the workflow and queued (the node ignores it).
const SHOWN_WHEN = { custom_templates: ["templates", "custom"], magnitude_value: ["magnitude", "number"] };

function showWhenUsed(node) {
  let changed = false;
  for (const [name, [by, value]] of Object.entries(SHOWN_WHEN)) {
    const w = node.widgets?.find((x) => x.name === name);
    const ctl = node.widgets?.find((x) => x.name === by);
    if (!w || !ctl) continue;
    if (!ctl.__dtiWatched) {
      ctl.__dtiWatched = true;
      const cb = ctl.callback;
      ctl.callback = function () {
        const r = cb?.apply(this, arguments);
        showWhenUsed(node);
        return r;
      };
    }
    const hidden = ctl.value !== value;
    if (!!w.hidden !== hidden) {
      w.hidden = hidden;
      changed = true;
    }
    if (w.element) w.element.style.display = hidden ? "none" : ""; // DOM widgets (the textarea)
    else if (w.inputEl) w.inputEl.style.display = hidden ? "none" : "";
  }
  if (changed) {
    const min = node.computeSize();
    node.setSize([Math.max(node.size[0], min[0]), min[1]]);
    node.setDirtyCanvas(true, true);
  }
}

// For tests and curious users: the data received so far per execution id, and the chart a node draws.
window.__dtiRuns = runs;
window.__dtiChartOf = (node) => charts.get(node) ?? null;
window.__dtiShowWhenUsed = showWhenUsed;
