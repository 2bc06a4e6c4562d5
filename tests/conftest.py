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
# where set-up time goes (model generation, server and browser starts), for .ci/run's report
timings = load_by_path("dti_test_timings", Path(__file__).resolve().parent / "timings.py")


REPO_ROOT = Path(__file__).resolve().parents[1]


def enclosing_comfyui(repo=REPO_ROOT, cwd=None) -> str | None:
    """The ComfyUI this pack is installed in (``ComfyUI/custom_nodes/<pack>``: two levels up), or None.

    Checked both through the repository's real path and through the logical working directory
    (``$PWD``), so a pack symlinked into ``custom_nodes`` is found too when run from there."""
    repo = Path(repo).resolve()
    candidates = [repo.parent.parent]
    logical = cwd if cwd is not None else os.environ.get("PWD", "")
    if logical and Path(logical).resolve() == repo:
        candidates.insert(0, Path(logical).parent.parent)
    for cand in candidates:
        if _checkpoints.is_comfyui_dir(cand):
            return str(cand.resolve())
    return None


@pytest.fixture(scope="session")
def comfy_path():
    """Absolute path of the ComfyUI checkout: ``COMFYUI_PATH`` when set, else the ComfyUI this pack
    sits in (``custom_nodes/<pack>``); skips loudly if neither is usable."""
    p = os.environ.get("COMFYUI_PATH", "")
    if not p:
        found = enclosing_comfyui()
        if found:
            return found
        pytest.skip(SKIP + "set COMFYUI_PATH to a ComfyUI checkout, e.g. /opt/ComfyUI, or run from inside "
                    "ComfyUI/custom_nodes/<pack> (COMFYUI_PATH is unset and the pack is not inside a ComfyUI)")
    if not _checkpoints.is_comfyui_dir(p):
        pytest.skip(SKIP + f"set COMFYUI_PATH to a ComfyUI checkout, e.g. /opt/ComfyUI (COMFYUI_PATH={p!r})")
    return str(Path(p).resolve())

HOST_DIRS = (os.sep + "host" + os.sep, os.sep + "workflows" + os.sep)


@pytest.fixture(scope="session")
def checkpoint_cache_dir(tmp_path_factory, comfy_path):
    """The one folder every layer generates its checkpoints into: ``$DTI_TEST_CACHE/comfyui-<version>``
    if set, else a session temp folder. One folder, not one per layer: the generated files take
    ~12 GB. One per host version: the thin models are built from the host's own classes, whose
    layouts differ between versions (0.33's Flux has other keys than 0.3.64's)."""
    env = os.environ.get("DTI_TEST_CACHE")
    if env:
        p = Path(env).expanduser().resolve() / f"comfyui-{_checkpoints.comfyui_version(comfy_path) or 'unknown'}"
        p.mkdir(parents=True, exist_ok=True)
        return p
    return tmp_path_factory.mktemp("dti_checkpoints")


def _file_times(terminalreporter):
    """With ``DTI_FILE_TIMES=N`` (.ci/run sets it): the N test files that took longest, set-up and
    teardown included (a session fixture's cost lands on the first file that asks for it)."""
    top = int(os.environ.get("DTI_FILE_TIMES") or 0)
    if top <= 0:
        return
    per_file: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if hasattr(rep, "duration") and hasattr(rep, "nodeid") and rep.nodeid:
                f = rep.nodeid.split("::")[0]
                per_file[f] = per_file.get(f, 0.0) + rep.duration
    if not per_file:
        return
    terminalreporter.write_sep("=", f"time per test file (the slowest {min(top, len(per_file))} of {len(per_file)}, "
                                    f"{sum(per_file.values()):.0f} s in all)")
    for f, secs in sorted(per_file.items(), key=lambda kv: -kv[1])[:top]:
        terminalreporter.write_line(f"{secs:8.1f}s  {f}")


def _test_times(terminalreporter):
    """With ``DTI_TEST_TIMES=PATH``: every test's seconds (set-up, call and teardown together), the
    slowest first, as ``seconds<TAB>test id`` lines in PATH (written whole through a temp file)."""
    path = os.environ.get("DTI_TEST_TIMES")
    if not path:
        return
    per_test: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if hasattr(rep, "duration") and getattr(rep, "nodeid", ""):
                per_test[rep.nodeid] = per_test.get(rep.nodeid, 0.0) + rep.duration
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for nodeid, secs in sorted(per_test.items(), key=lambda kv: -kv[1]):
            f.write(f"{secs:.2f}\t{nodeid}\n")
    os.replace(tmp, path)


def pytest_terminal_summary(terminalreporter):
    _file_times(terminalreporter)
    _test_times(terminalreporter)
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
