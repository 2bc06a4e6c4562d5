"""Which ComfyUI the suite tests: `.ci/run` and the ``comfy_path`` fixture find the ComfyUI the pack
is installed in (``ComfyUI/custom_nodes/<pack>``) before COMFYUI_PATH and /opt/ComfyUI.

Runs ``.ci/run --where`` (it only reports, installs nothing) on fake ComfyUI layouts."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dti_tests_support import REPO_ROOT, enclosing_comfyui  # tests/conftest.py

RUN = REPO_ROOT / ".ci" / "run"


def fake_comfyui(root: Path, version="9.9.9") -> Path:
    """Enough of a ComfyUI for both checks: main.py + comfy/ (.ci/run) and comfy/sd.py, nodes.py,
    folder_paths.py (the fixture)."""
    (root / "comfy").mkdir(parents=True)
    for f in ("main.py", "nodes.py", "folder_paths.py", "comfy/sd.py"):
        (root / f).write_text("")
    (root / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    (root / "custom_nodes").mkdir()
    return root


def pack_in(custom_nodes: Path) -> Path:
    """A copy of the pack's .ci/run at custom_nodes/ComfyUI-DTI."""
    pack = custom_nodes / "ComfyUI-DTI"
    (pack / ".ci").mkdir(parents=True)
    shutil.copy(RUN, pack / ".ci" / "run")
    return pack


def where(run: Path, cwd: Path, **env) -> str:
    e = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    e["PWD"] = str(cwd)  # what a shell that cd'ed there passes on (the logical path)
    e.update(env)
    out = subprocess.run(["bash", str(run), "--where"], cwd=cwd, env=e, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def other_comfy(tmp_path):
    return fake_comfyui(tmp_path / "OtherComfyUI", version="1.0.0")


def test_ci_run_picks_the_comfyui_the_pack_is_installed_in(tmp_path, other_comfy):
    comfy = fake_comfyui(tmp_path / "ComfyUI")
    pack = pack_in(comfy / "custom_nodes")
    # the README's way: from custom_nodes/, with a COMFYUI_PATH elsewhere that must not win
    line = where(Path("ComfyUI-DTI/.ci/run"), comfy / "custom_nodes", COMFYUI_PATH=str(other_comfy))
    assert f"ComfyUI 9.9.9 at {comfy} (the ComfyUI this pack is installed in; full)" in line
    assert f"{pack}/.venv-ci/bin/python" in line


def test_ci_run_sees_a_pack_symlinked_into_custom_nodes(tmp_path):
    comfy = fake_comfyui(tmp_path / "ComfyUI")
    real = pack_in(tmp_path / "elsewhere")
    (comfy / "custom_nodes" / "ComfyUI-DTI").symlink_to(real, target_is_directory=True)
    line = where(Path(".ci/run"), comfy / "custom_nodes" / "ComfyUI-DTI", COMFYUI_PATH="")
    assert f"at {comfy} (the ComfyUI this pack is installed in; full)" in line


def test_ci_run_outside_comfyui_uses_comfyui_path(tmp_path, other_comfy):
    pack = pack_in(tmp_path / "src")
    line = where(pack / ".ci" / "run", tmp_path, COMFYUI_PATH=str(other_comfy))
    assert f"ComfyUI 1.0.0 at {other_comfy} (COMFYUI_PATH; full)" in line


def test_ci_run_refuses_a_comfyui_path_that_is_not_one(tmp_path):
    pack = pack_in(tmp_path / "src")
    e = dict(os.environ, COMFYUI_PATH=str(tmp_path))
    out = subprocess.run(["bash", str(pack / ".ci" / "run"), "--where"], env=e, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "is not a ComfyUI" in out.stderr


def test_fixture_finds_the_comfyui_two_levels_up(tmp_path):
    comfy = fake_comfyui(tmp_path / "ComfyUI")
    pack = comfy / "custom_nodes" / "ComfyUI-DTI"
    pack.mkdir()
    assert enclosing_comfyui(pack, cwd="") == str(comfy.resolve())
    # symlinked pack: found through the logical working directory
    real = tmp_path / "elsewhere" / "ComfyUI-DTI"
    real.mkdir(parents=True)
    link = comfy / "custom_nodes" / "linked"
    link.symlink_to(real, target_is_directory=True)
    assert enclosing_comfyui(real, cwd=str(link)) == str(comfy.resolve())
    assert enclosing_comfyui(real, cwd="") is None
    # not inside a ComfyUI at all
    assert enclosing_comfyui(tmp_path / "src" / "pack", cwd="") is None


def test_ci_run_without_a_comfyui_tests_the_archived_hosts_newest_in_full(tmp_path):
    """A fresh clone beside the project's shared/hosts (no ComfyUI around it, no COMFYUI_PATH): every
    archive is a host; the newest by version (0.33.0 > 0.3.64, which name order gets wrong) runs the
    whole suite, the older the subset. --where unpacks nothing."""
    import tarfile

    hosts = tmp_path / "shared" / "hosts"
    hosts.mkdir(parents=True)
    for v in ("0.3.64", "0.33.0"):
        src = fake_comfyui(tmp_path / "src" / v, version=v)
        with tarfile.open(hosts / f"ComfyUI-{v}.tar.gz", "w:gz") as tar:
            for f in src.rglob("*"):
                tar.add(f, arcname=str(f.relative_to(src)), recursive=False)
    pack = pack_in(tmp_path)
    lines = where(pack / ".ci" / "run", tmp_path, COMFYUI_PATH="").splitlines()
    assert len(lines) == 2, lines
    assert f"ComfyUI 0.33.0 at {pack}/.hosts/0.33.0 (archive {hosts}/ComfyUI-0.33.0.tar.gz; full)" in lines[0]
    assert f"ComfyUI 0.3.64 at {pack}/.hosts/0.3.64 (archive {hosts}/ComfyUI-0.3.64.tar.gz; subset)" in lines[1]
    assert not (pack / ".hosts").exists()
    # DTI_HOSTS_DIR names another archive folder
    elsewhere = tmp_path / "elsewhere"
    hosts.rename(elsewhere)
    line = where(pack / ".ci" / "run", tmp_path, COMFYUI_PATH="", DTI_HOSTS_DIR=str(elsewhere))
    assert "ComfyUI 0.33.0" in line and "(archive " + str(elsewhere) in line


def _named_node_ids(array: str) -> list[str]:
    """The test paths and node ids of a bash array in .ci/run (``$W``, ``$H``, ``$T`` expanded)."""
    text = RUN.read_text()
    body = text[text.index(f"\n{array}=(") + len(array) + 3:]
    body = body[:body.index(")\n")]
    names = {"W": "tests/workflows", "H": "tests/host", "T": "tests/host/test_train.py"}
    out = []
    for word in body.replace('"', " ").split():
        if word.startswith("-k") or word.startswith("not") or not ("tests" in word or word.startswith("$")):
            continue
        for k, v in names.items():
            word = word.replace("${%s}" % k, v).replace("$" + k, v)
        out.append(word)
    return out


@pytest.mark.parametrize("array", ["SUBSET_ARGS", "QUICK_ARGS"])
def test_every_test_the_ci_names_exists(array):
    """A renamed test must not drop out of the older host's subset or the quick tier unnoticed (pytest
    would only fail there, in the middle of a CI run): each named file and test function exists."""
    ids = _named_node_ids(array)
    assert len(ids) > 5, ids
    for node in ids:
        path, _, rest = node.partition("::")
        assert (REPO_ROOT / path).is_file() or (not rest and (REPO_ROOT / path).is_dir()), node
        if rest:
            func = rest.split("[")[0]
            assert f"def {func}(" in (REPO_ROOT / path).read_text(), node


def test_timings_summary_sums_each_kind(tmp_path, monkeypatch):
    from dti_tests_support import timings
    log = tmp_path / "t.jsonl"
    monkeypatch.setenv("DTI_TIMINGS", str(log))
    timings.record("server start", "(default flags)", 12.0)
    timings.record("server start", "--lowvram", 3.5)
    timings.record("model generation", "sd15.safetensors", 0.004)
    lines = timings.summary(log)
    assert lines[0].startswith("model generation: 1, 0 s in all (largest: sd15.safetensors 0.0 s)"), lines
    assert lines[1] == "server start: 2, 16 s in all (largest: (default flags) 12.0 s, --lowvram 3.5 s)", lines
    monkeypatch.delenv("DTI_TIMINGS")
    timings.record("server start", "x", 1.0)  # without the variable: nothing written
    assert len(log.read_text().splitlines()) == 3


def test_every_tests_time_is_written_where_asked(tmp_path, monkeypatch):
    import types

    import dti_tests_support as support
    rep = lambda nodeid, when, secs: types.SimpleNamespace(nodeid=nodeid, when=when, duration=secs)
    reporter = types.SimpleNamespace(stats={
        "passed": [rep("tests/a.py::test_x", "call", 2.0), rep("tests/b.py::test_y", "call", 0.5)],
        "": [rep("tests/a.py::test_x", "setup", 1.25), rep("tests/a.py::test_x", "teardown", 0.25),
             rep("tests/b.py::test_y", "setup", 0.1)],
        "warnings": [types.SimpleNamespace(message="no nodeid, no duration")],
    })
    out = tmp_path / "times.tsv"
    support._test_times(reporter)  # without the variable: nothing written
    assert not out.exists()
    monkeypatch.setenv("DTI_TEST_TIMES", str(out))
    support._test_times(reporter)
    assert out.read_text().splitlines() == ["3.50\ttests/a.py::test_x", "0.60\ttests/b.py::test_y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["times.tsv"]  # (the temp file went)
