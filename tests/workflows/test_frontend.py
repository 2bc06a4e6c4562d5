"""The real ComfyUI frontend (headless Chromium): the workflows load without any alert, the page
builds the same API prompt as our converter, and the DTI Train live chart draws a real run."""

import shutil
import time

import pytest
import torch

import dti_workflow_harness as h
from dti_core.embedding_file import load_embedding

CHART_H = 170  # js/dti_train.js
LOSS_RGB = (0xF0, 0xC0, 0x40)
CLIP_L_RGB = (0xE8, 0x64, 0x3C)
TRAIN_TIMEOUT = 420.0



# Start of a page script that builds a graph: an empty canvas and add(type, pos, widget values).
CLEAR_AND_ADD_JS = """
        app.graph.clear();
        const add = (type, pos, values = {}) => {
            const n = LiteGraph.createNode(type);
            n.pos = pos;
            app.graph.add(n);
            for (const [k, v] of Object.entries(values)) n.widgets.find((w) => w.name === k).value = v;
            return n;
        };
"""

def test_extension_registers_without_errors(page, frontend):
    got = page.evaluate("""() => ({
        names: app.extensions.map((e) => e.name),
        runs: window.__dtiRuns instanceof Map,
        trainDef: !!LiteGraph.registered_node_types["DTITrain"],
        version: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
        vue: app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled") ?? false,
    })""")
    # the page runs the frontend this parametrization names (the pinned one, or the newest, either renderer)
    assert frontend["version"] and got["version"] == frontend["version"], (got["version"], frontend)
    assert bool(got["vue"]) == frontend["vue_nodes"]
    assert "DTI.TrainChart" in got["names"]
    assert got["runs"] and got["trainDef"]
    served = [(u, s) for u, s in page.responses if "/extensions/ComfyUI-DTI/" in u]
    assert [s for u, s in served if u.endswith("/extensions/ComfyUI-DTI/dti_train.js")] == [200], served
    time.sleep(1.0)
    assert page.dti_problems() == []


def _known_inputs(prompt, object_info):
    """Drop inputs the server does not declare (the frontend adds e.g. PreviewAny's 'preview' text;
    the server ignores them)."""
    out = {}
    for k, v in prompt.items():
        spec = object_info[v["class_type"]].get("input", {})
        names = set().union(*(spec.get(s, {}) for s in ("required", "optional", "hidden")))
        out[k] = (v["class_type"], {n: x for n, x in v["inputs"].items() if n in names})
    return out


@pytest.mark.parametrize("name", h.WORKFLOWS)
def test_workflow_loads_without_alerts_and_converts_like_the_frontend(name, tab, object_info):
    h.skip_if_host_lacks(name, object_info)
    page = tab
    page.console.clear()
    wf = h.load_workflow(name)
    result = page.evaluate("""async (wf) => {
        await app.loadGraphData(wf);
        await new Promise((r) => setTimeout(r, 1000));
        const p = await app.graphToPrompt();
        return {
            toasts: [...document.querySelectorAll('.p-toast-message')].map((e) => e.innerText),
            dialogs: [...document.querySelectorAll('.p-dialog')].map((e) => e.innerText.slice(0, 300)),
            nodes: app.graph._nodes.length,
            prompt: p.output,
            values: Object.fromEntries(p.workflow.nodes.map((n) => [n.id, n.widgets_values ?? []])),
        };
    }""", wf)
    assert result["toasts"] == [], result["toasts"]
    assert result["dialogs"] == [], result["dialogs"]
    assert result["nodes"] == len(wf["nodes"])
    bad = [(k, t) for k, t, _ in page.console if k in ("error", "warning") and
           any(w in t for w in ("zod", "Invalid workflow", "missing", "Missing"))]
    assert bad == []
    assert page.dti_problems() == []
    # the frontend's own graphToPrompt is the ground truth for what the Run button sends
    ours = h.ui_to_api(wf, object_info)
    theirs = result["prompt"]
    assert _known_inputs(theirs, object_info) == _known_inputs(ours, object_info)
    assert set(theirs) == set(ours)
    # the chart widget is display-only: neither queued nor saved
    for node in theirs.values():
        assert "dti_chart" not in node["inputs"]
    # a round trip through the editor keeps every widget value in place
    assert result["values"] == {str(n["id"]): n.get("widgets_values") or [] for n in wf["nodes"]}


# The text box that shows a node's result text: the widget's own textarea on the classic canvas (marked
# data-dti-result), the Vue renderer's textarea for that widget inside the node's element.
RESULT_BOX_JS = """
    const resultBox = (id) => {
        const el = document.querySelector(`[data-node-id="${id}"]`);
        if (!el) return document.querySelector(`textarea[data-dti-result="${id}"]`);
        const w = app.graph.getNodeById(id)?.widgets?.find((x) => x.name === 'dti_result');
        return [...el.querySelectorAll('textarea')].find((t) => w && t.value === w.value) ?? null;
    };
"""


# The node an execution id names ("12", "5:3" inside the subgraph node 5 instantiates, "5:3:7"), found by
# walking the graphs as the frontend does (not through the pack's own lookup).
NODE_AT_JS = """
    const nodeAt = (execId) => {
        let graph = app.graph, node = null;
        for (const part of String(execId).split(':')) {
            node = graph?.getNodeById(Number(part)) ?? null;
            graph = node?.subgraph;
        }
        return node;
    };
"""


# Texts the chart of one node (an execution id) draws (its labels and axis values), caught at fillText while
# the page draws it (the main canvas, or the chart's own canvas on the Vue renderer; drawn directly if off screen).
DRAWN_TEXTS_JS = """(id) => {""" + NODE_AT_JS + """
    const node = nodeAt(id);
    const chart = node.widgets.find((w) => w.name === 'dti_chart');
    const texts = [];
    let inChart = false;
    const orig = CanvasRenderingContext2D.prototype.fillText;
    const draw = chart.draw;
    CanvasRenderingContext2D.prototype.fillText = function (t, ...rest) { if (inChart) texts.push(String(t)); return orig.call(this, t, ...rest); };
    chart.draw = function (...args) { inChart = true; try { return draw.apply(this, args); } finally { inChart = false; } };
    try {
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true);
        chart.triggerDraw?.();  // the Vue node renderer: the chart's own canvas
        if (!texts.length) {
            const c = document.createElement('canvas'); c.width = node.size[0]; c.height = 400;
            chart.draw(c.getContext('2d'), node, node.size[0], 0, 170);
        }
    } finally { CanvasRenderingContext2D.prototype.fillText = orig; chart.draw = draw; }
    return texts;
}"""


# The page rectangle of a DTI Train node's chart (an execution id; its graph open on the canvas), drawn now:
# on the Vue node renderer its own canvas inside the node's element; on the classic canvas the bottom
# CHART_H pixels of the node.
CHART_BOX_JS = """(id) => {""" + NODE_AT_JS + """
    const node = nodeAt(id);
    const chart = node.widgets.find((w) => w.name === 'dti_chart');
    const el = document.querySelector(`[data-node-id="${node.id}"]`);
    if (el) {
        chart.triggerDraw?.();
        const canvases = [...el.querySelectorAll('canvas')];
        const r = canvases[canvases.length - 1].getBoundingClientRect();
        return { x: r.left, y: r.top, width: r.width, height: r.height };
    }
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    const r = app.canvas.canvas.getBoundingClientRect();
    const s = app.canvas.ds.scale, o = app.canvas.ds.offset;
    const top = chart.y ?? chart.last_y ?? (node.size[1] - 170 - 4);  // where the canvas drew it
    return { x: r.left + (node.pos[0] + o[0]) * s, y: r.top + (node.pos[1] + top + o[1]) * s,
             width: node.size[0] * s, height: 170 * s };
}"""


def _numbers(texts):
    out = []
    for t in texts:
        for word in t.replace("m*", " ").split():
            try:
                out.append(float(word))
            except ValueError:
                pass
    return out


def _count_near(img, rgb, tol=40):
    img = img.convert("RGB")
    w, hgt = img.size
    return sum(1 for x in range(w) for y in range(hgt) if all(abs(a - b) <= tol for a, b in zip(img.getpixel((x, y)), rgb)))


def test_train_chart_draws_a_live_run(page, ui_server, frontend):
    wf = h.load_workflow("dti_train_sd15.json")
    steps = 3
    # one name per frontend: the newest frontend's two renderers share a server, which would reuse an identical run
    name = f"chart-test-{frontend['name']}"
    page.page.set_viewport_size({"width": 1400, "height": 1100})
    info = page.evaluate("""async ([wf, steps, name]) => {
        await app.loadGraphData(wf);
        await new Promise((r) => setTimeout(r, 500));
        const nodes = app.graph._nodes;
        const set = (type, values) => {
            for (const node of nodes.filter((n) => n.type === type))
                for (const [k, v] of Object.entries(values)) node.widgets.find((w) => w.name === k).value = v;
        };
        set("DTITrain", { name, steps, resolution: 64, batch_size: 1 });
        set("EmptyLatentImage", { width: 64, height: 64 });
        set("KSampler", { steps: 1 });
        const train = nodes.find((n) => n.type === "DTITrain");
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [-train.pos[0] + 40, -train.pos[1] + 50];
        app.canvas.setDirty(true, true);
        return { id: train.id, clientId: app.api.clientId };
    }""", [wf, steps, name])
    node_id = info["id"]
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")

    try:
        page.page.wait_for_function(
            "(id) => { const s = window.__dtiRuns.get(String(id)); return !!(s && s.done); }",
            arg=node_id, timeout=TRAIN_TIMEOUT * 1000, polling=500)
    except Exception as e:
        raise AssertionError(f"no dti.done reached the page: {e}\n--- server log ---\n{ui_server.log_tail()}") from None
    _wait_idle(ui_server, TRAIN_TIMEOUT)  # the rest of the graph (render, save) finishes too

    run = page.evaluate("""(id) => {
        const s = window.__dtiRuns.get(String(id));
        return { steps: s.steps, updates: s.updates, loss: s.loss, norms: s.norms, mStar: s.mStar, done: s.done };
    }""", node_id)
    assert run["updates"] >= 1 and run["steps"] == steps
    assert [p[0] for p in run["loss"]][-1] == steps
    assert set(run["norms"]) == {"clip_l"} and run["mStar"]["clip_l"] > 0
    assert run["done"]["name"] == name and not run["done"]["reused"]
    assert (ui_server.embeddings / f"{name}.safetensors").is_file()
    # DTI Train's summary shows on the node, above the chart (which stays at the bottom)
    page.page.wait_for_function(
        "([id, name]) => {" + RESULT_BOX_JS + "return !!resultBox(id)?.value.startsWith(`Saved embedding:${name}`); }",
        arg=[node_id, name], timeout=30000, polling=250)
    order = page.evaluate("(id) => app.graph.getNodeById(id).widgets.map((w) => w.name).slice(-2)", node_id)
    assert order == ["dti_result", "dti_chart"], order

    # Draw and photograph the chart where the page shows it.
    shot = _chart_shot(page, node_id, f"train_chart_{frontend['name']}.png")
    artifacts = shot.parent
    page.page.screenshot(path=str(artifacts / f"train_chart_page_{frontend['name']}.png"))

    from PIL import Image
    chart = Image.open(shot)
    assert _count_near(chart, LOSS_RGB) >= 20, "no loss curve drawn in the chart region"
    assert _count_near(chart, CLIP_L_RGB) >= 20, "no clip_l norm line drawn in the chart region"
    assert page.dti_problems() == []
    if h.update_docs_images() and frontend["name"] == "pinned":
        dst = h.REPO_ROOT / "docs" / "images" / "train_chart.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dst)

    # the axes carry values: the step range and the loss range
    texts = page.evaluate(DRAWN_TEXTS_JS, node_id)
    losses = [p[1] for p in run["loss"]]
    assert f"step 1" in texts and str(steps) in texts, texts
    nums = _numbers(texts)
    for want in (max(losses), min(losses)):
        assert any(abs(n - want) <= 0.006 * abs(want) + 1e-9 for n in nums), (want, texts)

    # A real page reload: the frontend restores the open workflow, and the chart its last run
    # (the points, the axis values) from the node's properties.
    time.sleep(1.5)  # 1.5x writes the workflow to storage 0.5 s after a change
    page.page.reload(wait_until="load", timeout=90000)
    page.page.wait_for_function("window.app && window.app.graph && window.__dtiRuns instanceof Map", timeout=90000)
    try:
        page.page.wait_for_function("(id) => !!window.__dtiChartOf(app.graph.getNodeById(id))", arg=node_id,
                                    timeout=30000, polling=250)
    except Exception:
        types = page.evaluate("() => app.graph._nodes.map((n) => [n.id, n.type])")
        raise AssertionError(f"the chart's history did not come back after a reload; nodes: {types}") from None
    again = page.evaluate("""(id) => {
        const s = window.__dtiChartOf(app.graph.getNodeById(id));
        return { steps: s.steps, loss: s.loss, norms: s.norms, mStar: s.mStar, done: s.done, running: s.running };
    }""", node_id)
    assert again["loss"] == run["loss"] and again["norms"] == run["norms"] and again["mStar"] == run["mStar"]
    assert again["steps"] == steps and again["done"]["name"] == name and not again["running"]
    texts_after = page.evaluate(DRAWN_TEXTS_JS, node_id)
    assert "step 1" in texts_after and str(steps) in texts_after, texts_after
    assert sorted(_numbers(texts_after)) == sorted(nums), (texts_after, texts)
    box = page.evaluate(CHART_BOX_JS, node_id)
    time.sleep(0.5)
    shot = artifacts / f"train_chart_reloaded_{frontend['name']}.png"
    page.page.screenshot(path=str(shot), clip=box)
    assert _count_near(Image.open(shot), LOSS_RGB) >= 20, "no loss curve on the chart after the reload"
    assert page.dti_problems() == []



# Puts nodes into a new subgraph with the frontend's own command behind "Convert to Subgraph" and
# returns the subgraph node that now stands for them in their graph.
TO_SUBGRAPH_JS = """
    const toSubgraph = (graph, nodes) => graph.convertToSubgraph(new Set(nodes)).node;
"""


def _skip_without_subgraphs(page, frontend):
    if not page.evaluate("() => typeof app.graph.convertToSubgraph === 'function'"):
        pytest.skip(f"frontend {frontend['version']} has no subgraphs (its LGraph has no convertToSubgraph)")


def _chart_shot(page, exec_id, file_name):
    """A screenshot of the node's chart where the page shows it, in test-artifacts/."""
    box = page.evaluate(CHART_BOX_JS, exec_id)
    time.sleep(0.5)
    artifacts = h.REPO_ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / file_name
    page.page.screenshot(path=str(shot), clip=box)
    return shot


def _wait_idle(server, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = server.get_json("/queue")
        if not q["queue_running"] and not q["queue_pending"]:
            return
        time.sleep(0.5)
    raise AssertionError(f"the queued workflow did not finish\n--- server log ---\n{server.log_tail()}")


def test_train_chart_follows_a_node_inside_a_subgraph(page, ui_server, frontend):
    """DTI Train inside a subgraph: the server names it "S:I" (subgraph node S, inner node I) in its
    messages; the live chart, its saved history and the result text reach the inner node, and come back
    after a page reload."""
    _skip_without_subgraphs(page, frontend)
    steps = 2
    name = f"subgraph-chart-{frontend['name']}"  # a name per frontend: the newest one's renderers share a server
    page.page.set_viewport_size({"width": 1400, "height": 1100})
    info = page.evaluate("""async ([ckpt, image, steps, name]) => {
""" + CLEAR_AND_ADD_JS + TO_SUBGRAPH_JS + """        const ck = add("CheckpointLoaderSimple", [0, 0], { ckpt_name: ckpt });
        const img = add("LoadImage", [0, 200], { image });
        const train = add("DTITrain", [380, 0], { name, steps, resolution: 64, batch_size: 1, overwrite: true });
        ck.connect(0, train, 0);
        ck.connect(1, train, 1);
        ck.connect(2, train, 2);
        img.connect(0, train, 3);
        const sub = toSubgraph(app.graph, [train]);
        const inner = sub.subgraph.nodes.find((n) => n.type === "DTITrain");
        // watch it live, from inside the subgraph
        app.canvas.openSubgraph(sub.subgraph, sub);
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [-inner.pos[0] + 40, -inner.pos[1] + 50];
        app.canvas.setDirty(true, true);
        await app.queuePrompt(0, 1);
        return { execId: `${sub.id}:${inner.id}`, innerId: inner.id, open: app.canvas.graph === inner.graph };
    }""", [h.SD15_CKPT, h.EXAMPLE_IMAGES[0], steps, name])
    exec_id = info["execId"]
    assert info["open"], info
    _wait_idle(ui_server, TRAIN_TIMEOUT)
    assert (ui_server.embeddings / f"{name}.safetensors").is_file(), ui_server.log_tail()
    # the server ran the inner node under that execution id (its ui output is filed under it)
    history = ui_server.get_json("/history")
    assert any(exec_id in (e.get("outputs") or {}) for e in history.values()), [list(e.get("outputs") or {})
                                                                               for e in history.values()]

    # the history is saved in the inner node's properties (thus in the subgraph's definition)
    saved = page.evaluate("(id) => {" + NODE_AT_JS + "return nodeAt(id).properties.dti_history ?? null; }", exec_id)
    assert saved, "no history saved on the inner node"
    assert [p[0] for p in saved["loss"]] == list(range(1, steps + 1)) and saved["steps"] == steps
    assert saved["done"]["name"] == name and set(saved["norms"]) == {"clip_l"}
    # DTI Train's summary shows on the inner node, above its chart
    page.page.wait_for_function(
        "([id, name]) => {" + NODE_AT_JS + """const w = nodeAt(id).widgets.find((x) => x.name === 'dti_result');
            return !!w && String(w.value).startsWith(`Saved embedding:${name}`); }""",
        arg=[exec_id, name], timeout=30000, polling=250)
    order = page.evaluate("(id) => {" + NODE_AT_JS + "return nodeAt(id).widgets.map((w) => w.name).slice(-2); }",
                          exec_id)
    assert order == ["dti_result", "dti_chart"], order
    # the chart draws the run: the step range, the loss range, the saved file
    texts = page.evaluate(DRAWN_TEXTS_JS, exec_id)
    losses = [p[1] for p in saved["loss"]]
    assert "step 1" in texts and str(steps) in texts and f"saved embedding:{name}" in texts, texts
    nums = _numbers(texts)
    for want in (max(losses), min(losses)):
        assert any(abs(n - want) <= 0.006 * abs(want) + 1e-9 for n in nums), (want, texts)
    # and where the page shows it (the subgraph is open on the canvas)
    shot = _chart_shot(page, exec_id, f"train_chart_subgraph_{frontend['name']}.png")
    from PIL import Image
    assert _count_near(Image.open(shot), LOSS_RGB) >= 20, "no loss curve drawn on the inner node's chart"

    # A real page reload: the inner node comes back from the subgraph's definition with its last run.
    time.sleep(1.5)  # 1.5x writes the workflow to storage 0.5 s after a change
    page.page.reload(wait_until="load", timeout=90000)
    page.page.wait_for_function("window.app && window.app.graph && window.__dtiRuns instanceof Map", timeout=90000)
    try:
        page.page.wait_for_function("(id) => {" + NODE_AT_JS + "const n = nodeAt(id); return !!n?.widgets?.length; }",
                                    arg=exec_id, timeout=30000, polling=250)
    except Exception:
        types = page.evaluate("() => app.graph.nodes.map((n) => [n.id, n.type])")
        raise AssertionError(f"the subgraph did not come back after a reload; nodes: {types}") from None
    texts_after = page.evaluate(DRAWN_TEXTS_JS, exec_id)
    assert f"saved embedding:{name}" in texts_after, texts_after
    assert sorted(_numbers(texts_after)) == sorted(nums), (texts_after, texts)
    assert page.dti_problems() == []


def test_train_chart_reaches_a_node_two_subgraphs_deep(page, frontend):
    """The messages of a DTI Train two subgraphs deep ("A:B:C", as the server sends them) draw on that
    node only, not on a node of the root graph that has the inner id; its result text shows there too."""
    _skip_without_subgraphs(page, frontend)
    name = f"deep-{frontend['name']}"
    info = page.evaluate("""async () => {
""" + CLEAR_AND_ADD_JS + TO_SUBGRAPH_JS + """        const train = add("DTITrain", [380, 0]);
        const mid = toSubgraph(app.graph, [train]);
        const outer = toSubgraph(app.graph, [mid]);
        const midInside = outer.subgraph.nodes.find((n) => n.subgraph);
        const inner = midInside.subgraph.nodes.find((n) => n.type === "DTITrain");
        // A root node with the inner id where the frontend allows it (1.58 renumbers it): the inner
        // id alone must not find it.
        const clash = LiteGraph.createNode("DTITrain");
        clash.id = inner.id;
        clash.pos = [0, 400];
        app.graph.add(clash);
        return { execId: `${outer.id}:${midInside.id}:${inner.id}`, clash: String(clash.id) === String(inner.id),
                 clashId: clash.id };
    }""")
    exec_id = info["execId"]
    losses = [0.31, 0.27, 0.24, 0.2]
    page.evaluate("""async ([id, name, losses]) => {
        const send = (type, detail) => app.api.dispatchCustomEvent(type, detail);
        send("dti.start", { node: id, name, steps: losses.length, start: 0, m_star: { clip_l: 0.4 } });
        losses.forEach((loss, i) => send("dti.progress", { node: id, step: i + 1, steps: losses.length, loss,
                                                            norms: { clip_l: 0.4 + 0.01 * i } }));
        send("dti.done", { node: id, name, path: `/x/${name}.safetensors`, reused: false, m_star: { clip_l: 0.4 } });
        send("executed", { node: id, display_node: id, output: { text: [`Saved embedding:${name}`] } });
        await new Promise((r) => setTimeout(r, 500));
    }""", [exec_id, name, losses])
    got = page.evaluate("(id) => {" + NODE_AT_JS + """
        const n = nodeAt(id);
        return { saved: n.properties.dti_history ?? null,
                 text: n.widgets.find((w) => w.name === 'dti_result')?.value ?? null }; }""", exec_id)
    assert got["saved"], "no history saved on the node two subgraphs deep"
    assert [p[1] for p in got["saved"]["loss"]] == losses and got["saved"]["done"]["name"] == name
    assert got["text"] == f"Saved embedding:{name}"
    texts = page.evaluate(DRAWN_TEXTS_JS, exec_id)
    assert "step 1" in texts and f"saved embedding:{name}" in texts, texts
    for want in (max(losses), min(losses)):
        assert any(abs(n - want) <= 0.006 * want for n in _numbers(texts)), (want, texts)
    if info["clash"]:
        clash_id = info["clashId"]
        other = page.evaluate("(id) => app.graph.getNodeById(id).properties.dti_history ?? null", clash_id)
        assert other is None, other
        assert "step 1" not in page.evaluate(DRAWN_TEXTS_JS, clash_id)
    assert page.dti_problems() == []


RESULT_TIMEOUT = 300.0


def test_result_text_of_slerp_and_inspect_shows_on_the_nodes(page, ui_server, frontend):
    """ui.text (Slerp Concepts' summary, DTI Inspect's report) appears in the page after a run
    queued from the page, and stays out of the queued prompt and the saved workflow."""
    blend = f"ui-text-blend-{frontend['name']}"  # a name per frontend: the newest one's renderers share a server
    ids = page.evaluate("""async ([ckpt, a, b, blend]) => {
""" + CLEAR_AND_ADD_JS + """        const la = add("DTILoadEmbedding", [0, 0], { embedding: a });
        const lb = add("DTILoadEmbedding", [0, 160], { embedding: b });
        const ck = add("CheckpointLoaderSimple", [0, 320], { ckpt_name: ckpt });
        const slerp = add("DTISlerpConcepts", [380, 0], { name: blend, t: 0.25 });
        const insp = add("DTIInspect", [380, 300], { top_k: 3 });
        la.connect(1, slerp, 0);
        lb.connect(1, slerp, 1);
        slerp.connect(1, insp, 0);
        ck.connect(1, insp, 1);
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [40, 60];
        app.canvas.setDirty(true, true);
        await app.queuePrompt(0, 1);
        return { slerp: slerp.id, inspect: insp.id };
    }""", [h.SD15_CKPT, h.CONCEPT_A, h.CONCEPT_B, blend])
    try:
        page.page.wait_for_function(
            """([ids, blend]) => {""" + RESULT_BOX_JS + """
                const boxes = [resultBox(ids.slerp), resultBox(ids.inspect)].filter((e) => e);
                const t = boxes.map((e) => e.value);
                const shown = boxes.filter((e) => {
                    const r = e.getBoundingClientRect(); return r.width > 50 && r.height > 20; });
                return shown.length === 2 && t.some((v) => v.startsWith(`Saved embedding:${blend}`))
                    && t.some((v) => v.includes('vocabulary norms'));
            }""", arg=[ids, blend], timeout=RESULT_TIMEOUT * 1000, polling=500)
    except Exception as e:
        raise AssertionError(f"the result text never appeared in the page: {e}\n{page.toasts()}\n"
                             f"--- server log ---\n{ui_server.log_tail()}") from None
    got = page.evaluate("""async (ids) => {
""" + RESULT_BOX_JS + """
        await new Promise((r) => setTimeout(r, 800));  // the nodes grow to fit their text
        const box = resultBox;
        const visible = (el) => { const r = el.getBoundingClientRect(); return r.width > 50 && r.height > 20; };
        const rect = (el) => { const r = el.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; };
        const p = await app.graphToPrompt();
        return {
            slerp: box(ids.slerp).value, inspect: box(ids.inspect).value,
            shown: [visible(box(ids.slerp)), visible(box(ids.inspect))],
            rects: [rect(box(ids.slerp)), rect(box(ids.inspect))],
            overflow: [box(ids.slerp), box(ids.inspect)].map((e) => e.scrollHeight - e.clientHeight),
            sizes: [app.graph.getNodeById(ids.slerp).size, app.graph.getNodeById(ids.inspect).size],
            readOnly: box(ids.slerp).readOnly,
            queued: Object.values(p.output).map((n) => Object.keys(n.inputs)),
            saved: JSON.stringify(app.graph.serialize()),
        };
    }""", ids)
    assert got["slerp"] == f"Saved embedding:{blend} (t = 0.25)", got["slerp"]
    assert f"{blend}.safetensors  [dti]" in got["inspect"].splitlines()[0] and "vector 0: norm" in got["inspect"], got["inspect"]
    page.page.screenshot(path=str(h.REPO_ROOT / "test-artifacts" / f"result_text_{frontend['name']}.png"))
    assert got["shown"] == [True, True] and got["readOnly"], (got["rects"], got["sizes"])
    # the whole report fits its box (no scrolling needed for a one-vector embedding)
    assert got["rects"][1][3] >= 13 * len(got["inspect"].splitlines()), got["rects"]
    assert max(got["overflow"]) <= 2, (got["overflow"], got["rects"], got["sizes"])
    assert all("dti_result" not in inputs for inputs in got["queued"])
    assert f"Saved embedding:{blend}" not in got["saved"] and "vocabulary norms" not in got["saved"]
    # the new file is listed at once (no manual refresh): the DTI Load Embedding combos have it
    page.page.wait_for_function(
        """(file) => app.graph._nodes.filter((n) => n.type === 'DTILoadEmbedding').every((n) =>
               n.widgets.find((w) => w.name === 'embedding').options.values.includes(file))""",
        arg=f"{blend}.safetensors", timeout=30000, polling=250)
    assert page.dti_problems() == []


# The newest frontend only: its widgets and nodes are the ones every other test here checks in all three
# frontends; this run adds only the workflow's own wiring (~40 s a frontend on the CI machine).
@pytest.mark.parametrize("frontend", ["newest"], indirect=True)
def test_dti_vs_ti_queued_from_the_page_shows_both_words_the_grid_and_the_four_scores(page, ui_server, frontend):
    """The shipped DTI-vs-TI workflow, loaded in the page and queued from it (cut to CPU size: 2 training
    steps at 64 px, 1 sampler step, 2 seeds): both DTI Train nodes show their word, both DTI Evaluate
    nodes show an image and a text score, the grid is saved and the charts previewed."""
    wf = h.load_workflow("dti_vs_ti.json")
    before = set(ui_server.get_json("/history"))
    ids = page.evaluate("""async (wf) => {
        await app.loadGraphData(wf);
        const set = (type, values) => app.graph._nodes.filter((n) => n.type === type).forEach((n) => {
            for (const [k, v] of Object.entries(values)) n.widgets.find((w) => w.name === k).value = v; });
        set("DTITrain", { steps: 2, resolution: 64, batch_size: 2 });
        set("EmptyLatentImage", { width: 64, height: 64, batch_size: 2 });
        set("KSampler", { steps: 1 });
        const of = (type) => app.graph._nodes.filter((n) => n.type === type).map((n) => n.id);
        await app.queuePrompt(0, 1);
        return { train: of("DTITrain"), evaluate: of("DTIEvaluate"), save: of("SaveImage"), preview: of("PreviewImage") };
    }""", wf)
    assert len(ids["train"]) == 2 and len(ids["evaluate"]) == 2
    try:
        page.page.wait_for_function(
            """(ids) => {""" + RESULT_BOX_JS + """
                const t = [...ids.train, ...ids.evaluate].map((id) => resultBox(id)?.value ?? "");
                return t.slice(0, 2).every((v) => /(embedding:|Reused )my-concept-(dti|ti)/.test(v))  // (a shared server reuses them)
                    && t.slice(2).every((v) => v.startsWith("image score ") && v.includes("\\ntext score "));
            }""", arg=ids, timeout=RESULT_TIMEOUT * 1000, polling=500)
    except Exception as e:
        shown = page.evaluate("(ids) => {" + RESULT_BOX_JS + "return [...ids.train, ...ids.evaluate].map("
                              "(id) => resultBox(id)?.value ?? null); }", ids)
        raise AssertionError(f"the words and scores never appeared in the page: {e}\nshown: {shown}\n"
                             f"{page.toasts()}\n--- server log ---\n{ui_server.log_tail()[-3000:]}") from None
    # The nodes' texts arrive as each node runs; the history entry only once the whole prompt is done
    # (the saved grid and the chart come last): wait for this run's entry.
    deadline = time.monotonic() + RESULT_TIMEOUT
    while True:
        done = [e for k, e in ui_server.get_json("/history").items() if k not in before]  # added when it ends
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(done) == 1 and done[0].get("status", {}).get("completed"), f"this run did not complete: {done}"
    outputs = done[0]["outputs"]
    got = page.evaluate("""(ids) => {""" + RESULT_BOX_JS + """
        return { texts: ids.evaluate.map((id) => resultBox(id).value) };
    }""", ids)
    got["saved"] = len(outputs.get(str(ids["save"][0]), {}).get("images", []))
    got["charts"] = len(outputs.get(str(ids["preview"][0]), {}).get("images", []))
    page.page.screenshot(path=str(h.REPO_ROOT / "test-artifacts" / f"dti_vs_ti_{frontend['name']}.png"))
    for text in got["texts"]:
        assert "4 image(s) x 3 reference(s)" in text and "CLIP-T, clip_l" in text, text
    assert got["saved"] >= 1 and got["charts"] >= 1, got
    assert page.dti_problems() == []
    # What the run wrote (the workflow's one run in the suite): the DTI word at m*, the TI word plain at
    # the batch-scaled rate, the grid DTI | TI of the 4 renders, the charts as previews.
    dti = load_embedding(str(ui_server.embeddings / "my-concept-dti.safetensors"))
    ti = load_embedding(str(ui_server.embeddings / "my-concept-ti.safetensors"))
    assert dti.is_dti and ti.is_plain_ti
    v = dti.vectors["clip_l"]
    assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), dti.m_star("clip_l")), atol=1e-4)
    assert float(ti.metadata["dti.lr"]) == pytest.approx(0.01)  # 0.005 per image x batch 2
    h.check_saved_images(ui_server, done[0], 4, "DTI/dti-vs-ti")
    assert any(im.get("type") == "temp" for o in outputs.values() for im in o.get("images", []))


STOPPED_RGB = (0xFF, 0x90, 0x40)  # js/dti_train.js STOPPED_COLOR


def test_cancel_marks_the_chart_names_the_checkpoint_and_lists_it(page, ui_server):
    """Cancel during training: the chart says 'cancelled at step K/N' and names the NAME-stepK
    checkpoint to resume from, which resume_from lists without a manual refresh."""
    steps, every = 60, 2
    name = f"cancel-test-{page.frontend['name']}"  # a name per frontend: the newest one's renderers share a server
    node_id = page.evaluate("""async ([ckpt, image, steps, every, name]) => {
""" + CLEAR_AND_ADD_JS + """        const ck = add("CheckpointLoaderSimple", [0, 0], { ckpt_name: ckpt });
        const img = add("LoadImage", [0, 200], { image });
        const train = add("DTITrain", [380, 0], { name, steps, save_every: every, resolution: 64,
                                                 batch_size: 1, overwrite: true });
        ck.connect(0, train, 0);
        ck.connect(1, train, 1);
        ck.connect(2, train, 2);
        img.connect(0, train, 3);
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [-train.pos[0] + 40, -train.pos[1] + 50];
        app.canvas.setDirty(true, true);
        await app.queuePrompt(0, 1);
        return train.id;
    }""", [h.SD15_CKPT, h.EXAMPLE_IMAGES[0], steps, every, name])
    try:
        page.page.wait_for_function(
            "(id) => { const s = window.__dtiRuns.get(String(id)); return !!(s && s.loss.length >= 5); }",
            arg=node_id, timeout=TRAIN_TIMEOUT * 1000, polling=250)
    except Exception as e:
        raise AssertionError(f"training never got going: {e}\n--- server log ---\n{ui_server.log_tail()}") from None
    ui_server.post_json("/interrupt", {})  # what the Cancel button sends
    page.page.wait_for_function(
        "(id) => { const s = window.__dtiRuns.get(String(id)); return !!(s && s.stopped && s.stopped.checkpoint); }",
        arg=node_id, timeout=120000, polling=250)
    run = page.evaluate("""(id) => { const s = window.__dtiRuns.get(String(id));
        return { stopped: s.stopped, done: s.done, running: s.running, steps: s.steps }; }""", node_id)
    stop = run["stopped"]
    assert stop["kind"] == "cancelled" and run["done"] is None and not run["running"]
    assert 5 <= stop["step"] < steps
    k = stop["checkpoint"]["step"]
    assert k % every == 0 and 0 < k <= stop["step"] + 1, stop
    assert stop["checkpoint"]["file"] == f"{name}-step{k}.safetensors"
    assert (ui_server.embeddings / f"{name}-step{k}.safetensors").is_file()
    assert not (ui_server.embeddings / f"{name}.safetensors").exists()
    # resume_from lists it without pressing R
    page.page.wait_for_function(
        """([id, file]) => app.graph.getNodeById(id).widgets.find((w) => w.name === 'resume_from')
               .options.values.includes(file)""", arg=[node_id, stop["checkpoint"]["file"]], timeout=30000,
        polling=250)
    # and the chart shows it (the orange 'cancelled' lines)
    box = page.evaluate(CHART_BOX_JS, node_id)
    time.sleep(0.5)
    shot = h.REPO_ROOT / "test-artifacts" / f"train_cancelled_{page.frontend['name']}.png"
    shot.parent.mkdir(exist_ok=True)
    page.page.screenshot(path=str(shot), clip=box)
    from PIL import Image
    assert _count_near(Image.open(shot), STOPPED_RGB, tol=30) >= 15, "no 'cancelled' text drawn on the chart"
    assert page.dti_problems() == []


def _fresh_look(tab):
    """The module's shared tab (for tests that load a workflow or only fetch, and run nothing), with its
    console and page errors cleared: what a test finds there is its own."""
    tab.console.clear()
    tab.errors.clear()
    return tab


def test_unused_inputs_are_hidden_until_chosen_and_still_saved(tab):
    """custom_templates shows only with templates = custom, magnitude_value only with magnitude =
    number; hidden, both keep their values in the saved workflow and in the queued prompt."""
    page = _fresh_look(tab)
    wf = h.load_workflow("dti_train_sd15.json")
    got = page.evaluate("""async (wf) => {
        await app.loadGraphData(wf);
        await new Promise((r) => setTimeout(r, 500));
        const node = app.graph._nodes.find((n) => n.type === 'DTITrain');
        const w = (name) => node.widgets.find((x) => x.name === name);
        const box = () => [...document.querySelectorAll('textarea')].find((t) => t.value === w('custom_templates').value);
        const shown = () => {
            const el = box();
            const r = el ? el.getBoundingClientRect() : null;
            return { templates: !!(r && r.width > 0 && r.height > 0 && el.checkVisibility()),
                     templatesWidget: node.isWidgetVisible(w('custom_templates')),
                     magnitude: node.isWidgetVisible(w('magnitude_value')) };
        };
        const state = async () => {
            app.canvas.setDirty(true, true); app.canvas.draw(true, true);
            await new Promise((r) => setTimeout(r, 400));
            const p = await app.graphToPrompt();
            return { shown: shown(), height: node.size[1], queued: p.output[String(node.id)].inputs,
                     saved: p.workflow.nodes.find((n) => String(n.id) === String(node.id)).widgets_values };
        };
        const set = (name, value) => { const x = w(name); x.value = value; x.callback?.(value); };
        const defaults = [w('templates').value, w('magnitude').value];
        const before = await state();
        set('templates', 'custom'); set('magnitude', 'number');
        const after = await state();
        w('custom_templates').value = 'a drawing of {}'; w('magnitude_value').value = 0.5;
        set('templates', defaults[0]);
        set('magnitude', 'mean');
        const hiddenAgain = await state();
        return { before, after, hiddenAgain, defaults };
    }""", wf)
    b, a, again = got["before"], got["after"], got["hiddenAgain"]
    assert got["defaults"][0] != "custom" and got["defaults"][1] == "mean"
    assert b["shown"] == {"templates": False, "templatesWidget": False, "magnitude": False}, b
    assert a["shown"] == {"templates": True, "templatesWidget": True, "magnitude": True}, a
    assert again["shown"] == b["shown"], again
    # hidden, they are still queued and saved with their values
    assert b["queued"]["custom_templates"] and "magnitude_value" in b["queued"]
    assert again["queued"]["custom_templates"] == "a drawing of {}" and again["queued"]["magnitude_value"] == 0.5
    assert "a drawing of {}" in again["saved"] and 0.5 in again["saved"]
    assert len(b["saved"]) == len(next(n for n in wf["nodes"] if n["type"] == "DTITrain")["widgets_values"])
    assert page.dti_problems() == []


def test_template_browser_lists_the_workflows_with_thumbnails(tab):
    """Every shipped workflow is a template (ComfyUI serves the pack's workflows/ folder) with a JPEG
    thumbnail beside it, at the URL the frontend builds for a custom node's template."""
    page = _fresh_look(tab)
    got = page.evaluate("""async () => {
        const list = await (await app.api.fetchApi('/workflow_templates')).json();
        const module = Object.keys(list).find((k) => list[k].includes('dti_train_sd15'));
        const out = {};
        for (const name of list[module] || []) {
            const url = app.api.apiURL(`/workflow_templates/${module}/${name}.jpg`);
            const img = new Image();
            const ok = await new Promise((r) => { img.onload = () => r(true); img.onerror = () => r(false); img.src = url; });
            out[name] = ok ? [img.naturalWidth, img.naturalHeight] : null;
        }
        return { module, out };
    }""")
    assert got["module"], got
    assert sorted(got["out"]) == sorted(n[:-5] for n in h.WORKFLOWS)
    for name, size in got["out"].items():
        assert size and size[0] >= 256 and size[1] >= 192, (name, size)
    assert page.dti_problems() == []


def test_help_pages_are_served_where_the_help_panel_looks_and_aliases_reach_the_page(tab, frontend):
    """The frontend's node help (NodeHelpService, in 1.27.10 as in 1.49+) fetches
    ``/extensions/<pack>/docs/<Node>.md`` for a custom node, the pack taken from the node's
    ``python_module``; the pictures are relative to it. The node search matches ``search_aliases`` from the
    node definitions, which ComfyUI sends since 2026-01 (0.33; 0.3.64 sends none). The panel itself
    opening on each frontend: tests/workflows/test_help_in_the_page.py."""
    page = _fresh_look(tab)
    got = page.evaluate("""async (nodes) => {
        const defs = await app.api.getNodeDefs();
        const out = {};
        for (const n of nodes) {
            const pack = (defs[n].python_module || '').split('.').pop();
            const r = await fetch(`/extensions/${pack}/docs/${n}.md`);
            const text = await r.text();
            const pics = [...text.matchAll(/!\\[[^\\]]*\\]\\(([^)]+)\\)/g)].map((m) => m[1]);
            const loaded = [];
            for (const p of pics) {
                const img = new Image();
                loaded.push(await new Promise((res) => { img.onload = () => res(img.naturalWidth);
                    img.onerror = () => res(0); img.src = `/extensions/${pack}/docs/${p}`; }));
            }
            out[n] = { pack, status: r.status, heading: text.startsWith('# '), loaded,
                       sent: 'search_aliases' in defs[n], aliases: defs[n].search_aliases || [] };
        }
        return out;
    }""", list(h.DTI_NODES))
    for name, g in got.items():
        assert g["pack"] == "ComfyUI-DTI" and g["status"] == 200 and g["heading"], (name, g)
        assert all(w > 0 for w in g["loaded"]), (name, g)
        assert g["aliases"] or not g["sent"], name
    sent = got["DTITrain"]["sent"]
    assert not sent or "textual inversion" in got["DTITrain"]["aliases"]
    assert got["DTITrain"]["loaded"] and got["DTIInterpolationStrip"]["loaded"]
    assert page.dti_problems() == []
