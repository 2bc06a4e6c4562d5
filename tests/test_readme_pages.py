"""The README as a front page and docs/ as the rest (issue #34, item 3). Pure: reads markdown only.

No fact is lost: every section heading the README had before the split (a fixed snapshot, on purpose)
is a heading, at any level, in README.md or one of docs/*.md. The README stays at most 12 KB with the
install and test commands in its first 40 lines, and every relative link in README.md and docs/*.md
points to a file (and, for a link into a markdown page, to a heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# The README's section headings before the split into docs/ (lines starting with '#' outside code
# blocks; the '#' lines inside its bash/toml examples are comments, not headings). Do not update this
# list when headings move: it is the snapshot the pages must keep covering.
HEADINGS_BEFORE_SPLIT = [
    "ComfyUI-DTI — Directional Textual Inversion for ComfyUI",
    "Install",
    "Nodes (category `DTI`)",
    "Previews while training",
    "Command line (headless)",
    "Getting good results",
    "Lumina 2 / Neta Lumina (Gemma-2)",
    "Z-Image (Qwen3-4B; ComfyUI 0.33 or newer)",
    "FLUX.2 klein (Qwen3-4B / Qwen3-8B; ComfyUI 0.33 or newer)",
    "Wan 2.1 / 2.2 text-to-video (UMT5-XXL)",
    "Qwen-Image (Qwen2.5-VL-7B)",
    "Plain TI, the baseline (`method = ti`)",
    "Did it work? DTI Evaluate (the paper's two scores)",
    "How this matches the paper (SDXL recipe, `scripts/train_sdxl.py` in github `kunheek/dti`)",
    "Example workflows",
    "Run the tests",
    "Launch flags and memory",
    "Layout",
    "Troubleshooting",
]

INSTALL = ("cd ComfyUI/custom_nodes && git clone https://github.com/comfyui-dti/ComfyUI-DTI ComfyUI-DTI "
           "&& pip install -r ComfyUI-DTI/requirements.txt")
TESTS = "bash ComfyUI-DTI/.ci/run"  # the full CI, run from custom_nodes/ (tests/test_ci_run.py runs it so)


def without_code_blocks(text: str) -> str:
    """The text with fenced code blocks blanked (line count kept)."""
    out, fence = [], None
    for line in text.split("\n"):
        m = re.match(r"\s*(```+|~~~+)", line)
        if fence is None and m:
            fence = m.group(1)[0] * 3
            out.append("")
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def headings(path: Path) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$",
                                                      without_code_blocks(path.read_text(encoding="utf-8")),
                                                      re.MULTILINE)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def relative_links(path: Path) -> list[str]:
    text = without_code_blocks(path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`(?!\])", "", text)  # inline code that is not a link's text
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def test_the_pages_exist():
    for name in ("training", "families", "evaluation", "cli", "launch-flags", "troubleshooting", "development",
                 "testing", "host-kernels", "benchmarks"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name


@pytest.mark.parametrize("heading", HEADINGS_BEFORE_SPLIT)
def test_every_readme_heading_of_before_the_split_lands_in_a_page(heading):
    where = [p.relative_to(ROOT).as_posix() for p in PAGES if heading in headings(p)]
    assert where, f"the README heading {heading!r} is no heading of README.md or docs/*.md"


def test_the_readme_is_a_front_page():
    size = README.stat().st_size
    assert size <= 12 * 1024, f"README.md is {size} bytes, over 12 KB"
    top = README.read_text(encoding="utf-8").split("\n")[:40]
    assert INSTALL in top, "the install command is not a line of the README's first 40"
    assert TESTS in top, "the test command is not a line of the README's first 40"
    assert top.index(INSTALL) < top.index(TESTS)


def test_the_readme_keeps_the_family_table_header():
    """tests/host/test_family_layer.py reads the family rows of the README below this header."""
    text = README.read_text(encoding="utf-8")
    assert "\n| family | encoders that learn vectors (file keys) | default resolution | notes |\n|---|---|---|---|\n" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_a_file(page):
    bad = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in {slug(h) for h in headings(dest)}:
            bad.append(f"{target} (no such heading in {dest.name})")
    assert not bad, f"{page.name}: " + "; ".join(bad)
