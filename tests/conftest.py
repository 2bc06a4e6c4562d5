"""Suite-wide: where ComfyUI is (one loud skip), loading helpers by path, and counting host tests."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SKIP = "HOST TESTS SKIPPED: "


def load_by_path(name, path):
    """Import ``path`` as module ``name`` once. Test helpers are loaded this way because this
    repo's ``tests`` package is shadowed by ComfyUI's own ``tests`` package once ComfyUI is on
    sys.path."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


# Reachable from the layer conftests as ``from dti_tests_support import load_by_path``.
sys.modules.setdefault("dti_tests_support", sys.modules[__name__])


_checkpoints = load_by_path("dti_host_checkpoints", Path(__file__).resolve().parent / "host" / "checkpoints.py")


@pytest.fixture(scope="session")
def comfy_path():
    """Absolute path of the ComfyUI checkout from ``COMFYUI_PATH``; skips loudly if unusable."""
    p = os.environ.get("COMFYUI_PATH", "")
    if not _checkpoints.is_comfyui_dir(p):
        pytest.skip(SKIP + f"set COMFYUI_PATH to a ComfyUI checkout, e.g. /opt/ComfyUI (COMFYUI_PATH={p!r})")
    return str(Path(p).resolve())

HOST_DIRS = (os.sep + "host" + os.sep, os.sep + "workflows" + os.sep)


def pytest_terminal_summary(terminalreporter):
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    no_host = 0
    for outcome in counts:
        for rep in terminalreporter.stats.get(outcome, []):
            path = str(getattr(rep, "fspath", "") or rep.nodeid.split("::")[0])
            if any(d in os.sep + path.replace("/", os.sep) for d in HOST_DIRS) and rep.when in ("call", "setup"):
                counts[outcome] += 1
                no_host += outcome == "skipped" and SKIP in str(rep.longrepr)
    terminalreporter.write_line(
        f"host tests: {counts['passed'] + counts['failed']} ran "
        f"({counts['passed']} passed, {counts['failed']} failed), {counts['skipped']} skipped"
        + ("" if no_host == 0 else f"  <-- {no_host} for want of ComfyUI: set COMFYUI_PATH to a checkout")
    )
