"""DTI Train on Flux.1, Chroma and SD3/SD3.5 (thin random models that ComfyUI's own loaders detect).

Each family: the node trains every encoder of the family, writes ``clip_l`` / ``clip_g`` / ``t5xxl``
keys at each encoder's m*, and the stock CLIPTextEncode reads the file silently; the flow-matching
loss equals an independent computation; a teacher-student run through the real text path (T5 too)
recovers a known word.
"""

import logging

import pytest
import torch

from dti_core.embedding_file import load_embedding
from tests_host_helpers import replay_draws, run_train, text_encoders_in_fp32

FAMILIES = {
    # fixture: (family name, trained keys)
    "flux_dev": ("Flux.1", {"clip_l", "t5xxl"}),
    "chroma": ("Chroma", {"t5xxl"}),
    "sd3": ("SD3 / SD3.5", {"clip_l", "clip_g", "t5xxl"}),
}


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_family_trains_every_encoder_and_the_stock_encode_reads_the_file(kind, request, dti_pack, embeddings_dir,
                                                                         comfy_nodes, caplog):
    loaded = request.getfixturevalue(f"fresh_{kind}")
    model, clip, _ = loaded
    ct = dti_pack.comfy_host
    family, keys = FAMILIES[kind]
    assert dti_pack.comfy_host.families.family_of(model, clip).name == family
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
    name = f"fam-{kind}"
    # one step (at batch 2): it moves every encoder's word; later steps run the same code (test_train.py)
    out = run_train(dti_pack, loaded, name=name, initializer="cat", steps=1, batch_size=2, resolution=64, kappa=0.0,
                    learning_rate=0.05)
    emb = load_embedding(str(embeddings_dir / f"{name}.safetensors"))
    assert set(emb.vectors) == keys and emb.metadata["dti.model_family"] == family
    widths = {"clip_l": 768, "clip_g": 1280, "t5xxl": 4096}
    for k, v in emb.vectors.items():
        assert v.dtype == torch.float32 and v.shape[1] == widths[k]
        assert emb.m_star(k) == pytest.approx(m_star[k], rel=1e-6)
        assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), m_star[k]), rtol=0, atol=1e-5)
        cos = torch.nn.functional.cosine_similarity(v, init[k], dim=-1)
        assert bool((cos < 1 - 1e-4).all()), f"{k} did not move from the initializer: {cos}"  # (seen: 0.99504)
    assert out["ui"]["text"][0].startswith(f"Saved embedding:{name}")

    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        (with_word,) = comfy_nodes.CLIPTextEncode().encode(clip, f"a photo of embedding:{name}")
        (plain,) = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of cat")
    assert with_word[0][0].shape[-1] == plain[0][0].shape[-1]
    assert not torch.equal(with_word[0][0], plain[0][0])
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == []


def test_sd3_trains_on_one_custom_template(dti_pack, fresh_sd3, embeddings_dir):
    """One training prompt: nothing is probed at the start, and SD3's pooled vector (CLIP-L's joined to
    CLIP-G's) is no single encoder's output, so the batched encode falls back to one encode per prompt
    (it raised "could not find the pooled output" before)."""
    out = run_train(dti_pack, fresh_sd3, name="fam-sd3-one-template", initializer="cat", steps=1, batch_size=2,
                    resolution=64, templates="custom", custom_templates="a photo of a {}")
    emb = load_embedding(str(embeddings_dir / "fam-sd3-one-template.safetensors"))
    assert set(emb.vectors) == {"clip_l", "clip_g", "t5xxl"}
    for k, v in emb.vectors.items():
        assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), emb.m_star(k)), rtol=0, atol=1e-5)
    assert out["ui"]["text"][0].startswith("Saved embedding:fam-sd3-one-template")


def test_flux_flow_loss_equals_an_independent_computation(dti_pack, fresh_flux_dev):
    """Flux dev: x_t = (1 - s) x0 + s n, target n - x0, the transformer called directly with the T5
    conditioning, the CLIP-L pooled vector and the guidance; equal to the node's step."""
    ct = dti_pack.comfy_host
    training = dti_pack.dti_core.training
    model, clip, _ = fresh_flux_dev
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        counts = {k: v.shape[0] for k, v in init.items()}
        prompts = ct.text.tokenize_templates(clip, ["a photo of a {}"], counts)
    latents = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        step = ct.step.DiffusionStep(model, clip, prompts, latents, None, 2, 5, 64, torch.device("cpu"), guidance=2.5)
        embeds = {k: (m_star[k] * init[k]).requires_grad_(True) for k in init}
        loss = step(embeds, 7)
        loss.backward()
        assert all(float(e.grad.abs().max()) > 0 for e in embeds.values()), "an encoder got no gradient"

        with torch.no_grad():
            d = replay_draws(training.step_generator, 5, 7, 2, 3, 1, [(8, 8)] * 3, (8, 8), channels=16, eps=False)
            idx, u, noise = d["idx"], d["u"], d["noise"]
            ms = model.get_model_object("model_sampling")
            # Flux's schedule: sigma(t) = shift-warped t on [0, 1] (ModelSamplingFlux)
            t = (float(ms.timestep(ms.sigma_min)) + u * (float(ms.timestep(ms.sigma_max)) - float(ms.timestep(ms.sigma_min)))).float()
            sigma = ms.sigma(t)
            x0 = latents[idx]
            x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
            tokens = prompts[0].with_vectors({"l": embeds["clip_l"].detach(), "t5xxl": embeds["t5xxl"].detach()})
            cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
            v = model.model.diffusion_model(x_t, sigma, context=cond.expand(2, -1, -1), y=pooled.expand(2, -1),
                                            guidance=torch.full((2,), 2.5)).float()
            expected = ((v - (noise - x0)) ** 2).mean()
    # fp16 text encoder vs the batched path: a few fp16 ulps of the conditioning before an fp32 model
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-3)
    # and the guidance really reaches the model (dev is guidance-distilled)
    with torch.inference_mode(False), torch.no_grad():
        v2 = model.model.diffusion_model(x_t, sigma, context=cond.expand(2, -1, -1), y=pooled.expand(2, -1),
                                         guidance=torch.full((2,), 7.0)).float()
    assert not torch.allclose(v, v2)


# One convergence run per encoder class (docs/testing.md): SD3's holds CLIP-L, CLIP-G and T5-XXL, Flux's
# CLIP-L and T5-XXL are the same classes (Flux's own encode and step are pinned by test_loss.py and
# test_flux_flow_loss_equals_an_independent_computation).
@pytest.mark.parametrize("kind", ["sd3"])
def test_teacher_student_recovers_a_word_through_clip_and_t5(kind, request, dti_pack):
    """Target: the conditioning (and pooled vector) of "a photo of a dog"; the student word starts
    at "car". Every encoder's learned direction must turn toward its own "dog" token."""
    ct = dti_pack.comfy_host
    core = dti_pack.dti_core.training
    model, clip, _ = request.getfixturevalue(f"fresh_{kind}")
    encoders = ct.text.text_encoders(clip)
    with torch.inference_mode():
        target, target_pooled = clip.encode_from_tokens(clip.tokenize("a photo of a dog"), return_pooled=True)
        init, mu, m_star = ct.text.initial_vectors(clip, "car", 0, "mean")
        counts = {k: v.shape[0] for k, v in init.items()}
        prompt, = ct.text.tokenize_templates(clip, ["a photo of a {}"], counts)
        dog = {k: ct.text.initializer_ids(tok, "dog") for k, (_, tok, _) in encoders.items()}
    assert all(n == 1 for n in counts.values()) and all(len(d) == 1 for d in dog.values())
    with torch.inference_mode(False):
        target, target_pooled = target.clone().float(), target_pooled.clone().float()
        dog_dir = {k: torch.nn.functional.normalize(ct.text.vocabulary(enc)[dog[k]].detach().float().clone(), dim=-1)
                   for k, (_, _, enc) in encoders.items()}

    def cos(vectors):
        return {k: float((torch.nn.functional.normalize(v, dim=-1) * dog_dir[k]).sum()) for k, v in vectors.items()}

    def loss_fn(embeds, step):
        tokens = prompt.with_vectors({tk: embeds[k] for k, (tk, _, _) in encoders.items()})
        cond, pooled = ct.text.encode_tokens(clip, tokens)
        # summed over token positions: only the word's position (and what attends to it) differs,
        # so a mean over hundreds of T5 positions would leave the T5 vectors almost no gradient
        return ((cond.float() - target) ** 2).mean(-1).sum() + ((pooled.float() - target_pooled) ** 2).mean()

    # (text_encoders_in_fp32: the same numbers, without ComfyUI's per-call weight casts)
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip), \
            text_encoders_in_fp32(ct, clip):
        before = cos(init)
        result = core.train(init, mu, m_star, loss_fn, core.TrainConfig(steps=30, lr=0.05, kappa=0.0))
    after = cos(result.vectors)
    print(f"\n{kind} teacher-student: cos(v, dog) " + ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in init)
          + f"; loss {result.history.loss[0]:.3g} -> {result.history.loss[-1]:.3g}")
    assert result.history.loss[-1] < 0.7 * result.history.loss[0], result.history.loss
    for k in init:
        # A clear rise: more than four standard deviations of a random direction's cosine
        # (1/sqrt(width)). Seen: CLIP-L/G 0.02 -> 0.35..0.44, T5 (one random layer) 0.013 -> 0.09..0.10.
        assert after[k] > before[k] + 4 / init[k].shape[-1] ** 0.5, (k, before[k], after[k])
        assert torch.allclose(result.vectors[k].norm(dim=-1), torch.tensor(m_star[k]), atol=1e-5)


def test_load_slerp_strip_and_inspect_work_on_flux_files(dti_pack, flux_dev_loaded, embeddings_dir, comfy_nodes):
    """Files with clip_l and t5xxl rows (T5's own m*) through DTI Load, Slerp Concepts, the strip and Inspect."""
    from dti_core.embedding_file import dti_metadata, save_embedding
    from dti_core.sphere import normalize

    ct = dti_pack.comfy_host
    en = dti_pack.nodes.embedding_nodes
    _, clip, _ = flux_dev_loaded
    with torch.inference_mode():
        _, _, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
    for i, name in enumerate(("fx-a", "fx-b")):
        g = torch.Generator().manual_seed(50 + i)
        vectors = {k: m_star[k] * normalize(torch.randn(2, w, generator=g)) for k, w in (("clip_l", 768), ("t5xxl", 4096))}
        save_embedding(str(embeddings_dir), name, vectors, dti_metadata(m_star=m_star, initializer="cat"))
    with torch.inference_mode():
        _, a = en.DTILoadEmbedding().load("fx-a.safetensors", clip)
        _, b = en.DTILoadEmbedding().load("fx-b.safetensors", clip)
        blend = en.DTISlerpConcepts().slerp(a, b, 0.5, "fx-mid", False)["result"][1]
    for k in ("clip_l", "t5xxl"):
        assert torch.allclose(blend.vectors[k].norm(dim=-1), torch.tensor(m_star[k]), atol=1e-5)
    with torch.inference_mode():
        (cond,), ts = en.DTIInterpolationStrip().encode(clip, "a photo of {}, on a beach", a, b, 3)
        (ref,) = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of embedding:fx-mid, on a beach")
    batch, extra = cond
    assert ts == "0, 0.5, 1" and batch.shape[0] == 3
    assert torch.allclose(batch[1:2], ref[0][0], atol=1e-6, rtol=0)
    assert torch.allclose(extra["pooled_output"][1:2], ref[0][1]["pooled_output"], atol=1e-6, rtol=0)
    with torch.inference_mode():
        report = dti_pack.nodes.inspect_node.DTIInspect().inspect(blend, clip, 3)["result"][0]
    assert "t5xxl" in report and "clip_l" in report and "nearest:" in report


def test_gradient_checkpointing_wraps_each_dit_block_and_keeps_the_gradient(dti_pack, fresh_flux_dev):
    """Flux: gradient_checkpointing recomputes each double/single block (the DiT's own block lists);
    the gradient reaching the vectors is the same, and the wrappers are gone afterwards."""
    ct = dti_pack.comfy_host
    model, clip, _ = fresh_flux_dev
    net = model.model.diffusion_model
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        counts = {k: v.shape[0] for k, v in init.items()}
        prompts = ct.text.tokenize_templates(clip, ["a photo of a {}"], counts)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    grads, wrapped = {}, {}
    for gc in (False, True):
        with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip, gc):
            blocks = list(net.double_blocks) + list(net.single_blocks)
            wrapped[gc] = sum("forward" in vars(b) for b in blocks)
            step = ct.step.DiffusionStep(model, clip, prompts, latents, None, 1, 0, 64, torch.device("cpu"), guidance=3.5)
            embeds = {k: (m_star[k] * init[k]).requires_grad_(True) for k in init}
            step(embeds, 0).backward()
            grads[gc] = {k: e.grad.clone() for k, e in embeds.items()}
    assert wrapped == {False: 0, True: len(blocks)}
    assert all("forward" not in vars(b) for b in blocks)
    for k in grads[False]:
        assert torch.allclose(grads[True][k], grads[False][k], rtol=1e-4, atol=1e-6 * float(grads[False][k].abs().max()))


def test_flux_with_fp8_stored_weights_trains_with_fp32_vectors_at_m_star(dti_pack, flux_dev_load, checkpoints,
                                                                         embeddings_dir):
    """UNETLoader weight_dtype fp8_e4m3fn (how most people run Flux): the transformer's weights stay fp8
    and are cast per layer; the learned vectors are fp32 and at m*."""
    model, log = checkpoints.load_diffusion_model(flux_dev_load.paths["diffusion_model"],
                                                  {"dtype": torch.float8_e4m3fn})
    assert model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    _, clip, vae = flux_dev_load.out
    run_train(dti_pack, (model, clip.clone(), vae), name="flux-fp8", initializer="cat", steps=2, batch_size=1,
              resolution=64, kappa=0.0)
    emb = load_embedding(str(embeddings_dir / "flux-fp8.safetensors"))
    assert model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    for k, v in emb.vectors.items():
        assert v.dtype == torch.float32
        assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), emb.m_star(k)), rtol=0, atol=1e-5)
