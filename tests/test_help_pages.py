"""Node help pages (js/docs/<NodeClass>.md, shown in the frontend's node help panel) and search aliases
(SEARCH_ALIASES, matched by the node search), issue #34. Pure: the node sources are read with ast,
never imported, so no ComfyUI is needed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODES = ROOT / "nodes"
DOCS = ROOT / "js" / "docs"  # WEB_DIRECTORY is ./js


def node_classes() -> list[str]:
    tree = ast.parse((NODES / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NODE_CLASS_MAPPINGS" for t in node.targets):
            return [k.value for k in node.value.keys]
    raise AssertionError("nodes/__init__.py has no NODE_CLASS_MAPPINGS")


def class_defs() -> dict[str, ast.ClassDef]:
    out = {}
    for path in NODES.glob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                out[node.name] = node
    return out


CLASSES = node_classes()
DEFS = class_defs()


def search_aliases(cls: ast.ClassDef):
    for node in cls.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SEARCH_ALIASES" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def required_inputs(cls: ast.ClassDef) -> list[str]:
    """The keys of INPUT_TYPES' "required" dict, where INPUT_TYPES returns a dict literal."""
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == "INPUT_TYPES":
            ret = next(n for n in ast.walk(node) if isinstance(n, ast.Return))
            assert isinstance(ret.value, ast.Dict), f"{cls.name}.INPUT_TYPES does not return a dict literal"
            for key, value in zip(ret.value.keys, ret.value.values):
                if isinstance(key, ast.Constant) and key.value == "required":
                    return [k.value for k in value.keys]
    raise AssertionError(f"{cls.name} has no INPUT_TYPES with required inputs")


def page(name: str) -> str:
    return (DOCS / f"{name}.md").read_text(encoding="utf-8")


def test_the_mappings_list_the_seven_nodes():
    assert len(CLASSES) == 7 and "DTITrain" in CLASSES
    assert set(CLASSES) <= set(DEFS)


@pytest.mark.parametrize("name", CLASSES)
def test_each_node_has_a_help_page_with_a_title(name):
    path = DOCS / f"{name}.md"
    assert path.is_file(), f"no help page {path.relative_to(ROOT)}"
    text = page(name)
    assert text.strip(), f"{path.name} is empty"
    assert re.search(r"^# \S", text, re.M), f"{path.name} has no first-level heading"
    assert len(text.splitlines()) <= 120, f"{path.name} is longer than 120 lines"


@pytest.mark.parametrize("name", CLASSES)
def test_every_image_a_page_links_exists(name):
    for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", page(name)):
        assert not re.match(r"[a-z]+:|/", target), f"{name}.md: {target} is not a relative path"
        assert (DOCS / target).resolve().is_file(), f"{name}.md links {target}, which is not under js/docs/"
        assert (DOCS / target).resolve().is_relative_to(DOCS.resolve())


@pytest.mark.parametrize("name", CLASSES)
def test_every_page_names_its_required_inputs(name):
    text = page(name)
    missing = [k for k in required_inputs(DEFS[name]) if not re.search(rf"`{re.escape(k)}`", text)]
    assert not missing, f"{name}.md does not mention {missing}"


def test_the_train_page_names_the_inputs_that_need_judgement():
    text = page("DTITrain")
    for key in ("steps", "learning_rate", "kappa", "magnitude", "templates", "resolution", "gradient_checkpointing",
                "train_encoders", "method", "batch_size", "num_vectors", "save_every", "resume_from", "preview_every"):
        assert f"`{key}`" in text, key
    assert "## Troubleshooting" in text and "## Getting good results" in text


@pytest.mark.parametrize("name", CLASSES)
def test_every_node_has_search_aliases(name):
    aliases = search_aliases(DEFS[name])
    assert isinstance(aliases, list) and aliases, f"{name} has no SEARCH_ALIASES list"
    assert all(isinstance(a, str) and a.strip() for a in aliases), aliases


def test_textual_inversion_finds_dti_train():
    assert "textual inversion" in search_aliases(DEFS["DTITrain"])
