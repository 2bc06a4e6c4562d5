"""Chinese and Japanese translations of the nodes (issue #34): locales/<lang>/nodeDefs.json at the pack
root, which ComfyUI's server (app/custom_node_manager.py, GET /i18n) merges under "nodeDefs" and the
frontend reads as nodeDefs.<NodeId>.display_name / .description / .inputs.<input>.name|tooltip /
.outputs.<index>.name|tooltip.

Pure: the English source strings are read from the node sources with ast, never imported, so no
ComfyUI is needed. There is deliberately no locales/en: the frontend shows the node definitions' own
English when no en translation is provided, whereas an en file would take precedence over the code's
strings and go stale."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODES = ROOT / "nodes"
LOCALES = ROOT / "locales"
LANGS = ["zh", "ja"]

# Input / output labels left as they are: identifiers users know in this form.
KEPT_NAMES = {"clip", "vae", "kappa", "t", "top_k", "Latent"}
# Identifiers that must survive translation verbatim wherever the English has them.
PROTECTED = ["embedding:NAME", "{}", "m*", "NAME-stepK", "models/embeddings", "embeddings/NAME.safetensors",
             "torch.load(weights_only=True)", ".pt/.bin", ".pt/.safetensors", "SDXL", "DTI", "CLIP", "VAE"]
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e-?\d+)?")
QUOTED = re.compile(r"(?<![A-Za-z])'([^']+?)'(?![A-Za-z])")
CODE_NAME = re.compile(r"\b(?:[A-Z]+[a-z]+[A-Z]\w*|[A-Z]{2,}[a-z]\w*|\w+_\w+)\b")  # CLIPTextEncode, KSampler, AdamW, clip_l
LABEL_REF = re.compile(r"「([^」]+)」")


def _module(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _assigned(tree: ast.Module, name: str) -> ast.expr:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return node.value
    raise AssertionError(f"no {name}")


def supported_text() -> str:
    """comfy_host.families.supported_text(), from the FAMILIES literal (DTI Train's model tooltip uses it)."""
    families = _assigned(_module(ROOT / "comfy_host" / "families.py"), "FAMILIES")
    names = [call.args[0].value.replace(" (no T5)", "") for call in families.elts]
    return ", ".join(dict.fromkeys(names))


def _text(node: ast.expr) -> str:
    if isinstance(node, ast.JoinedStr):  # the only f-string tooltip interpolates supported_text()
        values = node.values
        assert all(isinstance(v, ast.Constant) or ast.unparse(v.value) == "supported_text()" for v in values), \
            ast.unparse(node)
        return "".join(v.value if isinstance(v, ast.Constant) else supported_text() for v in values)
    return ast.literal_eval(node)


def english() -> dict:
    """{NodeId: {"display_name", "description", "inputs": {key: tooltip}, "outputs": [(name, tooltip)]}}."""
    init = _module(NODES / "__init__.py")
    ids = [k.value for k in _assigned(init, "NODE_CLASS_MAPPINGS").keys]
    display = ast.literal_eval(_assigned(init, "NODE_DISPLAY_NAME_MAPPINGS"))
    classes = {n.name: n for p in NODES.glob("*.py") for n in _module(p).body if isinstance(n, ast.ClassDef)}
    out = {}
    for node_id in ids:
        cls = classes[node_id]
        attrs, arity = {}, {}
        for n in cls.body:
            if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name):
                if isinstance(n.value, ast.Tuple):
                    arity[n.targets[0].id] = len(n.value.elts)
                try:
                    attrs[n.targets[0].id] = ast.literal_eval(n.value)
                except ValueError:
                    pass
        fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "INPUT_TYPES")
        ret = next(n for n in ast.walk(fn) if isinstance(n, ast.Return)).value
        assert isinstance(ret, ast.Dict), f"{node_id}.INPUT_TYPES does not return a dict literal"
        inputs = {}
        for section, group in zip(ret.keys, ret.values):
            if section.value == "hidden":
                continue
            for key, spec in zip(group.keys, group.values):
                opts = spec.elts[1] if len(spec.elts) > 1 else None
                tips = [_text(v) for k, v in zip(opts.keys, opts.values) if k.value == "tooltip"] \
                    if isinstance(opts, ast.Dict) else []
                inputs[key.value] = tips[0] if tips else None
        names, tips = attrs.get("RETURN_NAMES", ()), attrs.get("OUTPUT_TOOLTIPS", ())
        assert len(names) == len(tips) == arity["RETURN_TYPES"], node_id
        out[node_id] = {"display_name": display[node_id], "description": attrs.get("DESCRIPTION"),
                        "inputs": inputs, "outputs": list(zip(names, tips))}
    return out


EN = english()


def load(lang: str) -> dict:
    return json.loads((LOCALES / lang / "nodeDefs.json").read_text(encoding="utf-8"))


def texts(lang: str):
    """(where, English, translation, kind) for every translated string of ``lang``."""
    loc = load(lang)
    for node_id, en in EN.items():
        tr = loc[node_id]
        yield f"{node_id}.display_name", en["display_name"], tr["display_name"], "title"
        if en["description"]:
            yield f"{node_id}.description", en["description"], tr["description"], "title"
        for key, tip in en["inputs"].items():
            yield f"{node_id}.inputs.{key}.name", key, tr["inputs"][key]["name"], "name"
            if tip:
                yield f"{node_id}.inputs.{key}.tooltip", tip, tr["inputs"][key]["tooltip"], "tooltip"
        for i, (name, tip) in enumerate(en["outputs"]):
            yield f"{node_id}.outputs.{i}.name", name, tr["outputs"][str(i)]["name"], "name"
            if tip:
                yield f"{node_id}.outputs.{i}.tooltip", tip, tr["outputs"][str(i)]["tooltip"], "tooltip"


def test_english_source_is_read():
    assert len(EN) == 7 and "DTITrain" in EN
    assert "SDXL" in EN["DTITrain"]["inputs"]["model"] and "{" not in EN["DTITrain"]["inputs"]["model"]
    assert all(tip for en in EN.values() for tip in en["inputs"].values()), "an input without a tooltip"


def test_layout_as_comfyui_loads_it():
    # custom_node_manager.build_translations: <pack>/locales/<lang>/{main,nodeDefs,commands,settings}.json
    assert sorted(p.name for p in LOCALES.iterdir() if p.is_dir()) == sorted(LANGS)
    for lang in LANGS:
        assert sorted(p.name for p in (LOCALES / lang).iterdir()) == ["nodeDefs.json"]


@pytest.mark.parametrize("lang", LANGS)
def test_every_node_input_and_output(lang):
    loc = load(lang)
    assert list(loc) == list(EN), "node ids differ from NODE_CLASS_MAPPINGS"
    for node_id, en in EN.items():
        tr = loc[node_id]
        assert set(tr) == {"display_name", "description", "inputs", "outputs"} - (
            set() if en["description"] else {"description"}), node_id
        assert list(tr["inputs"]) == list(en["inputs"]), f"{node_id}: inputs differ from INPUT_TYPES"
        assert list(tr["outputs"]) == [str(i) for i in range(len(en["outputs"]))], node_id
        for entry in list(tr["inputs"].values()) + list(tr["outputs"].values()):
            assert set(entry) <= {"name", "tooltip"} and "name" in entry, node_id


@pytest.mark.parametrize("lang", LANGS)
def test_nothing_empty_or_left_in_english(lang):
    for where, en, tr, kind in texts(lang):
        assert isinstance(tr, str) and tr.strip() == tr and tr, f"{lang} {where}: empty or padded"
        if kind == "name" and tr in KEPT_NAMES:
            continue
        assert tr != en and CJK.search(tr), f"{lang} {where}: not translated: {tr!r}"


@pytest.mark.parametrize("lang", LANGS)
def test_numbers_values_and_identifiers_survive(lang):
    keys = {k for en in EN.values() for k in en["inputs"]} | {n for en in EN.values() for n, _ in en["outputs"]}
    for where, en, tr, kind in texts(lang):
        if kind == "name":
            continue
        missing = [n for n in NUMBER.findall(en) if n not in tr]
        missing += [q for q in QUOTED.findall(en) if f"'{q}'" not in tr]
        missing += [p for p in PROTECTED if p in en and p not in tr]
        missing += [c for c in CODE_NAME.findall(en) if c not in keys and c not in tr]
        assert not missing, f"{lang} {where}: lost {missing}"


@pytest.mark.parametrize("lang", LANGS)
def test_label_references_name_real_labels(lang):
    # Tooltips refer to other inputs, outputs and nodes by their translated label, in 「」.
    loc = load(lang)
    labels = {tr["display_name"] for tr in loc.values()}
    labels |= {e["name"] for tr in loc.values() for e in [*tr["inputs"].values(), *tr["outputs"].values()]}
    for where, _, tr, _ in texts(lang):
        unknown = set(LABEL_REF.findall(tr)) - labels
        assert not unknown, f"{lang} {where}: 「」 names no label: {unknown}"


@pytest.mark.parametrize("lang", LANGS)
def test_message_syntax_safe(lang):
    # Titles, descriptions and labels go through vue-i18n's message compiler; keep its syntax out.
    for where, _, tr, kind in texts(lang):
        if kind != "tooltip":
            assert not set(tr) & set("{}@|"), f"{lang} {where}: vue-i18n syntax in {tr!r}"
