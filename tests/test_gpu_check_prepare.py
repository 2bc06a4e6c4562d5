"""bench/gpu_check.sh's CPU-checkable parts (issue #31): the prepare script's size guard, the import
blocker it writes (recipe A of ../shared/docs/gpu-paths.md), and the server harness's launch flags and
clean-up. Cheap: no ComfyUI, no GPU, no network (the prepare script runs with its downloads off)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dti_tests_support import REPO_ROOT, load_by_path  # tests/conftest.py

PREPARE = REPO_ROOT / "bench" / "gpu_prepare.sh"
CHECK = REPO_ROOT / "bench" / "gpu_check.sh"
h = load_by_path("dti_workflow_harness", REPO_ROOT / "tests" / "workflows" / "harness.py")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("du") is None, reason="needs bash and du")


def fake_repo(tmp_path: Path, wheel_bytes: int) -> tuple[Path, Path]:
    """A repo holding only bench/gpu_prepare.sh and a .whl/ of ``wheel_bytes``, beside a shared/ with one host
    archive and the reference recipe."""
    repo, shared = tmp_path / "repo", tmp_path / "shared"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(PREPARE, repo / "bench" / "gpu_prepare.sh")
    (repo / ".whl").mkdir()
    (repo / ".whl" / "x-1.0-py3-none-any.whl").write_bytes(b"\0" * wheel_bytes)
    (shared / "hosts").mkdir(parents=True)
    (shared / "hosts" / "ComfyUI-9.9.9.tar.gz").write_bytes(b"\0" * 1000)
    (shared / "bench").mkdir()
    (shared / "bench" / "reference_recipe_sdxl.py").write_text("# reference\n")
    return repo, shared


def prepare(repo: Path, shared: Path, limit_mib: int):
    env = dict(os.environ, DTI_SHARED=str(shared), GPU_PREPARE_SKIP_DOWNLOAD="1", GPU_PREPARE_LIMIT_MIB=str(limit_mib))
    return subprocess.run(["bash", str(repo / "bench" / "gpu_prepare.sh")], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=60)


@needs_bash
def test_prepare_copies_what_is_carried_and_passes_under_the_limit(tmp_path):
    repo, shared = fake_repo(tmp_path, 100_000)
    r = prepare(repo, shared, 1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (repo / ".hostarchives" / "ComfyUI-9.9.9.tar.gz").is_file()
    assert (repo / "bench" / ".reference_recipe_sdxl.py").read_text() == "# reference\n"
    m = re.search(r"= ([0-9.]+) MiB \(limit 1 MiB\)", r.stdout)
    assert m and 0.09 < float(m.group(1)) < 0.2, r.stdout  # the wheels, the archive and the recipe, measured
    assert "TOO BIG" not in r.stdout


@needs_bash
def test_prepare_fails_above_the_limit(tmp_path):
    repo, shared = fake_repo(tmp_path, 2 * 1024 * 1024)
    r = prepare(repo, shared, 1)
    assert r.returncode == 1 and "TOO BIG" in r.stdout, r.stdout + r.stderr


def test_prepare_and_check_agree_on_the_carry_and_the_limits():
    """One carry list in both scripts; 60 MiB under the device tool's 64; comfy-kitchen's pure-Python wheel
    (never the 58 MB manylinux one); the GPU budget 480 s."""
    prep, check = PREPARE.read_text(), CHECK.read_text()
    carry = '[".hostarchives", ".whl", "bench/.reference_recipe_sdxl.py"]'
    assert carry in prep and carry in check
    assert "LIMIT_MIB=${GPU_PREPARE_LIMIT_MIB:-60}" in prep
    pure = re.search(r"PURE_WHEELS=\(([^)]*)\)", prep).group(1).split()
    assert "comfy-kitchen==0.2.31" in pure and "--abi none --platform any" in prep
    for needed in ("sqlalchemy", "alembic", "mako", "pydantic", "pydantic-core", "typing-inspection", "annotated-types"):
        assert re.search(rf"\b{needed}==", prep), needed
    assert "BUDGET=${GPU_CHECK_BUDGET_S:-480}" in check


def blocker_source() -> str:
    text = CHECK.read_text()
    m = re.search(r"cat > \"\$BLOCKER/sitecustomize.py\" <<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert m, "gpu_check.sh writes no sitecustomize.py"
    return m.group(1)


def test_import_blocker_hides_the_missing_packages_except_the_carried_ones(tmp_path):
    blocker, elsewhere, carried = tmp_path / "blocker", tmp_path / "elsewhere", tmp_path / "carried"
    for d in (blocker, elsewhere, carried):
        d.mkdir()
    (blocker / "sitecustomize.py").write_text(blocker_source())
    for d, names in ((elsewhere, ("sqlalchemy", "pydantic", "httpx")), (carried, ("pydantic",))):
        for n in names:
            (d / n).mkdir()
            (d / n / "__init__.py").write_text(f"WHERE = {d.name!r}\n")
    probe = textwrap.dedent("""
        import importlib
        for name in ("sqlalchemy", "pydantic", "httpx"):
            try:
                print(name, importlib.import_module(name).WHERE)
            except ModuleNotFoundError:
                print(name, "blocked")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, (blocker, elsewhere))),
               DTI_IMPORT_BLOCKER_ALLOW=str(carried))
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # sqlalchemy: missing on the GPU image and not carried; pydantic: carried; httpx: left alone
    assert r.stdout.split("\n")[:3] == ["sqlalchemy blocked", "pydantic carried", "httpx elsewhere"], r.stdout


@pytest.mark.parametrize("args, cpu", [
    ((), True),
    (("--use-split-cross-attention",), True),
    (("--fp8_e4m3fn-text-enc",), True),
    (("--front-end-root", "/x"), True),
    (("--lowvram",), False),
    (("--novram",), False),
    (("--enable-dynamic-vram",), False),   # --cpu beside it: 0.33 crashes at start in comfy-aimdo
    (("--disable-dynamic-vram",), False),  # --cpu beside it: trains on the CPU, on a GPU machine
])
def test_server_gets_cpu_only_without_a_vram_or_gpu_only_flag(args, cpu):
    assert h.device_args(args) == (["--cpu"] if cpu else [])


FAKE_MAIN = '''
import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_server_dies_with_the_process_that_started_it(tmp_path):
    """What `timeout` does to a test run: the pytest process is killed, no clean-up runs; the server,
    in a session of its own, must not outlive it."""
    comfy = tmp_path / "comfy"
    comfy.mkdir()
    (comfy / "main.py").write_text(FAKE_MAIN)
    starter = textwrap.dedent(f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("hh", {str(REPO_ROOT / "tests" / "workflows" / "harness.py")!r})
        h = importlib.util.module_from_spec(spec); spec.loader.exec_module(h)
        srv = h.ComfyServer({str(comfy)!r}, {str(tmp_path / "base")!r}).start(timeout=30)
        print(srv.proc.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(parent.stdout.readline())
        os.kill(server_pid, 0)  # running
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                break
            # (a zombie until its reaper -- init, or a subreaper -- collects it: count a zombie as gone)
            try:
                if Path(f"/proc/{server_pid}/stat").read_text().split(") ")[1].startswith("Z"):
                    break
            except OSError:
                break
            time.sleep(0.1)
        else:
            os.killpg(server_pid, signal.SIGKILL)
            pytest.fail("the server outlived the process that started it")
    finally:
        if parent.poll() is None:
            parent.kill()
