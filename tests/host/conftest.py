"""Fixtures for host tests: a real ComfyUI checkout plus small random checkpoints.

Set ``COMFYUI_PATH`` to a ComfyUI checkout (e.g. ``/opt/ComfyUI``); without it
every test that uses these fixtures is skipped with a loud reason.

Optional: ``DTI_TEST_CACHE=/some/dir`` keeps the generated checkpoints across
sessions (file names carry the generator version, see ``checkpoints.py``).
Optional: ``DTI_TEST_GPU=1`` leaves ComfyUI's device choice alone (default: the
suite forces ``args.cpu = True``, headless CPU, whatever the machine has).

Import traps handled here (ComfyUI 0.3.64):

* ComfyUI has a top-level ``nodes.py``; this pack has a ``nodes/`` package at the
  repo root, which pytest's ``pythonpath = ["."]`` puts on ``sys.path``.  The
  ``comfy`` fixture inserts the ComfyUI folder at ``sys.path[0]`` and, if our
  package was already imported as top-level ``nodes``, evicts it from
  ``sys.modules``, so ``import nodes`` (and ComfyUI's own ``import nodes`` in
  execution.py / comfy_extras) gets ComfyUI's nodes.py.  Tests of this pack must
  therefore never import the pack's node modules as top-level ``nodes.*``.
* ComfyUI also has a regular ``tests`` package (``tests/__init__.py``), which
  shadows this repo's ``tests`` once ComfyUI is first on ``sys.path``.  So the
  helper module is loaded here by file path, under the unique name
  ``dti_host_checkpoints`` (``import dti_host_checkpoints`` works in test modules
  of this folder, or use the ``checkpoints`` fixture).  ``from tests.host.checkpoints
  import ...`` happens to work under pytest's importlib mode (pytest registers this
  repo's ``tests`` namespace in ``sys.modules`` while collecting conftests) but
  gives a second copy of the module and breaks outside pytest: avoid it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
from dti_tests_support import load_by_path  # registered by tests/conftest.py

_HERE = Path(__file__).resolve().parent
ck = load_by_path("dti_host_checkpoints", _HERE / "checkpoints.py")
# Shared helpers for the host tests (``import tests_host_helpers``).
load_by_path("tests_host_helpers", _HERE / "helpers.py")
# What only a GPU runs, emulated on the CPU (``import tests_host_gpu_emulation``).
load_by_path("tests_host_gpu_emulation", _HERE / "gpu_emulation.py")
# ComfyUI after 0.33, emulated on 0.33.0 (``import tests_host_newer_host``).
load_by_path("tests_host_newer_host", _HERE / "newer_host.py")


def _gpu_requested():
    return os.environ.get("DTI_TEST_GPU", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def checkpoints():
    """The helper module ``tests/host/checkpoints.py`` (pure, no pytest)."""
    return ck


@pytest.fixture(scope="session")
def comfy(comfy_path):
    """ComfyUI importable and headless on the CPU (``args.cpu = True`` before
    ``comfy.model_management``).  Returns a namespace of the modules tests need:
    ``path, comfy, sd, model_management, model_base, supported_models,
    model_detection, sample, samplers, utils, folder_paths``."""
    ck.setup_comfy(comfy_path, cpu=not _gpu_requested())
    import comfy as comfy_pkg
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    import folder_paths

    # (``comfy`` is a namespace package, without __file__: check a module in it.)
    for name, mod in (("comfy.sd", comfy.sd), ("folder_paths", folder_paths)):
        got = os.path.realpath(getattr(mod, "__file__", "") or "")
        if not got.startswith(comfy_path + os.sep):
            raise RuntimeError(f"{name} was imported from {got}, not from COMFYUI_PATH={comfy_path}")

    return types.SimpleNamespace(
        path=comfy_path, comfy=comfy_pkg, sd=comfy.sd, model_management=comfy.model_management,
        model_base=comfy.model_base, supported_models=comfy.supported_models,
        model_detection=comfy.model_detection, sample=comfy.sample, samplers=comfy.samplers,
        utils=comfy.utils, folder_paths=folder_paths,
    )


@pytest.fixture(scope="session")
def comfy_nodes(comfy):
    """ComfyUI's own top-level ``nodes`` module (nodes.py: CheckpointLoaderSimple,
    CLIPTextEncode, common_ksampler, ...), guaranteed not to be this pack's ``nodes/``."""
    ck.setup_comfy(comfy.path, cpu=not _gpu_requested())  # re-check: evicts a shadowing ``nodes`` imported since
    import nodes
    got = os.path.realpath(getattr(nodes, "__file__", "") or "")
    if got != os.path.join(comfy.path, "nodes.py"):
        raise RuntimeError(f"`import nodes` resolved to {got}, not ComfyUI's nodes.py")
    return nodes


@pytest.fixture(scope="session")
def embeddings_dir(comfy, tmp_path_factory):
    """A session temp folder registered first among ComfyUI's ``embeddings`` folders,
    so ``clip.tokenize("embedding:NAME")`` finds ``NAME.safetensors`` written here
    (by the ``*_loaded`` CLIPs, which are created after this registration)."""
    p = tmp_path_factory.mktemp("embeddings")
    comfy.folder_paths.add_model_folder_path("embeddings", str(p), is_default=True)
    assert comfy.folder_paths.get_folder_paths("embeddings")[0] == str(p)
    return p


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy, checkpoint_cache_dir):
    """Path of a thin random SD1.5 checkpoint (fp16 safetensors, ~0.5 GB)."""
    return ck.ensure_checkpoint("sd15", checkpoint_cache_dir)


@pytest.fixture(scope="session")
def sdxl_checkpoint(comfy, checkpoint_cache_dir):
    """Path of a thin random SDXL checkpoint (fp16 safetensors, ~2.1 GB)."""
    return ck.ensure_checkpoint("sdxl", checkpoint_cache_dir)


def _load(comfy, path):
    # Same call as CheckpointLoaderSimple: embedding_directory is the list of the
    # "embeddings" folders (ours first), and it runs under torch.inference_mode()
    # like everything ComfyUI's executor runs, so the weights are inference tensors.
    out, records = ck.load_checkpoint(path, embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"))
    return types.SimpleNamespace(out=out, log=records, path=path)


@pytest.fixture(scope="session")
def sd15_load(comfy, embeddings_dir, sd15_checkpoint):
    """``.out`` = (model, clip, vae); ``.log`` = ComfyUI's log records of the load."""
    return _load(comfy, sd15_checkpoint)


@pytest.fixture(scope="session")
def sdxl_load(comfy, embeddings_dir, sdxl_checkpoint):
    return _load(comfy, sdxl_checkpoint)


@pytest.fixture(scope="session")
def sd15_loaded(sd15_load):
    """``(model, clip, vae)`` from ``comfy.sd.load_checkpoint_guess_config`` of the
    SD1.5 checkpoint, loaded under ``torch.inference_mode()`` (as ComfyUI's executor
    does).  Shared by the whole session: do not modify them in place; clone."""
    return sd15_load.out


@pytest.fixture(scope="session")
def sdxl_loaded(sdxl_load):
    """``(model, clip, vae)`` of the SDXL checkpoint; see ``sd15_loaded``."""
    return sdxl_load.out


@pytest.fixture
def fresh_sd15(comfy, embeddings_dir, sd15_checkpoint):
    """A new, independent ``(model, clip, vae)`` of the SD1.5 checkpoint for one test
    (for tests that patch/hook/train the models), loaded exactly like ``sd15_loaded``
    (under ``torch.inference_mode()``).  ~1 s on 2 CPU cores."""
    return _load(comfy, sd15_checkpoint).out


@pytest.fixture
def fresh_sdxl(comfy, embeddings_dir, sdxl_checkpoint):
    """Like ``fresh_sd15`` for SDXL (~2 s, ~2.6 GB resident per live copy)."""
    return _load(comfy, sdxl_checkpoint).out


# Every module of the host layer (comfy_host/), imported by the dti_pack fixture.
HOST_MODULES = ("contracts", "images", "text", "latents", "step", "sampling", "families", "autograd", "ops", "kernels",
                "memory", "paths", "ui", "loaders", "scoring")


@pytest.fixture(scope="session")
def dti_pack(comfy):
    """This repository imported as a ComfyUI custom node package, the way ComfyUI's
    ``load_custom_node`` does (a package from the folder's ``__init__.py``), so the
    pack's relative imports resolve inside it and never to a top-level ``nodes``."""
    root = _HERE.parent.parent
    name = "ComfyUI_DTI_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    spec.loader.exec_module(pack)
    import importlib as _il
    pack.nodes = _il.import_module(name + ".nodes")
    for sub in ("train_node", "embedding_nodes", "inspect_node", "common", "previews"):
        _il.import_module(f"{name}.nodes.{sub}")
    for sub in HOST_MODULES:
        _il.import_module(f"{name}.comfy_host.{sub}")
    _il.import_module(f"{name}.dti_core.buckets")
    return pack


@pytest.fixture(scope="session")
def sd2_checkpoint(comfy, checkpoint_cache_dir):
    """Path of a thin random SD2.x checkpoint (OpenCLIP-H text encoder)."""
    return ck.ensure_checkpoint("sd2", checkpoint_cache_dir)


@pytest.fixture
def fresh_sd2(comfy, embeddings_dir, sd2_checkpoint):
    return _load(comfy, sd2_checkpoint).out


# ---------------------------------------------------------------------------
# Flux.1 dev / schnell, Chroma, SD3.5: separate diffusion-model, text-encoder and VAE
# files (checkpoints.FAMILIES), loaded as UNETLoader + (Dual/Triple)CLIPLoader + VAELoader
# do, under torch.inference_mode().  The T5-XXL is one layer deep unless asked otherwise.
# ---------------------------------------------------------------------------

class FamilyCache:
    """Loads families on demand and keeps the last ``keep`` of them (a loaded Flux or
    Chroma is ~3.5 GB on the CPU: DiT in fp32, encoders in fp16), so a session that
    touches every family does not hold them all.  ``get`` returns the shared load
    (``SimpleNamespace(out=(model, clip, vae), log, paths, seconds, family)``); ``fresh``
    a new, uncached one."""

    def __init__(self, comfy, folder, keep=1):
        self.comfy, self.folder, self.keep = comfy, folder, keep
        self._loads = {}  # insertion order = age

    def _embedding_directory(self):
        return self.comfy.folder_paths.get_folder_paths("embeddings")

    def fresh(self, family, t5_layers=1, t5_dtype=None):
        if family == "sd3-checkpoint":
            return ck.load_sd3_checkpoint(self.folder, embedding_directory=self._embedding_directory())
        return ck.load_family(family, self.folder, embedding_directory=self._embedding_directory(),
                              t5_layers=t5_layers, t5_dtype=t5_dtype)

    def get(self, family, t5_layers=1, t5_dtype=None):
        key = (family, t5_layers, t5_dtype)
        if key in self._loads:
            return self._loads[key]
        while self._loads and len(self._loads) >= self.keep:
            self._loads.pop(next(iter(self._loads)))
        import gc
        gc.collect()
        self._loads[key] = self.fresh(family, t5_layers, t5_dtype)
        return self._loads[key]


@pytest.fixture(scope="session")
def family_cache(comfy, embeddings_dir, checkpoint_cache_dir):
    """The session's ``FamilyCache``: ``family_cache.get("flux-dev")``, ``.get("sd35-large")``,
    ``.get("flux-dev", t5_layers=24)``, ``.fresh("chroma")``, ``.get("sd3-checkpoint")``.
    Every CLIP it builds reads ``embeddings_dir`` (``embedding:NAME``)."""
    return FamilyCache(comfy, checkpoint_cache_dir)


@pytest.fixture
def flux_dev_load(family_cache):
    """Session-shared load of the Flux.1 dev family (``guidance_in``; clip_l + 1-layer
    t5xxl, ``CLIPType.FLUX``): ``.out`` = (model, clip, vae), ``.log``, ``.paths``,
    ``.seconds``.  Shared: do not modify in place; clone."""
    return family_cache.get("flux-dev")


@pytest.fixture
def flux_dev_loaded(flux_dev_load):
    """``(model, clip, vae)`` of Flux.1 dev (supported_models.Flux, model_base.Flux)."""
    return flux_dev_load.out


@pytest.fixture
def flux_schnell_load(family_cache):
    return family_cache.get("flux-schnell")


@pytest.fixture
def flux_schnell_loaded(flux_schnell_load):
    """``(model, clip, vae)`` of Flux.1 schnell (no ``guidance_in``: supported_models.FluxSchnell)."""
    return flux_schnell_load.out


@pytest.fixture
def chroma_load(family_cache):
    return family_cache.get("chroma")


@pytest.fixture
def chroma_loaded(chroma_load):
    """``(model, clip, vae)`` of Chroma (1-layer t5xxl alone, ``CLIPType.CHROMA``)."""
    return chroma_load.out


@pytest.fixture
def sd3_load(family_cache):
    return family_cache.get("sd3")


@pytest.fixture
def sd3_loaded(sd3_load):
    """``(model, clip, vae)`` of SD3.5 (medium layout: qk-norm + dual attention;
    supported_models.SD3) with clip_l + clip_g + 1-layer t5xxl (``CLIPType.SD3``)."""
    return sd3_load.out


@pytest.fixture
def sd3_checkpoint_load(family_cache):
    """The single-file SD3.5 checkpoint (MMDiT + CLIP-L + CLIP-G + VAE, no T5) through
    CheckpointLoaderSimple's call."""
    return family_cache.get("sd3-checkpoint")


@pytest.fixture
def sd3_checkpoint_loaded(sd3_checkpoint_load):
    return sd3_checkpoint_load.out


@pytest.fixture
def fresh_flux_dev(family_cache):
    """A new, independent ``(model, clip, vae)`` of Flux.1 dev for one test (~5 s)."""
    return family_cache.fresh("flux-dev").out


@pytest.fixture
def fresh_flux_schnell(family_cache):
    return family_cache.fresh("flux-schnell").out


@pytest.fixture
def fresh_chroma(family_cache):
    return family_cache.fresh("chroma").out


@pytest.fixture
def fresh_sd3(family_cache):
    return family_cache.fresh("sd3").out
