"""The Lumina 2 example workflow against the real server: every node and input valid, the learned
word reaching the stock CLIPTextEncode through DTI Enable Embeddings, the Gemma-2 recipe's settings.

Running it end to end needs a Gemma-2 file that the stock CLIPLoader builds (26 layers, 256k vocabulary:
5.2 GB of fp16 weights in memory on the CPU): tests/host/checkpoints.py writes one whose idle blocks and
unused vocabulary rows are sparse-file holes (0.3 GB on disk), and the run test starts a server of its own.
"""

import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import dti_host_checkpoints as ck
import dti_workflow_harness as h
from dti_core.embedding_file import load_embedding

NAME = "dti_train_lumina2.json"


def test_lumina2_workflow_is_valid_and_wired_through_enable_embeddings(object_info):
    prompt = h.ui_to_api(h.load_workflow(NAME), object_info)
    assert h.validate_prompt(prompt, object_info) == []
    by_type = {}
    for nid, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append((nid, node))
    (loader_id, loader), = by_type["CLIPLoader"]
    assert loader["inputs"]["type"] == "lumina2"
    (train_id, train), = by_type["DTITrain"]
    assert train["inputs"]["clip"] == [loader_id, 0]
    assert train["inputs"]["kappa"] == 5e-5 and train["inputs"]["steps"] == 500 and train["inputs"]["resolution"] == 0
    (enable_id, enable), = by_type["DTIEnableEmbeddings"]
    assert enable["inputs"]["clip"] == [loader_id, 0]
    encodes = by_type["CLIPTextEncode"]
    assert len(encodes) == 2 and all(n["inputs"]["clip"] == [enable_id, 0] for _, n in encodes)
    # CLIPTextEncodeLumina2's "superior" system prompt (comfy_extras/nodes_lumina2.py), then the separator
    system = ("You are an assistant designed to generate superior images with the superior degree of "
              "image-text alignment based on textual prompts or user prompts. <Prompt Start> ")
    (_, replace), = by_type["StringReplace"]
    assert replace["inputs"]["string"].startswith(system) and replace["inputs"]["replace"] == [train_id, 0]


RUN_TIMEOUT = 900.0


def _trim_this_process():
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


def _peak_rss_bytes(pid):
    """VmHWM (peak resident set) of a live process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_lumina2_workflow_trains_on_the_server(comfy_path, test_checkpoints, tmp_path_factory):
    """The shipped Lumina 2 workflow, cut to CPU size, queued through POST /prompt on a server of its own:
    UNETLoader (thin NextDiT) + CLIPLoader(type lumina2) with a full-config Gemma-2-2B file (the stock
    loader's fixed 26 layers / 256k vocabulary; idle blocks and unused rows are holes) + VAELoader -> DTI
    Train; then DTI Enable Embeddings -> stock CLIPTextEncode reads the learned word, and its conditioning
    differs from the same prompt with the initializer word (both printed by PreviewAny)."""
    folder = Path(test_checkpoints["sd15"]).parent
    ck.setup_comfy(comfy_path, cpu=True)
    files = ck.ensure_lumina2_files(folder)
    gemma = ck.ensure_gemma2_2b_full(folder)
    # The server holds a full-shape Gemma (~11 GiB peak on the CPU) beside this process, which still
    # holds the host tests' models: hand freed heap back to the system first (24 GiB machines).
    _trim_this_process()
    srv = h.ComfyServer(comfy_path, tmp_path_factory.mktemp("comfyui_lumina2"))
    srv.prepare()
    srv.link_model(files["diffusion_model"], "diffusion_models", h.LUMINA2_DIT)
    srv.link_model(gemma, "text_encoders", h.LUMINA2_GEMMA)
    srv.link_model(files["vae"], "vae", h.FLUX_VAE)
    h.write_example_images(srv.input)
    srv.start(timeout=240)
    try:
        info = srv.object_info()
        prompt = h.ui_to_api(h.load_workflow(NAME), info)
        h.set_inputs(prompt, "EmptySD3LatentImage", width=64, height=64)
        h.set_inputs(prompt, "KSampler", steps=1)
        # two steps, one prompt per step at 256 px: every step runs the whole 26-layer Gemma forward and back
        h.set_inputs(prompt, "DTITrain", steps=2, resolution=256, batch_size=1, templates="custom",
                     custom_templates="a photo of {}")
        (rid, replace), = [(k, v) for k, v in prompt.items() if v["class_type"] == "StringReplace"]
        (enable_id,) = [k for k, v in prompt.items() if v["class_type"] == "DTIEnableEmbeddings"]
        (learned_id,) = [k for k, v in prompt.items()
                         if v["class_type"] == "CLIPTextEncode" and v["inputs"]["text"] == [rid, 0]]
        # the same prompt with the plain initializer word, through the same CLIP
        prompt["plain_text"] = {"class_type": "StringReplace", "inputs": {**replace["inputs"], "replace": "dog"}}
        prompt["plain_cond"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": [enable_id, 0],
                                                                            "text": ["plain_text", 0]}}
        prompt["show_learned"] = {"class_type": "PreviewAny", "inputs": {"source": [learned_id, 0]}}
        prompt["show_plain"] = {"class_type": "PreviewAny", "inputs": {"source": ["plain_cond", 0]}}
        prompt["show_text"] = {"class_type": "PreviewAny", "inputs": {"source": [rid, 0]}}
        assert h.validate_prompt(prompt, info) == []

        started = len(srv.log_tail(10**9))  # ComfyUI's own start-up import failures are not this run's
        t0 = time.monotonic()
        entry = srv.run(prompt, timeout=RUN_TIMEOUT)
        seconds = time.monotonic() - t0
        peak = _peak_rss_bytes(srv.proc.pid)
        print(f"\nLumina 2 workflow: {seconds:.0f} s, server peak RSS {peak / 2**30:.2f} GiB")

        emb = load_embedding(str(srv.embeddings / "my-concept-lumina.safetensors"))
        assert set(emb.vectors) == {"gemma2_2b"} and emb.metadata["dti.model_family"] == "Lumina 2"
        assert emb.metadata["dti.steps"] == "2" and emb.metadata["dti.initializer"] == "dog"
        v = emb.vectors["gemma2_2b"]
        assert v.dtype == torch.float32 and v.shape[-1] == 2304
        # m*: mean norm of the rows the tokenizer can reach (the table's zero tail is not counted), as
        # they enter where the learned rows do: 0.33's lookup scales token rows by sqrt(2304) and not
        # embedding:NAME rows; 0.3.64 scales both after the lookup (tests/host/test_lumina.py)
        import comfy.text_encoders.llama as llama
        scale = 2304 ** 0.5 if hasattr(llama, "_make_scaled_embedding") else 1.0
        with safe_open(str(gemma), framework="pt") as f:
            table = f.get_tensor("model.embed_tokens.weight")[: files["vocab_size"]].float()
        assert emb.m_star("gemma2_2b") == pytest.approx(scale * table.norm(dim=-1).mean().item(), rel=1e-4)
        assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), emb.m_star("gemma2_2b")), atol=1e-5)

        def shown(nid):
            return entry["outputs"][nid]["text"][0]
        assert "embedding:my-concept-lumina" in shown("show_text")
        learned, plain = shown("show_learned"), shown("show_plain")
        assert learned.startswith("[[tensor(") and plain.startswith("[[tensor("), learned[:400]
        # PreviewAny prints the first and last three token rows: the system prompt's first tokens are the
        # same in both prompts (causal Gemma), the prompt's last tokens follow the learned word and differ.
        rows_l, rows_p = learned.split("],"), plain.split("],")
        assert rows_l[0] == rows_p[0], (rows_l[0], rows_p[0])
        assert learned != plain

        assert len(h.saved_images(entry)) == 1
        log = srv.log_tail(10**9)[started:]
        # ComfyUI's own warnings when a word is missing, unreadable or of the wrong width (comfy/sd1_clip.py)
        for bad in ("Traceback", "does not exist, ignoring", "error loading embedding", "shape mismatch"):
            assert bad not in log, log[-4000:]
        assert peak < 14 * 2**30, f"server peak RSS {peak / 2**30:.1f} GiB"
    finally:
        srv.stop()
