"""Fixtures for the workflow tests: one real ComfyUI server per session, and headless Chromium.

* ``COMFYUI_PATH`` must point at a ComfyUI checkout; otherwise every test here is skipped with a
  reason starting "HOST TESTS SKIPPED".  The browser tests also skip loudly without Playwright
  (``pip install playwright``) or Chromium (``apt-get install chromium``; or set ``DTI_CHROMIUM`` to
  a Chromium/Chrome binary).  ``playwright install`` is not needed: the system Chromium is used.
* The server is ``python main.py --cpu --listen 127.0.0.1 --port <free> --base-directory <tmp>``
  run from COMFYUI_PATH, with this repository symlinked as ``<tmp>/custom_nodes/ComfyUI-DTI``, the
  generated small SD1.5 / SDXL checkpoints (``tests/host/checkpoints.py``; cached in
  ``DTI_TEST_CACHE`` when set) symlinked under the public names the workflows use, the example
  images in ``<tmp>/input`` and two concept embeddings in ``<tmp>/models/embeddings``.
* ``DTI_UPDATE_DOCS_IMAGES=1`` also copies the screenshots/renders to ``docs/images/`` (tests
  always write them to ``test-artifacts/``, which git ignores).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from dti_tests_support import load_by_path  # registered by tests/conftest.py

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[1]
from dti_tests_support import SKIP  # noqa: E402  (one wording for every host skip)


# Loaded by path under unique names: this repo's ``tests`` package is shadowed by ComfyUI's
# ``tests`` package once ComfyUI is on sys.path.  Same module name as tests/host/conftest.py uses.
h = load_by_path("dti_workflow_harness", _HERE / "harness.py")
ck = load_by_path("dti_host_checkpoints", _HERE.parent / "host" / "checkpoints.py")
from dti_tests_support import timings  # noqa: E402  (tests/timings.py, loaded once by tests/conftest.py)

SERVER_START_TIMEOUT = 240.0


@pytest.fixture(scope="session")
def harness():
    return h


@pytest.fixture(scope="session")
def test_checkpoints(comfy_path, checkpoint_cache_dir):
    """{'sd15': path, 'sdxl': path} of the small generated checkpoints."""
    folder = checkpoint_cache_dir
    paths = {kind: folder / ck.checkpoint_filename(kind) for kind in ("sd15", "sdxl")}
    if not all(p.exists() for p in paths.values()):
        ck.setup_comfy(comfy_path, cpu=True)  # generating needs ComfyUI's classes in this process
        paths = {kind: Path(ck.ensure_checkpoint(kind, folder)) for kind in ("sd15", "sdxl")}
    return paths


@pytest.fixture(scope="session")
def flux_files(comfy_path, test_checkpoints):
    """Thin Flux.1 dev files as users load them: the DiT, CLIP-L, a full-depth T5-XXL in fp8 (the loader
    nodes build T5 from a fixed 24-layer config; ~35 s to generate once, 4.8 GB) and the 16-channel VAE."""
    import torch

    folder = Path(test_checkpoints["sd15"]).parent
    ck.setup_comfy(comfy_path, cpu=True)
    files = ck.ensure_family_files("flux-dev", folder, t5_layers=24, t5_dtype=torch.float8_e4m3fn)
    clip_l, t5 = files["text_encoders"]
    return {"diffusion_model": files["diffusion_model"], "clip_l": clip_l, "t5xxl": t5, "vae": files["vae"]}


def _start_server(base, comfy_path, test_checkpoints, flux_files, extra_args=()):
    """A started ``harness.ComfyServer`` in ``base`` with this pack, the models and the inputs."""
    srv = h.ComfyServer(comfy_path, base, extra_args=extra_args)
    srv.prepare()
    srv.link_checkpoint(test_checkpoints["sd15"], h.SD15_CKPT)
    srv.link_checkpoint(test_checkpoints["sdxl"], h.SDXL_CKPT)
    srv.link_model(flux_files["diffusion_model"], "diffusion_models", h.FLUX_DIT)
    srv.link_model(flux_files["clip_l"], "text_encoders", h.FLUX_CLIP_L)
    srv.link_model(flux_files["t5xxl"], "text_encoders", h.FLUX_T5)
    srv.link_model(flux_files["vae"], "vae", h.FLUX_VAE)
    cache = Path(test_checkpoints["sd15"]).parent
    srv.link_checkpoint(ck.ensure_sd3_checkpoint(cache), h.SD35_CKPT)
    # SD3.5 as its workflow loads it: MMDiT + VAE in the checkpoint, CLIP-G beside Flux's CLIP-L and T5
    srv.link_checkpoint(ck.ensure_sd3_checkpoint(cache, clips=False), h.SD35_MEDIUM_CKPT)
    srv.link_model(ck.ensure_component("clip-g", cache), "text_encoders", h.SD35_CLIP_G)
    # names for the Chroma workflow (it runs on a server of its own, see test_workflows_run.py)
    srv.link_model(ck.ensure_component("chroma", cache), "diffusion_models", h.CHROMA_DIT)
    lumina = ck.ensure_lumina2_files(cache)  # names for the Lumina 2 workflow
    srv.link_model(lumina["diffusion_model"], "diffusion_models", h.LUMINA2_DIT)
    srv.link_model(lumina["text_encoder"], "text_encoders", h.LUMINA2_GEMMA)
    # names only, for validating the Z-Image workflow's loader values (nothing here loads them)
    srv.link_model(lumina["diffusion_model"], "diffusion_models", h.ZIMAGE_DIT)
    srv.link_model(lumina["text_encoder"], "text_encoders", h.ZIMAGE_QWEN3)  # (also FLUX2_QWEN3)
    # and for the FLUX.2 klein workflow's
    srv.link_model(lumina["diffusion_model"], "diffusion_models", h.FLUX2_KLEIN_DIT)
    srv.link_model(flux_files["vae"], "vae", h.FLUX2_VAE)
    # and for the Wan workflow's
    srv.link_model(lumina["diffusion_model"], "diffusion_models", h.WAN_DIT)
    srv.link_model(flux_files["t5xxl"], "text_encoders", h.WAN_UMT5)
    srv.link_model(flux_files["vae"], "vae", h.WAN_VAE)
    # DTI Evaluate's vision models for the DTI-vs-TI workflow: the random CLIP ViT-L/14 file under both
    # names (its DINOv2-large twin reads 518 px, ~6 s an image here; tests/host/test_evaluate.py scores
    # with it); clip_l is Flux's (it carries the text projection)
    vitl = ck.ensure_clip_vision(cache, "clip-vision-vitl")
    srv.link_model(vitl, "clip_vision", h.CLIP_VISION_VITL)
    srv.link_model(vitl, "clip_vision", h.DINOV2_LARGE)
    # and for the Qwen-Image workflow's
    srv.link_model(lumina["diffusion_model"], "diffusion_models", h.QWEN_IMAGE_DIT)
    srv.link_model(lumina["text_encoder"], "text_encoders", h.QWEN_IMAGE_TE)
    srv.link_model(flux_files["vae"], "vae", h.QWEN_IMAGE_VAE)
    h.write_example_images(srv.input)
    h.write_concept_embeddings(srv.embeddings)
    # The shipped workflows run with sub-quadratic attention on its chunked path (what a busy
    # --cpu machine takes), see harness.LOW_MEMORY_NODE.
    srv.force_low_attention_memory()
    srv.start(timeout=SERVER_START_TIMEOUT)
    return srv


def _stop_server(srv, log_name):
    srv.stop()
    try:
        dst = _REPO / "test-artifacts" / log_name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(srv.log_path, dst)
    except OSError:
        pass


@pytest.fixture(scope="session")
def server(comfy_path, test_checkpoints, flux_files, tmp_path_factory):
    """A running ComfyUI (``harness.ComfyServer``) with this pack, the models and the inputs,
    serving the frontend that this ComfyUI's requirements pin: the installed comfyui-frontend-package
    when it is that version, else its unpacked wheel (``harness.pinned_frontend``)."""
    _version, root = h.pinned_frontend(comfy_path)
    extra = ["--front-end-root", str(root)] if root not in (None, "missing") else []
    srv = _start_server(tmp_path_factory.mktemp("comfyui_base"), comfy_path, test_checkpoints, flux_files,
                        extra_args=extra)
    try:
        yield srv
    finally:
        _stop_server(srv, "comfyui-server.log")


# The frontends the browser tests run on: the one ComfyUI pins (installed with its requirements),
# the newest one (an unpacked comfyui-frontend-package wheel, see harness.newest_frontend_root), and
# the newest with its Vue node renderer switched on.
FRONTENDS = ("pinned", "newest", "newest-vue")


@pytest.fixture(scope="session", params=FRONTENDS)
def frontend(request):
    """``{"name", "root" (None: ComfyUI's own choice), "version", "vue_nodes"}`` of the frontend under test.
    The newest one skips loudly when it is not unpacked anywhere."""
    if request.param == "pinned":
        comfy_path = request.getfixturevalue("comfy_path")
        version, root = h.pinned_frontend(comfy_path)
        if root == "missing":
            pytest.skip(SKIP + f"ComfyUI at {comfy_path} pins frontend {version}, this Python has "
                        f"{h.installed_frontend_version()}, and no unpacked {version} wheel is under "
                        f"{h.frontend_cache_dir(version)} (.ci/run unpacks it there)")
        return {"name": "pinned", "root": None, "version": version, "vue_nodes": False}
    root = h.newest_frontend_root()
    if root is None:
        pytest.skip(SKIP + f"frontend {h.NEWEST_FRONTEND} not found: set DTI_FRONTEND_ROOT to the static/ folder "
                    f"of an unpacked comfyui-frontend-package=={h.NEWEST_FRONTEND} wheel, or unpack it under "
                    f"{h.frontend_cache_dir()} (.ci/run does: pip download comfyui-frontend-package=="
                    f"{h.NEWEST_FRONTEND} --no-deps, then unzip)")
    return {"name": request.param, "root": str(root), "version": h.frontend_version_at(root),
            "vue_nodes": request.param == "newest-vue"}


@pytest.fixture(scope="session")
def _newest_server(comfy_path, test_checkpoints, flux_files, tmp_path_factory):
    started = {}

    def get(root):
        if root not in started:
            started[root] = _start_server(tmp_path_factory.mktemp("comfyui_base_newest"), comfy_path,
                                          test_checkpoints, flux_files, extra_args=["--front-end-root", root])
        return started[root]

    try:
        yield get
    finally:
        for srv in started.values():
            _stop_server(srv, "comfyui-server-newest-frontend.log")


@pytest.fixture(scope="session")
def ui_server(frontend, request):
    """The server whose frontend the browser tests drive: ``server`` for the pinned frontend, a second
    ComfyUI started with ``--front-end-root`` for the newest (one for both of its renderers)."""
    if frontend["root"] is None:
        return request.getfixturevalue("server")
    return request.getfixturevalue("_newest_server")(frontend["root"])


@pytest.fixture(scope="session")
def object_info(server):
    info = server.object_info()
    missing = [n for n in ("DTITrain", "DTILoadEmbedding", "DTISlerpConcepts", "DTIInterpolationStrip", "DTIInspect")
               if n not in info]
    if missing:
        raise RuntimeError(f"ComfyUI did not load the pack's nodes {missing}; server log:\n{server.log_tail()}")
    return info


def _chromium_path():
    env = os.environ.get("DTI_CHROMIUM")
    if env:
        return env if os.path.isfile(env) else None
    for cand in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "",
                 shutil.which("google-chrome") or ""):
        if cand and os.path.isfile(cand):
            return cand
    return None


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium through Playwright (sync API), or a loud skip saying what to install."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(SKIP + "browser tests need Playwright: pip install playwright "
                    "(no 'playwright install' needed; the system chromium is used)")
    exe = _chromium_path()
    if exe is None:
        pytest.skip(SKIP + "browser tests need Chromium: apt-get install chromium "
                    "(or set DTI_CHROMIUM to a Chromium/Chrome binary)")
    t0 = time.perf_counter()
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=exe, args=h.BROWSER_ARGS, timeout=60000)
        timings.record("browser start", exe, time.perf_counter() - t0)
    except Exception as e:
        pw.stop()
        pytest.skip(SKIP + f"could not launch Chromium at {exe}: {e}")
    try:
        yield b
    finally:
        b.close()
        pw.stop()


class Page:
    """One browser tab on the server's frontend, recording console errors and page errors."""

    def __init__(self, browser, server, frontend, width=1600, height=1000):
        self.server = server
        self.frontend = frontend
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.page.set_default_timeout(60000)
        self.console = []   # (type, text, url)
        self.errors = []    # uncaught page errors: (message, stack)
        self.responses = []  # (url, status)
        self.page.on("response", lambda r: self.responses.append((r.url, r.status)))
        self.page.on("console", lambda m: self.console.append((m.type, m.text, (m.location or {}).get("url", ""))))
        self.page.on("pageerror", lambda e: self.errors.append((str(e), getattr(e, "stack", "") or "")))

    def open(self):
        # No template browser: it opens (late, on 1.58.1) over the canvas on the first visit only.
        self.server.post_json("/settings/Comfy.TutorialCompleted", True)
        self.page.goto(self.server.url + "/", wait_until="load", timeout=90000)
        self.page.wait_for_function("window.app && window.app.graph && window.LiteGraph && window.app.api",
                                    timeout=90000)
        # With the tutorial marked done no frontend opens its template browser (1.58.1 decides it in
        # firstRunEntry: Comfy.TutorialCompleted skips Comfy.BrowseTemplates; no dialog came within 6 s of
        # the app in 15 opens on the three frontends here, 2026-12-07): a short look for any dialog.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if self.page.evaluate("() => document.querySelectorAll('.p-dialog').length"):
                self.page.keyboard.press("Escape")
            time.sleep(0.25)
        if self.frontend["root"] is not None:
            # The newest frontend: pick its node renderer explicitly (classic canvas or Vue "Nodes 2.0"); its
            # two renderers share one server, which keeps the setting, so it changes at the first tab of each.
            changed = self.page.evaluate("""async (on) => {
                const s = app.extensionManager.setting;
                if (!!s.get('Comfy.VueNodes.Enabled') === on) return false;
                await s.set('Comfy.VueNodes.Enabled', on);
                return true;
            }""", self.frontend["vue_nodes"])
            if changed:
                time.sleep(0.5)
        return self

    def evaluate(self, js, arg=None):
        return self.page.evaluate(js, arg)

    def toasts(self):
        return self.page.evaluate(
            "() => [...document.querySelectorAll('.p-toast-message')].map((e) => e.innerText)")

    def dti_problems(self):
        """Console errors/warnings and page errors that concern this pack (its files or its events)."""
        out = []
        for kind, text, url in self.console:
            if kind in ("error", "warning") and ("ComfyUI-DTI" in url or "dti" in text.lower()):
                out.append(f"console {kind}: {text} ({url})")
        for msg, stack in self.errors:
            if "ComfyUI-DTI" in stack or "dti" in msg.lower():
                out.append(f"page error: {msg}\n{stack}")
        return out

    def close(self):
        self.context.close()


@pytest.fixture(scope="module")
def tab(page_factory):
    """One tab shared by a module's tests on a frontend (opening the frontend takes seconds on this CPU)."""
    page = page_factory()
    try:
        yield page
    finally:
        page.close()


@pytest.fixture(scope="session")
def page_factory(browser, ui_server, frontend):
    """``page_factory()`` opens a new tab on the frontend under test (the caller closes it)."""
    return lambda **kw: Page(browser, ui_server, frontend, **kw).open()


@pytest.fixture
def page(page_factory):
    p = page_factory()
    try:
        yield p
    finally:
        p.close()
