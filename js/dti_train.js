// DTI Train, live: draws the loss curve and each encoder's vector norm against m* on the node
// while it trains, from the dti.* messages the Python node sends to the client that queued it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const CHART_H = 150;
const COLORS = { clip_l: "#e8643c", clip_g: "#3c8ce8", clip_h: "#3cb45a" };
const runs = new Map(); // node id -> { steps, loss: [], norms: {key: []}, mStar: {}, done }

function stateFor(id) {
  const key = String(id);
  if (!runs.has(key)) runs.set(key, { steps: 0, loss: [], norms: {}, mStar: {}, done: null, updates: 0 });
  return runs.get(key);
}

function redraw(id) {
  const node = app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
  if (node) {
    node.setDirtyCanvas(true, true);
  }
}

// Listeners at module top level, so they exist before the first message arrives.
api.addEventListener("dti.start", ({ detail }) => {
  const s = stateFor(detail.node);
  Object.assign(s, { steps: detail.steps, loss: [], norms: {}, mStar: detail.m_star || {}, done: null, updates: 0 });
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
  redraw(detail.node);
});

function drawSeries(ctx, pts, x0, y0, w, h, xMax, yMin, yMax, color) {
  if (!pts.length) return;
  const span = yMax - yMin || 1;
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  pts.forEach(([x, y], i) => {
    const px = x0 + (w * x) / Math.max(1, xMax);
    const py = y0 + h - (h * (y - yMin)) / span;
    if (i === 0) ctx.moveTo(px, py);
    else ctx.lineTo(px, py);
  });
  ctx.stroke();
}

function drawChart(node, ctx) {
  const s = runs.get(String(node.id));
  if (!s || (!s.loss.length && !s.done)) return;
  const pad = 8;
  const w = node.size[0] - 2 * pad;
  const top = node.size[1] - CHART_H - pad;
  const half = (CHART_H - 30) / 2;
  ctx.save();
  ctx.fillStyle = "#18181c";
  ctx.fillRect(pad, top, w, CHART_H);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#ddd";
  const last = s.loss[s.loss.length - 1];
  ctx.fillText(last ? `step ${last[0]}/${s.steps}  loss ${last[1].toFixed(5)}` : "", pad + 4, top + 12);
  // loss curve
  const ys = s.loss.map((p) => p[1]);
  if (ys.length) drawSeries(ctx, s.loss, pad, top + 16, w, half, s.steps, Math.min(...ys), Math.max(...ys), "#f0c040");
  // norms against m*: every encoder on its own scale around m*, which is the dashed line
  const ny = top + 20 + half;
  ctx.setLineDash([4, 3]);
  ctx.strokeStyle = "#888";
  ctx.beginPath();
  ctx.moveTo(pad, ny + half / 2);
  ctx.lineTo(pad + w, ny + half / 2);
  ctx.stroke();
  ctx.setLineDash([]);
  let lx = pad + 4;
  for (const [k, pts] of Object.entries(s.norms)) {
    const m = s.mStar[k] || pts[0][1];
    drawSeries(ctx, pts, pad, ny, w, half, s.steps, m * 0.5, m * 1.5, COLORS[k] || "#ccc");
    ctx.fillStyle = COLORS[k] || "#ccc";
    const label = `${k} |v| ${pts[pts.length - 1][1].toFixed(4)} / m* ${m.toFixed(4)}`;
    ctx.fillText(label, lx, top + CHART_H - 4);
    lx += ctx.measureText(label).width + 10;
  }
  if (s.done) {
    ctx.fillStyle = "#7f7";
    const text = s.done.reused ? `reused embedding:${s.done.name}` : `saved embedding:${s.done.name}`;
    ctx.fillText(text, pad + w - ctx.measureText(text).width - 4, top + 12);
  }
  ctx.restore();
}

app.registerExtension({
  name: "DTI.TrainChart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "DTITrain") return;
    const onDraw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDraw?.apply(this, arguments);
      drawChart(this, ctx);
      return r;
    };
    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function (out) {
      const size = computeSize ? computeSize.apply(this, arguments) : [this.size[0], this.size[1]];
      size[1] += CHART_H + 12; // room for the chart below the widgets
      return size;
    };
  },
});

// For tests and curious users: the data each DTI Train node has received so far.
window.__dtiRuns = runs;
