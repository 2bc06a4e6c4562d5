"""DTI Train on the real ComfyUI: under inference mode, on generated SD1.5 / SDXL checkpoints."""

import logging
import math
import os

import pytest
import torch

from dti_core.embedding_file import load_embedding
from tests_host_helpers import run_train


def encode(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_train_writes_a_file_that_clip_text_encode_uses(kind, request, dti_pack, embeddings_dir, comfy_nodes, caplog):
    loaded = request.getfixturevalue(f"fresh_{kind}")
    model, clip, vae = loaded
    name = f"train-{kind}"
    out = run_train(dti_pack, loaded, name=name, steps=2 if kind == "sdxl" else 3,
                    batch_size=1 if kind == "sdxl" else 2)
    prompt, handle, history, preview = out["result"]
    assert prompt == f"embedding:{name}"
    path = embeddings_dir / f"{name}.safetensors"
    emb = load_embedding(str(path))
    assert emb.is_dti and emb.metadata["dti.initializer"] == "cat"
    keys = {"sd15": {"clip_l"}, "sdxl": {"clip_l", "clip_g"}}[kind]
    assert set(emb.vectors) == keys
    for k, v in emb.vectors.items():
        m_star = emb.m_star(k)
        assert m_star is not None and m_star > 0
        assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), m_star), atol=1e-5, rtol=0)
        # the history recorded the same norm every step
        for norms in history["norms"][k]:
            assert norms == pytest.approx([m_star] * v.shape[0], abs=1e-5)
    assert len(history["loss"]) == history["steps"][-1]
    # every encoder's vectors turned away from the initializer ("cat"): none was left out of the graph
    with torch.inference_mode():
        init, _, _ = dti_pack.comfy_host.text.initial_vectors(clip, "cat", 0, "mean")
    for k, v in emb.vectors.items():
        assert (angle(v, init[k]) > 1e-3).all(), f"{k} did not train"

    # The file works through ComfyUI's own CLIPTextEncode path, silently.
    caplog.set_level(logging.WARNING)
    with_emb = encode(clip, f"a photo of embedding:{name}")
    without = encode(clip, "a photo of")
    assert with_emb[0].shape == without[0].shape
    assert not torch.allclose(with_emb[0], without[0])
    bad = [r.getMessage() for r in caplog.records if "embedding" in r.getMessage() or "shape mismatch" in r.getMessage()]
    assert bad == []

    # The same MODEL/CLIP still sample afterwards.
    with torch.inference_mode():
        (cond,) = comfy_nodes.CLIPTextEncode().encode(clip, f"embedding:{name} on a beach")
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        (samples,) = comfy_nodes.common_ksampler(model, 0, 2, 5.0, "euler", "normal", cond, cond, latent)
    assert torch.isfinite(samples["samples"]).all()


def angle(a, b):
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    return 2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))


def test_one_step_turns_the_vector_by_the_batch_scaled_rate(dti_pack, fresh_sd15, embeddings_dir):
    # kappa = 0, beta = 0: one step moves each vector exactly lr * batch_size along the sphere
    # (the reference's scale_lr), so the angle to the start is atan(0.01 * 2).
    _, clip, _ = fresh_sd15
    out = run_train(dti_pack, fresh_sd15, name="one-step", steps=1, kappa=0.0, learning_rate=0.01, batch_size=2)
    with torch.inference_mode():
        init, _, m_star = dti_pack.comfy_host.text.initial_vectors(clip, "cat", 0, "mean")
    v = load_embedding(str(embeddings_dir / "one-step.safetensors")).vectors["clip_l"]
    assert torch.allclose(angle(v, init["clip_l"]), torch.tensor(math.atan(0.02)), atol=1e-4)
    assert out["result"][2]["steps"] == [1] and math.isfinite(out["result"][2]["loss"][0])
    assert out["result"][2]["m_star"]["clip_l"] == pytest.approx(m_star["clip_l"])
    # m* ("mean") is the mean norm of the vocabulary's non-zero rows, read here from the CLIP-L
    # token table itself, and the file records it
    with torch.inference_mode(False):
        table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.detach().float()
        norms = table.norm(dim=-1)
        expected = float(norms[norms > 0].mean())
    assert m_star["clip_l"] == pytest.approx(expected, rel=1e-5)
    meta = load_embedding(str(embeddings_dir / "one-step.safetensors")).metadata
    assert float(meta["dti.m_star.clip_l"]) == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(v.norm(dim=-1), torch.tensor(expected), rtol=1e-5, atol=0)


@pytest.mark.parametrize("hflip", [True, False])
def test_horizontal_flip_hands_the_step_the_mirrored_latents(hflip, dti_pack, fresh_sd15, monkeypatch):
    ct = dti_pack.comfy_host
    model, _, vae = fresh_sd15
    seen = {}

    class Spy(ct.step.DiffusionStep):
        def __init__(self, model, clip, prompts, latents, flipped, *args, **kwargs):
            # the node hands one TrainingLatents per aspect-ratio bucket (here one: both images square),
            # with per-image posterior means (and stds) of the images and their mirrors
            (tl,) = latents
            mean = torch.cat(tl.mean)
            fmean = None if tl.flipped_mean is None else torch.cat(tl.flipped_mean)
            seen["latents"], seen["flipped"] = mean.clone(), None if fmean is None else fmean.clone()
            super().__init__(model, clip, prompts, latents, flipped, *args, **kwargs)

    monkeypatch.setattr(ct.step, "DiffusionStep", Spy)
    imgs = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    run_train(dti_pack, fresh_sd15, name=f"flip-{hflip}", steps=1, batch_size=1, horizontal_flip=hflip, images=imgs)
    with torch.inference_mode():
        expected = model.model.process_latent_in(vae.encode(imgs.flip(2))).float()  # mirror left-right (W axis)
        plain = model.model.process_latent_in(vae.encode(imgs)).float()
    assert torch.allclose(seen["latents"], plain, atol=1e-5)
    if not hflip:
        assert seen["flipped"] is None
        return
    assert seen["flipped"] is not None and not torch.allclose(seen["flipped"], seen["latents"], atol=1e-2)
    assert torch.allclose(seen["flipped"], expected, atol=1e-5)


def test_same_seed_same_embedding_and_reuse_and_retrain(dti_pack, fresh_sd15, embeddings_dir):
    a = run_train(dti_pack, fresh_sd15, name="seed-a")
    b = run_train(dti_pack, fresh_sd15, name="seed-b")
    ea = load_embedding(str(embeddings_dir / "seed-a.safetensors"))
    eb = load_embedding(str(embeddings_dir / "seed-b.safetensors"))
    assert torch.equal(ea.vectors["clip_l"], eb.vectors["clip_l"])
    assert a["result"][2]["loss"] == b["result"][2]["loss"]

    # Queue the identical run again: the existing result is reused, the file untouched.
    path = embeddings_dir / "seed-a.safetensors"
    before = path.read_bytes()
    again = run_train(dti_pack, fresh_sd15, name="seed-a")
    assert "Reused" in again["ui"]["text"][0]
    assert path.read_bytes() == before
    # Different inputs, same name, no overwrite: refused, file untouched.
    with pytest.raises(FileExistsError, match="overwrite"):
        run_train(dti_pack, fresh_sd15, name="seed-a", seed=2)
    assert path.read_bytes() == before
    # After the file is deleted, IS_CHANGED changes and the run trains again.
    cls = dti_pack.nodes.train_node.DTITrain
    present = cls.IS_CHANGED(name="seed-a")
    path.unlink()
    assert cls.IS_CHANGED(name="seed-a") != present
    again = run_train(dti_pack, fresh_sd15, name="seed-a")
    assert "Saved" in again["ui"]["text"][0]
    assert load_embedding(str(path)).vectors["clip_l"].equal(ea.vectors["clip_l"])


def test_cancel_stops_within_a_step_and_leaves_no_final_file(dti_pack, fresh_sd15, embeddings_dir, comfy, monkeypatch):
    mm = comfy.model_management
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == 2:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_train(dti_pack, fresh_sd15, name="cancelled", steps=6, save_every=1)
    finally:
        mm.interrupt_current_processing(False)
    assert max(seen) == 2
    assert not (embeddings_dir / "cancelled.safetensors").exists()
    # the step-1 checkpoint was completed before the cancel and is resumable; step 2 never was
    ck = load_embedding(str(embeddings_dir / "cancelled-step1.safetensors"))
    assert ck.metadata["dti.step"] == "1"
    assert not (embeddings_dir / "cancelled-step2.safetensors").exists()
    assert not [f for f in os.listdir(embeddings_dir) if f.endswith(".tmp")]


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(dti_pack, fresh_sd15, embeddings_dir):
    run_train(dti_pack, fresh_sd15, name="full", steps=4, save_every=2)
    out = run_train(dti_pack, fresh_sd15, name="resumed", steps=4, resume_from="full-step2.safetensors")
    assert out["result"][2]["steps"] == [3, 4]  # resumed at step 2, not restarted
    full = load_embedding(str(embeddings_dir / "full.safetensors")).vectors["clip_l"]
    resumed = load_embedding(str(embeddings_dir / "resumed.safetensors")).vectors["clip_l"]
    assert torch.allclose(full, resumed, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(name="../escape"), "refused"),
    (dict(steps=0), "steps"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(kappa=-1.0), "kappa"),
    (dict(resolution=65), "resolution"),
    (dict(templates="custom", custom_templates="no placeholder"), "placeholder"),
    (dict(initializer="   "), "initializer"),
])
def test_bad_inputs_fail_clearly_and_write_nothing(dti_pack, fresh_sd15, embeddings_dir, bad, match):
    before = sorted(os.listdir(embeddings_dir))
    with pytest.raises(ValueError, match=match):
        run_train(dti_pack, fresh_sd15, **bad)
    assert sorted(os.listdir(embeddings_dir)) == before


def test_model_with_lora_patch_samples_the_same_before_and_after_training(dti_pack, fresh_sd15, comfy_nodes):
    model, clip, vae = fresh_sd15
    lora_model = model.clone()
    key = "diffusion_model.out.2.weight"
    weight = model.model.state_dict()[key]
    g = torch.Generator().manual_seed(5)
    lora_model.add_patches({key: (0.05 * torch.randn(weight.shape, generator=g),)}, 1.0)

    def sample(m):
        with torch.inference_mode():
            (cond,) = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of a cat")
            latent = {"samples": torch.zeros(1, 4, 8, 8)}
            (out,) = comfy_nodes.common_ksampler(m, 3, 2, 5.0, "euler", "normal", cond, cond, latent)
        return out["samples"]

    base_before, lora_before = sample(model), sample(lora_model)
    assert not torch.allclose(base_before, lora_before)  # the patch matters
    run_train(dti_pack, (lora_model, clip, vae), name="with-lora", steps=2, batch_size=1)
    assert torch.allclose(sample(lora_model), lora_before, atol=1e-5)
    assert torch.allclose(sample(model), base_before, atol=1e-5)


def test_sd2_v_prediction_trains_a_clip_h_embedding(dti_pack, fresh_sd2, comfy, embeddings_dir, comfy_nodes):
    import comfy_extras.nodes_model_advanced as adv

    model, clip, vae = fresh_sd2
    assert type(model.model.model_config) is comfy.supported_models.SD20
    with torch.inference_mode():
        vmodel = adv.ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    out = run_train(dti_pack, (vmodel, clip, vae), name="sd2-v", steps=2, batch_size=1)
    emb = load_embedding(str(embeddings_dir / "sd2-v.safetensors"))
    assert set(emb.vectors) == {"clip_h"} and emb.vectors["clip_h"].shape[1] == 1024
    assert torch.allclose(emb.vectors["clip_h"].norm(dim=-1), torch.tensor(emb.m_star("clip_h")), atol=1e-5)
    assert all(torch.isfinite(torch.tensor(out["result"][2]["loss"])))
    with_emb = encode(clip, "a photo of embedding:sd2-v")
    assert not torch.allclose(with_emb[0], encode(clip, "a photo of")[0])


def test_gradient_checkpointing_gives_the_same_embedding(dti_pack, fresh_sd15, embeddings_dir, monkeypatch):
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    run_train(dti_pack, fresh_sd15, name="gc-off", steps=2, gradient_checkpointing=False)
    assert calls == []
    run_train(dti_pack, fresh_sd15, name="gc-on", steps=2, gradient_checkpointing=True)
    assert len(calls) > 0
    off = load_embedding(str(embeddings_dir / "gc-off.safetensors")).vectors["clip_l"]
    on = load_embedding(str(embeddings_dir / "gc-on.safetensors")).vectors["clip_l"]
    assert torch.allclose(off, on, atol=1e-5)
    # the checkpoint wrappers are gone afterwards: the UNet blocks run their own forward again
    unet = fresh_sd15[0].model.diffusion_model
    blocks = list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)
    assert all("forward" not in vars(layer) for b in blocks for layer in b)


def test_gradient_checkpointing_cuts_the_unet_activations_kept_for_backward(dti_pack, fresh_sd15):
    ct = dti_pack.comfy_host
    model, clip, _ = fresh_sd15
    saved = {}
    for gc in (False, True):
        with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip, gc):
            weights = {q.data_ptr() for q in model.model.parameters()}
            total = [0]

            def pack(t):
                if t.data_ptr() not in weights:  # weights are referenced, not copied
                    total[0] += t.numel() * t.element_size()
                return t

            cond = torch.randn(2, 77, 768, requires_grad=True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model.model.apply_model(torch.randn(2, 4, 32, 32), torch.tensor([1.0, 2.0]), c_crossattn=cond)
            out.square().mean().backward()
            saved[gc] = total[0]
    print(f"\nUNet activations kept for backward at 32x32 latents, batch 2: "
          f"{saved[False] / 2**20:.0f} MiB without, {saved[True] / 2**20:.0f} MiB with gradient checkpointing")
    assert saved[True] < 0.25 * saved[False]


def test_gradient_checkpointing_recomputes_the_text_encoder_layers_with_the_same_gradient(dti_pack, fresh_sd15):
    """CLIP-L's 12 layers under checkpointing: the word's gradient is the same and the encoder keeps
    far fewer activations for backward."""
    from tests_host_helpers import assert_checkpointing_keeps_the_gradient
    ct = dti_pack.comfy_host
    model, clip, _ = fresh_sd15
    (_, _, enc), = ct.text.text_encoders(clip).values()
    assert len(ct.autograd.encoder_checkpoint_units(enc)) == 12
    assert_checkpointing_keeps_the_gradient(ct, model, clip, "clip_l", "CLIP-L", 0.25)


def test_explicit_vector_count_starts_every_vector_at_the_initializer_mean(dti_pack, fresh_sdxl, embeddings_dir):
    out = run_train(dti_pack, fresh_sdxl, name="three-vectors", initializer="fluffy cat", num_vectors=3,
                    steps=1, batch_size=1)
    emb = load_embedding(str(embeddings_dir / "three-vectors.safetensors"))
    assert {k: v.shape[0] for k, v in emb.vectors.items()} == {"clip_l": 3, "clip_g": 3}
    assert out["result"][0] == "embedding:three-vectors"
