"""DTI on Lumina 2 (NextDiT + Gemma-2-2B): a thin random model that ComfyUI's own loaders detect.

Gemma is a decoder-only language model whose ComfyUI tokenizer ignores ``embedding:NAME``; the
training prompts carry CLIPTextEncodeLumina2's system prompt, the DiT reads the prompt length from
the encoder's attention mask, and the loss is the flow-matching error at the model's shift (6).
"""

import logging
from pathlib import Path

import pytest
import torch

from dti_core.embedding_file import load_embedding
from dti_tests_support import load_by_path
from tests_host_helpers import images, replay_draws, run_train

# The workflow tests' harness: it reads a shipped workflow's widget values as the frontend lays them out.
harness = load_by_path("dti_workflow_harness", Path(__file__).resolve().parents[1] / "workflows" / "harness.py")


@pytest.fixture(scope="module")
def lumina_files(comfy, checkpoints, checkpoint_cache_dir):
    return checkpoints.ensure_lumina2_files(checkpoint_cache_dir)


@pytest.fixture
def lumina(comfy, checkpoints, checkpoint_cache_dir, embeddings_dir, lumina_files):
    """A fresh ``SimpleNamespace(out=(model, clip, vae), log, paths)``: UNETLoader + CLIPLoader
    (type lumina2; the thin Gemma's model_options) + VAELoader, as ComfyUI's executor runs them."""
    return checkpoints.load_lumina2(checkpoint_cache_dir, embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"))


def token_norm_mean(encoder):
    """Mean norm of Gemma's non-zero token rows as the encoder's own lookup returns them: where the
    learned rows are spliced in (0.33 scales in the lookup, 0.3.64 after it, learned rows too)."""
    emb = encoder.transformer.get_input_embeddings()
    n = emb.weight.shape[0]
    with torch.no_grad():
        norms = torch.cat([emb(torch.arange(i, min(n, i + 8192))).float().norm(dim=-1) for i in range(0, n, 8192)])
    return float(norms[norms > 0].mean())


def test_gemma_rows_are_scaled_in_the_lookup_on_0_33_after_it_on_0_3_64(lumina, dti_pack):
    """0.33's Gemma lookup is a ScaledEmbedding (rows times sqrt(2304) = 48; embedding:NAME rows,
    spliced in after it, are not), 0.3.64 scales every input row after the lookup. m* follows the host:
    the norm its tokens have where learned rows enter, so a learned word is in distribution on both."""
    ct = dti_pack.comfy_host
    _, clip, _ = lumina.out
    enc = ct.text.text_encoders(clip)["gemma2_2b"][2]
    scaled_in_lookup = type(enc.transformer.get_input_embeddings()).__name__ == "ScaledEmbedding"
    scale = ct.text.lookup_scale(enc)
    assert scale == (pytest.approx(2304 ** 0.5, rel=1e-3) if scaled_in_lookup else 1.0)
    with torch.inference_mode():
        _, _, m_star = ct.text.initial_vectors(clip, "cat", 1, "mean")
    assert m_star["gemma2_2b"] == pytest.approx(token_norm_mean(enc), rel=1e-4)


def _stock_lumina_encode(clip, user_prompt):
    from comfy_extras.nodes_lumina2 import CLIPTextEncodeLumina2
    with torch.inference_mode():
        return CLIPTextEncodeLumina2.execute(clip, user_prompt, "superior").result[0]


def test_thin_lumina2_is_detected_by_comfyui_loaders_and_small(lumina, lumina_files, checkpoints, dti_pack):
    model, clip, vae = lumina.out
    assert checkpoints.load_problems(lumina.log) == []
    assert type(model.model).__name__ == "Lumina2" and type(model.model.model_config).__name__ == "Lumina2"
    assert float(model.get_model_object("model_sampling").shift) == 6.0
    ct = dti_pack.comfy_host
    encoders = ct.text.text_encoders(clip)
    assert list(encoders) == ["gemma2_2b"] and ct.text.clip_widths(clip) == {"gemma2_2b": 2304}
    # the tokenizer is the file's SentencePiece model: Gemma's bos (2) first, no end token
    ids = clip.tokenize("a photo of a dog")["gemma2_2b"][0]
    assert ids[0][0] == 2 and ids[-1][0] == ct.text.initializer_ids(encoders["gemma2_2b"][1], "dog")[-1]
    assert dti_pack.comfy_host.families.family_of(model, clip).name == "Lumina 2"
    for key in ("diffusion_model", "text_encoder"):
        # idle blocks are holes: each file takes under 100 MiB of disk
        assert lumina_files[key].stat().st_blocks * 512 < 100 * 2**20


def test_prefix_is_comfyuis_lumina2_system_prompt(dti_pack):
    from comfy_extras.nodes_lumina2 import CLIPTextEncodeLumina2
    fam = dti_pack.comfy_host.families
    assert fam.LUMINA2_PREFIX == CLIPTextEncodeLumina2.SYSTEM_PROMPT["superior"] + " <Prompt Start> "


def test_lumina_trains_through_the_node_and_the_stock_encode_reads_the_file(lumina, dti_pack, embeddings_dir,
                                                                            comfy_nodes, caplog):
    model, clip, vae = lumina.out
    ct = dti_pack.comfy_host
    en = dti_pack.nodes.embedding_nodes
    assert clip.tokenizer.gemma2_2b.embedding_directory is None  # ComfyUI's Gemma tokenizer: no folder
    with torch.inference_mode():
        vocab = ct.text.vocabulary(ct.text.text_encoders(clip)["gemma2_2b"][2])
        m_star = token_norm_mean(ct.text.text_encoders(clip)["gemma2_2b"][2])
        dog = torch.nn.functional.normalize(vocab[ct.text.initializer_ids(clip.tokenizer.gemma2_2b, "dog")].detach().float().clone(), dim=-1)
    out = run_train(dti_pack, lumina.out, name="lumina-dog", initializer="dog", steps=2, batch_size=2,
                    resolution=64, kappa=5e-5, learning_rate=0.05, templates="custom",
                    custom_templates="a photo of a {}\n{} on a beach, a good photo")
    assert out["ui"]["text"][0].startswith("Saved embedding:lumina-dog")
    assert clip.tokenizer.gemma2_2b.embedding_directory is None  # the input CLIP was left alone
    emb = load_embedding(str(embeddings_dir / "lumina-dog.safetensors"))
    assert set(emb.vectors) == {"gemma2_2b"} and emb.metadata["dti.model_family"] == "Lumina 2"
    v = emb.vectors["gemma2_2b"]
    assert v.dtype == torch.float32 and v.shape == dog.shape and v.shape[1] == 2304
    # (m* from the lookup's fp16 rows, so to fp16's rounding averaged over the table; the vectors
    # sit at the file's m* to fp32's)
    assert emb.m_star("gemma2_2b") == pytest.approx(m_star, rel=1e-4)
    assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), emb.m_star("gemma2_2b")), rtol=0, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(v, dog, dim=-1)
    assert bool((cos < 1 - 1e-4).all()), f"the vectors did not move from the initializer: {cos}"

    caplog.set_level(logging.WARNING)
    text = "a photo of embedding:lumina-dog"
    with torch.inference_mode():
        (enabled,) = en.DTIEnableEmbeddings().enable(clip)["result"]
        (with_word,) = comfy_nodes.CLIPTextEncode().encode(enabled, text)
        (ignored,) = comfy_nodes.CLIPTextEncode().encode(clip, text)
        (plain,) = comfy_nodes.CLIPTextEncode().encode(enabled, "a photo of dog")
        # the file's rows, spliced where the tokenizer put the word, give the same conditioning
        (prompt,) = ct.text.tokenize_templates(enabled, ["a photo of {}"], v.shape[0])
        spliced = enabled.encode_from_tokens_scheduled(prompt.with_vectors({"gemma2_2b": v}))
    assert with_word[0][0].shape[-1] == 2304
    assert not torch.equal(with_word[0][0], ignored[0][0]) and not torch.equal(with_word[0][0], plain[0][0])
    assert torch.equal(with_word[0][0], spliced[0][0])
    assert torch.equal(with_word[0][1]["attention_mask"], spliced[0][1]["attention_mask"])
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == []


def test_training_prompt_and_mask_are_what_clip_text_encode_lumina2_gives(lumina, dti_pack, embeddings_dir):
    """The step's text path (system prompt, word at the very end of the prompt, Gemma's hidden layer)
    and the DiT conditioning built from it equal the stock CLIPTextEncodeLumina2's output."""
    from dti_core.embedding_file import dti_metadata, save_embedding
    from dti_core.sphere import normalize

    model, clip, _ = lumina.out
    ct = dti_pack.comfy_host
    fam = dti_pack.comfy_host.families
    (enabled,) = dti_pack.nodes.embedding_nodes.DTIEnableEmbeddings().enable(clip)["result"]
    with torch.inference_mode():
        _, _, m_star = ct.text.initial_vectors(clip, "cat", 2, "mean")
    vectors = m_star["gemma2_2b"] * normalize(torch.randn(2, 2304, generator=torch.Generator().manual_seed(4)))
    save_embedding(str(embeddings_dir), "lum-end", {"gemma2_2b": vectors}, dti_metadata(initializer="cat"))
    for template in ("a photo of a {}", "{}, on a beach"):
        with torch.inference_mode():
            (prompt,) = ct.text.tokenize_templates(enabled, [fam.LUMINA2_PREFIX + template], 2)
            cond, _ = ct.text.encode_each(enabled, [prompt.with_vectors({"gemma2_2b": vectors})], False)
        ref = _stock_lumina_encode(enabled, template.replace("{}", "embedding:lum-end"))
        assert torch.equal(cond[0], ref[0][0]), template
        mask = ref[0][1]["attention_mask"]
        assert mask.shape == (1, cond[0].shape[1]) and bool((mask == 1).all())
    assert prompt.slots["gemma2_2b"][0][1] == 0 + len(prompt.tokens["gemma2_2b"][0]) - 2 - len(  # after bos + prefix
        ct.text.initializer_ids(enabled.tokenizer.gemma2_2b, ", on a beach"))
    # the word at the very end: its vectors are the last rows, nothing follows them
    (end_prompt,) = ct.text.tokenize_templates(enabled, [fam.LUMINA2_PREFIX + "a photo of a {}"], 2)
    n = len(end_prompt.tokens["gemma2_2b"][0])
    assert [j for _, j, _ in end_prompt.slots["gemma2_2b"]] == [n - 2, n - 1]


def test_flow_loss_equals_an_independent_computation(lumina, dti_pack):
    """x_t = (1 - s) x0 + s n at s = the shift-6 warp of t, target n - x0, the NextDiT called
    directly with the Gemma conditioning and num_tokens = the prompt length; equal to the node's step."""
    ct = dti_pack.comfy_host
    training = dti_pack.dti_core.training
    fam = dti_pack.comfy_host.families
    model, clip, _ = lumina.out
    (clip,) = dti_pack.nodes.embedding_nodes.DTIEnableEmbeddings().enable(clip)["result"]
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        counts = {k: v.shape[0] for k, v in init.items()}
        prompts = ct.text.tokenize_templates(clip, [fam.LUMINA2_PREFIX + "a photo of a {}"], counts)
    latents = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        step = ct.step.DiffusionStep(model, clip, prompts, latents, None, 2, 5, 64, torch.device("cpu"), text_mask=True)
        embeds = {k: (m_star[k] * init[k]).requires_grad_(True) for k in init}
        loss = step(embeds, 7)
        loss.backward()
        assert float(embeds["gemma2_2b"].grad.abs().max()) > 0, "the Gemma vectors got no gradient"

        with torch.no_grad():
            d = replay_draws(training.step_generator, 5, 7, 2, 3, 1, [(8, 8)] * 3, (8, 8), channels=16, eps=False)
            idx, u, noise = d["idx"], d["u"], d["noise"]
            t = u.float()  # Lumina's timesteps span [0, 1]: sigma = shift t / (1 + (shift - 1) t)
            sigma = 6.0 * t / (1 + 5.0 * t)
            x0 = latents[idx]
            x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
            tokens = prompts[0].with_vectors({"gemma2_2b": embeds["gemma2_2b"].detach()})
            cond = clip.encode_from_tokens(tokens)
            v = model.model.diffusion_model(x_t, sigma, context=cond.expand(2, -1, -1).float(),
                                            num_tokens=cond.shape[1]).float()
            expected = ((v - (noise - x0)) ** 2).mean()
    # the same fp32 DiT on the same fp16-computed text: equal up to a few fp32 roundings
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)


def test_teacher_student_recovers_a_word_through_gemma(lumina, dti_pack):
    """Target: the conditioning of "<system prompt> <Prompt Start> a photo of a dog"; the student
    word starts at "car". The learned direction must turn toward Gemma's "dog" row."""
    ct = dti_pack.comfy_host
    core = dti_pack.dti_core.training
    fam = dti_pack.comfy_host.families
    model, clip, _ = lumina.out
    (clip,) = dti_pack.nodes.embedding_nodes.DTIEnableEmbeddings().enable(clip)["result"]
    _, tok, enc = ct.text.text_encoders(clip)["gemma2_2b"]
    with torch.inference_mode():
        target = clip.encode_from_tokens(clip.tokenize(fam.LUMINA2_PREFIX + "a photo of a dog"))
        init, mu, m_star = ct.text.initial_vectors(clip, "car", 0, "mean")
        (prompt,) = ct.text.tokenize_templates(clip, [fam.LUMINA2_PREFIX + "a photo of a {}"], 1)
        dog = ct.text.initializer_ids(tok, "dog")
    assert init["gemma2_2b"].shape[0] == 1 and len(dog) == 1
    with torch.inference_mode(False):
        target = target.clone().float()
        dog_dir = torch.nn.functional.normalize(ct.text.vocabulary(enc)[dog].detach().float().clone(), dim=-1)

    def cos(vectors):
        return float((torch.nn.functional.normalize(vectors["gemma2_2b"], dim=-1) * dog_dir).sum())

    def loss_fn(embeds, step):
        cond, _ = ct.text.encode_tokens(clip, prompt.with_vectors({"gemma2_2b": embeds["gemma2_2b"]}))
        # causal attention: only the last position sees the word, so sum over positions
        return ((cond.float() - target) ** 2).mean(-1).sum()

    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        before = cos(init)
        result = core.train(init, mu, m_star, loss_fn, core.TrainConfig(steps=80, lr=0.1, kappa=0.0))
    after = cos(result.vectors)
    assert result.history.loss[-1] < 0.5 * result.history.loss[0], result.history.loss
    # a clear rise: more than eight standard deviations of a random direction's cosine (1/sqrt(2304))
    assert after > before + 8 / 2304 ** 0.5, (before, after, result.history.loss[::10])
    assert torch.allclose(result.vectors["gemma2_2b"].norm(dim=-1), torch.tensor(m_star["gemma2_2b"]), atol=1e-5)


def test_lumina_preview_renders_with_the_system_prompt(lumina, dti_pack, embeddings_dir):
    """A preview on Lumina 2 goes through the stock encode (its attention mask reaches the DiT) with the
    system prompt CLIPTextEncodeLumina2 adds, as training's prompts have it."""
    model, clip, vae = lumina.out
    previews, en = dti_pack.nodes.previews, dti_pack.nodes.embedding_nodes
    out = run_train(dti_pack, lumina.out, name="lumina-preview", initializer="dog", steps=1, batch_size=1,
                    resolution=64, templates="custom", custom_templates="a photo of a {}", preview_every=1,
                    preview_steps=1, preview_prompt="a {} on grass", preview_seed=3)
    image = out["result"][3]
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(image).all()) and float(image.std()) > 0
    emb = load_embedding(str(embeddings_dir / "lumina-preview.safetensors"))
    prefix = dti_pack.comfy_host.families.LUMINA2_PREFIX
    with torch.inference_mode():
        (enabled,) = en.DTIEnableEmbeddings().enable(clip)["result"]
        again = previews.render(model, enabled, vae, emb.vectors, "a {} on grass", 3, 64, 1, prefix=prefix)
        bare = previews.render(model, enabled, vae, emb.vectors, "a {} on grass", 3, 64, 1)
    assert torch.allclose(image, again, atol=1e-5)
    assert not torch.allclose(image, bare, atol=1e-3), "the preview did not carry Lumina 2's system prompt"


def _shipped_train_settings(dti_pack):
    """DTI Train's widget values in the shipped workflows/dti_train_lumina2.json, by input name."""
    (node,) = [n for n in harness.load_workflow("dti_train_lumina2.json")["nodes"] if n["type"] == "DTITrain"]
    slots = harness.widget_slots({"input": dti_pack.nodes.train_node.DTITrain.INPUT_TYPES()})
    assert len(slots) == len(node["widgets_values"]), (slots, node["widgets_values"])
    return {k: v for k, v in zip(slots, node["widgets_values"]) if k is not None}


@pytest.mark.parametrize("wiring", ["loader clip", "enable embeddings clip"])
def test_shipped_workflow_settings_train_with_either_clip(wiring, lumina, dti_pack, embeddings_dir, comfy):
    """The shipped workflow's DTI Train settings (its 'object' templates, batch 4, seed, kappa), steps and
    size cut for a CPU, train through run() with the loader's CLIP and with the CLIP out of DTI Enable
    Embeddings (one CLIP line to every node). Gemma pads nothing, so a step's prompts differ in length."""
    ct, fam = dti_pack.comfy_host, dti_pack.comfy_host.families
    model, clip, vae = lumina.out
    if wiring == "enable embeddings clip":
        (clip,) = dti_pack.nodes.embedding_nodes.DTIEnableEmbeddings().enable(clip)["result"]
    settings = _shipped_train_settings(dti_pack)
    assert settings["templates"] == "object" and settings["batch_size"] == 4 and settings["kappa"] == 5e-5
    name = "shipped-lumina-" + wiring.split()[0]
    # a batch of photos instead of the input folder; 2 steps at 64 px instead of 500 at 1024
    settings.update(name=name, image_folder="", steps=2, resolution=64)

    # The premise: the first step draws prompts of different token lengths into one batch.
    from dti_core.templates import resolve_templates
    (enabled,) = dti_pack.nodes.embedding_nodes.DTIEnableEmbeddings().enable(clip)["result"]
    texts = resolve_templates(settings["templates"], settings["custom_templates"])
    with torch.inference_mode():
        prompts = ct.text.tokenize_templates(enabled, [fam.LUMINA2_PREFIX + t for t in texts], 1)
    which = replay_draws(dti_pack.dti_core.training.step_generator, settings["seed"], 0, 4, 2, len(prompts),
                         [(8, 8)] * 2, (8, 8))["which"]
    assert len({len(prompts[int(i)].tokens["gemma2_2b"][0]) for i in which}) > 1

    with torch.inference_mode():
        m_star = token_norm_mean(ct.text.text_encoders(clip)["gemma2_2b"][2])
    out = run_train(dti_pack, (model, clip, vae), images(2), **settings)
    # ComfyUI's training flag (0.33), set for the run, is clear again for the samplers that follow
    assert getattr(comfy.model_management, "in_training", False) is False
    assert out["ui"]["text"][0].startswith(f"Saved embedding:{name}")
    emb = load_embedding(str(embeddings_dir / f"{name}.safetensors"))
    assert set(emb.vectors) == {"gemma2_2b"} and emb.metadata["dti.model_family"] == "Lumina 2"
    assert emb.metadata["dti.templates"] == "object" and emb.metadata["dti.steps"] == "2"
    v = emb.vectors["gemma2_2b"]
    assert v.shape[1] == 2304 and bool(torch.isfinite(v).all())
    # (m* from the lookup's fp16 rows, so to fp16's rounding averaged over the table; the vectors
    # sit at the file's m* to fp32's)
    assert emb.m_star("gemma2_2b") == pytest.approx(m_star, rel=1e-4)
    assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), emb.m_star("gemma2_2b")), rtol=0, atol=1e-5)
    assert out["result"][2]["loss"] and all(torch.isfinite(torch.tensor(out["result"][2]["loss"])))


def test_gemma_prompts_of_different_lengths_encode_as_one_encode_each(lumina, dti_pack):
    """A step's batch of unpadded Gemma prompts of several lengths: one pass per length, each row what
    an encode of that prompt alone gives, in the step's order."""
    ct, fam = dti_pack.comfy_host, dti_pack.comfy_host.families
    _, clip, _ = lumina.out
    (clip,) = dti_pack.nodes.embedding_nodes.DTIEnableEmbeddings().enable(clip)["result"]
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 1, "mean")
        prompts = ct.text.tokenize_templates(clip, [fam.LUMINA2_PREFIX + t for t in (
            "a photo of a {}", "a close-up photo of a {}", "a rendering of a {}", "a photo of the {}")], 1)
    vectors = {"gemma2_2b": m_star["gemma2_2b"] * init["gemma2_2b"]}
    lengths = [len(p.tokens["gemma2_2b"][0]) for p in prompts]
    assert len(set(lengths)) > 1 and len(set(lengths)) < len(lengths), lengths  # mixed, and some shared
    with torch.inference_mode(False), torch.no_grad():
        text = ct.text.TextPath(clip, prompts, vectors, False)
        dicts = [p.with_vectors(vectors) for p in prompts]
        conds, pooled = text(dicts)
        ref, _ = ct.text.encode_each(clip, dicts, False)
    assert text.batched and pooled is None
    assert [c.shape[1] for c in conds] == lengths
    for c, r in zip(conds, ref):
        tol = ct.text.BATCH_ULPS * torch.finfo(r.dtype).eps * float(r.abs().max())
        assert torch.allclose(c.float(), r.float(), rtol=0, atol=tol)


def test_gradient_checkpointing_recomputes_gemmas_layers_with_the_same_gradient(lumina, dti_pack):
    """Gemma-2 under checkpointing (0.33's block adds its residual with out=, 0.3.64's in place): the
    word's gradient is the same, and the encoder keeps fewer activations for backward."""
    from tests_host_helpers import assert_checkpointing_keeps_the_gradient
    ct = dti_pack.comfy_host
    model, clip, _ = lumina.out
    (clip,) = dti_pack.nodes.embedding_nodes.DTIEnableEmbeddings().enable(clip)["result"]
    enc = ct.text.text_encoders(clip)["gemma2_2b"][2]
    assert len(ct.autograd.encoder_checkpoint_units(enc)) == len(enc.transformer.model.layers)
    assert_checkpointing_keeps_the_gradient(ct, model, clip, "gemma2_2b", "Gemma-2 (thin)", 0.6)
