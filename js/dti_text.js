// Shows each DTI node's result text (its `ui.text`: DTI Inspect's report, DTI Train's and Slerp
// Concepts' summaries, the reuse explanation) on the node itself, in a read-only text box that
// appears after the node ran. Display only: neither saved in the workflow nor queued.
import { app } from "../../scripts/app.js";
import { refreshFileLists } from "./dti_train.js";

const NODES = new Set(["DTITrain", "DTIInspect", "DTISlerpConcepts", "DTIEvaluate"]);
const WIDGET = "dti_result";

function textWidget(node) {
  let w = node.widgets?.find((x) => x.name === WIDGET);
  if (w) return w;
  // The frontend's own multiline STRING widget (its textarea on the classic canvas, the Vue renderer's
  // text box), from app.widgets: scripts/widgets.js is an internal module (1.49+ warn on import).
  w = app.widgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
  w.serialize = false; // not in widgets_values
  if (w.options) w.options.serialize = false; // not in the queued prompt
  else w.options = { serialize: false };
  w.options.read_only = true; // the Vue node renderer's text box reads this
  // Above DTI Train's live chart, which stays the node's last widget (its bottom edge).
  const chart = node.widgets.findIndex((x) => x.name === "dti_chart");
  if (chart >= 0) {
    node.widgets.splice(node.widgets.indexOf(w), 1);
    node.widgets.splice(chart, 0, w);
  }
  const box = w.element ?? w.inputEl; // inputEl is the deprecated name (1.58)
  if (box) {
    box.readOnly = true;
    box.style.opacity = 0.85;
    box.dataset.dtiResult = String(node.id); // for tests: document.querySelector('[data-dti-result]')
  }
  return w;
}

const LINE_PX = 13;
const CHAR_PX = 6.5;
const MAX_TEXT_PX = 320;
const MIN_WIDTH = 460;

export function showResultText(node, lines) {
  if (!lines?.length) return;
  const w = textWidget(node);
  w.value = lines.join("\n");
  const box = w.element ?? w.inputEl;
  if (box) box.value = w.value;
  // Tall enough for the whole text (DTI Inspect's report runs to a dozen lines), up to a limit.
  const width = Math.max(node.size[0], MIN_WIDTH);
  const cols = Math.max(30, Math.floor((width - 40) / CHAR_PX));
  const rows = w.value.split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / cols)), 0);
  const want = Math.min(MAX_TEXT_PX, Math.max(2, rows) * LINE_PX + 16);
  if (w.options) w.options.getMinHeight = () => want;
  requestAnimationFrame(() => {
    const min = node.computeSize();
    node.setSize([Math.max(node.size[0], min[0], MIN_WIDTH), Math.max(node.size[1], min[1])]);
    node.setDirtyCanvas(true, true);
    fitText(node, w);
  });
}

// The box on screen: the Vue node renderer's textarea for the widget, or the widget's own. The Vue
// renderer shows only the open graph's nodes, by their ids within it (a node inside a subgraph has
// its inner id, which the root graph may use for another node).
function shownBox(node, w) {
  const open = app.canvas?.graph === node.graph;
  const vue = open ? document.querySelector(`[data-node-id="${node.id}"] [data-widget-name="${WIDGET}"] textarea`) : null;
  return vue ?? w.element ?? w.inputEl ?? null;
}

// Whatever the renderer made of the size hint, grow the node until the whole text shows (up to
// MAX_TEXT_PX): the Vue renderer gives the text box the node's free height.
function fitText(node, w, tries = 4) {
  setTimeout(() => {
    const box = shownBox(node, w);
    if (!box?.isConnected || !box.clientHeight) return;
    const missing = Math.min(box.scrollHeight - box.clientHeight, MAX_TEXT_PX - box.clientHeight);
    if (missing > 2) {
      node.setSize([node.size[0], node.size[1] + missing]);
      node.setDirtyCanvas(true, true);
      if (tries > 1) fitText(node, w, tries - 1);
    }
  }, 100);
}

app.registerExtension({
  name: "DTI.ResultText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      showResultText(this, message?.text);
      // Slerp Concepts wrote a file: list it in DTI Load Embedding / resume_from at once.
      if (nodeData.name === "DTISlerpConcepts") refreshFileLists();
      return r;
    };
  },
});
