"""DTI Train on a real ComfyUI server started with each launch flag users run, through the HTTP API,
on the thin SD1.5 and SDXL models (one server per flag set, both models in one prompt).

Under the sub-quadratic attention (the CPU default and ``--use-quad-cross-attention``) the
server is started with a test-only custom node (``harness.LOW_MEMORY_NODE``) that makes ComfyUI's
attention module see 1 KiB of free memory, so sub-quadratic attention takes its chunked, in-place
path -- the one that failed on busy machines -- instead of depending on how busy this machine is.
``--lowvram`` / ``--novram`` need a GPU (ComfyUI will not start with them otherwise), and so does
0.33's dynamic VRAM (on and off, each run's peak memory recorded): they skip loudly here and run
where one is present (bench/gpu_check.sh).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dti_workflow_harness as h
import dti_host_checkpoints as ck
from dti_core.embedding_file import load_embedding

RUN_TIMEOUT = 600.0

# flag set id -> (extra server args, force the chunked sub-quadratic path, lines the log must show)
# Flags of different kinds (attention, memory, UNet dtype, text-encoder dtype, LoRA) share a server: every
# flag still starts a real ComfyUI and trains both models through it, on 6 servers where one flag each
# took 11 (each ~8 s to start and ~13 s to run here). Flags of one kind exclude each other, so never pair.
FLAGS = {
    "cpu-default": ((), True, ("sub quadratic optimization for attention",)),
    "split-attention+fp8-text-enc": (("--use-split-cross-attention", "--fp8_e4m3fn-text-enc"), False,
                                     ("split optimization for attention", "dtype: torch.float8_e4m3fn")),
    "quad-attention+fp32-text-enc": (("--use-quad-cross-attention", "--fp32-text-enc"), True,
                                     ("sub quadratic optimization for attention", "dtype: torch.float32")),
    "pytorch-attention+bf16-unet": (("--use-pytorch-cross-attention", "--bf16-unet"), False,
                                    ("Using pytorch attention", "model weight dtype torch.bfloat16")),
    "disable-smart-memory+fp8-unet": (("--disable-smart-memory", "--fp8_e4m3fn-unet"), False,
                                      ("model weight dtype torch.float8_e4m3fn",)),
    "force-fp32+lora": (("--force-fp32",), False, ()),
    "lowvram": (("--lowvram",), False, ()),
    "novram": (("--novram",), False, ()),
    # 0.33: dynamic VRAM (comfy-aimdo) is on by default on NVIDIA; both ways, with the run's peak memory
    "dynamic-vram": (("--enable-dynamic-vram",), False, ("DynamicVRAM support detected and enabled",)),
    "disable-dynamic-vram": (("--disable-dynamic-vram",), False, ()),
}
# Flag sets that need a GPU: ComfyUI refuses to start with them (or they do nothing) without one.
GPU_ONLY = {"lowvram", "novram", "dynamic-vram", "disable-dynamic-vram"}


def host_has_flag(comfy_path, flag) -> bool:
    """Whether this ComfyUI's command line knows ``flag`` (0.3.64 has no dynamic-VRAM flags)."""
    from pathlib import Path

    return flag in (Path(comfy_path) / "comfy" / "cli_args.py").read_text(errors="replace")

def write_lora(checkpoint, out_path, prefix="model.diffusion_model.", rank=4, seed=0):
    """A small LoRA on every cross-attention key/value projection of the checkpoint's UNet, in the
    key format ComfyUI maps to the model (``diffusion_model.<module>.lora_up/down.weight``)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(checkpoint), "pt") as f:
        for key in f.keys():
            if key.startswith(prefix) and re.search(r"attn2\.to_[kv]\.weight$", key):
                out_f, in_f = f.get_slice(key).get_shape()
                base = "diffusion_model." + key[len(prefix):-len(".weight")]
                tensors[base + ".lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.05
                tensors[base + ".lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.05
    assert tensors, f"no cross-attention projections found in {checkpoint}"
    save_file(tensors, str(out_path))
    return len(tensors) // 2


def train_prompt(object_info, lora: dict | None = None, **train) -> dict:
    """CheckpointLoaderSimple (-> LoraLoader) -> DTI Train -> PreviewAny, for SD1.5 and SDXL."""
    defaults = {name: spec[1].get("default") for name, spec in object_info["DTITrain"]["input"]["required"].items()
                if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict)}
    prompt = {}
    for i, (kind, ckpt) in enumerate((("sd15", h.SD15_CKPT), ("sdxl", h.SDXL_CKPT))):
        base = 10 * (i + 1)
        prompt[str(base)] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}
        mc = [str(base), 0], [str(base), 1]
        if lora:
            prompt[str(base + 1)] = {"class_type": "LoraLoader", "inputs": {
                "model": mc[0], "clip": mc[1], "lora_name": lora[kind], "strength_model": 1.0, "strength_clip": 1.0}}
            mc = [str(base + 1), 0], [str(base + 1), 1]
        inputs = dict(defaults, model=mc[0], clip=mc[1], vae=[str(base), 2], images=[str(base + 2), 0],
                      name=f"flags-{kind}", initializer="dog", resume_from="(none)")
        inputs.update(train)
        prompt[str(base + 2)] = {"class_type": "LoadImage", "inputs": {"image": h.EXAMPLE_IMAGES[0]}}
        prompt[str(base + 3)] = {"class_type": "DTITrain", "inputs": inputs}
        prompt[str(base + 4)] = {"class_type": "PreviewAny", "inputs": {"source": [str(base + 3), 0]}}
    assert h.validate_prompt(prompt, object_info) == []
    return prompt


@pytest.fixture(scope="module", params=list(FLAGS))
def flag_server(request, comfy_path, test_checkpoints, tmp_path_factory):
    flag_id = request.param
    args, low_memory, _ = FLAGS[flag_id]
    missing = [a for a in args if not host_has_flag(comfy_path, a)]
    if missing:
        pytest.skip(f"this ComfyUI has no {' '.join(missing)} (dynamic VRAM came after 0.3.64)")
    if flag_id in GPU_ONLY and not torch.cuda.is_available():
        pytest.skip(f"LAUNCH FLAG NOT TESTED HERE: {' '.join(args)} needs a GPU (ComfyUI refuses to start with it, or "
                    "ignores it, on a machine without one); partial loading is tested in-process by "
                    "tests/host/test_launch_setups.py::test_partially_loaded_model_trains_like_a_fully_loaded_one, "
                    "the classic patcher a dynamic one is swapped for by tests/host/test_host_differences.py")
    base = tmp_path_factory.mktemp(f"comfyui_{flag_id}")
    srv = h.ComfyServer(comfy_path, base, extra_args=args)
    srv.prepare()
    srv.link_checkpoint(test_checkpoints["sd15"], h.SD15_CKPT)
    srv.link_checkpoint(test_checkpoints["sdxl"], h.SDXL_CKPT)
    h.write_example_images(srv.input)
    if low_memory:
        srv.force_low_attention_memory()
    srv.start(timeout=240.0)
    try:
        yield flag_id, srv
    finally:
        srv.stop()


def test_dti_train_under_launch_flag(flag_server):
    flag_id, srv = flag_server
    _, low_memory, log_lines = FLAGS[flag_id]
    lora = None
    if "lora" in flag_id.split("+"):
        loras = srv.folder("models", "loras")
        lora = {}
        for kind, ckpt in (("sd15", h.SD15_CKPT), ("sdxl", h.SDXL_CKPT)):
            lora[kind] = f"test-{kind}.safetensors"
            write_lora(srv.checkpoints / ckpt, loras / lora[kind])
    info = srv.object_info()
    prompt = train_prompt(info, lora=lora, steps=2, batch_size=2, resolution=64)
    started = len(srv.log_path.read_text(errors="replace"))
    srv.run(prompt, timeout=RUN_TIMEOUT)

    log = srv.log_path.read_text(errors="replace")
    # (ComfyUI's start-up may log tracebacks of its own optional nodes, e.g. without torchaudio)
    assert "Traceback" not in log[started:], log[started:][-6000:]
    if low_memory:
        failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and h.LOW_MEMORY_NODE_DIR in line]
        assert h.LOW_MEMORY_NODE_DIR in log and not failed, "the low-memory forcing node did not load"
    for line in log_lines:
        assert line in log, f"the server did not run with {flag_id!r}: {line!r} not in its log"
    if lora:
        assert "lora key not loaded" not in log and "ERROR lora" not in log
    lines = re.findall(r"DTI Train: peak GPU memory ([0-9.]+) GiB \(([^)]*)\)(?:; weights on the device: (.*))?",
                       log[started:])
    peaks = [float(p) for p, _, _ in lines]
    if torch.cuda.is_available():
        assert len(peaks) == 2, "DTI Train logged no peak GPU memory line"
        if flag_id == "dynamic-vram":
            assert "dynamic VRAM model, trained as a classic fully loaded copy" in log[started:]
        report = h.REPO_ROOT / "test-artifacts" / "launch_flags_memory.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(report.read_text()) if report.is_file() else {}
        data[f"{ck.comfyui_version(srv.comfy_path)} {flag_id}"] = {
            "peak_gib_sd15": peaks[0], "peak_gib_sdxl": peaks[1],
            "patcher": [how for _, how, _ in lines], "resident_sd15": lines[0][2], "resident_sdxl": lines[1][2]}
        report.write_text(json.dumps(data, indent=1))
    else:
        assert peaks == []  # (the line is for CUDA runs only)
    for kind, keys in (("sd15", {"clip_l"}), ("sdxl", {"clip_l", "clip_g"})):
        emb = load_embedding(str(srv.embeddings / f"flags-{kind}.safetensors"))
        assert set(emb.vectors) == keys and emb.metadata["dti.steps"] == "2"
        for key, v in emb.vectors.items():
            # trained vectors stay fp32 and on the sphere of radius m*, whatever the weights' dtype
            assert v.dtype == torch.float32
            m = emb.m_star(key)
            assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), m), rtol=0, atol=1e-5), (key, v.norm(dim=-1), m)
