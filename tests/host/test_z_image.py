"""DTI on Z-Image (0.33: ``supported_models.ZImage(Lumina2)``, the NextDiT of Lumina 2 at width 3840,
with a Qwen3-4B text encoder): a thin random model that ComfyUI's own loaders detect.

Qwen3's ComfyUI tokenizer reads the embeddings folder (the stock CLIPTextEncode takes
``embedding:NAME``) and wraps every prompt in Qwen's chat template itself; the DiT reads the prompt
length from the encoder's attention mask, as for Lumina 2. The Qwen3-4B encoder is ComfyUI's own
class built at reduced depth in-process (3 of its 36 layers, see checkpoints.py): the full depth
does not train on this 24 GiB CPU machine.
"""

import logging

import pytest
import torch

from dti_core.embedding_file import load_embedding
from tests_host_helpers import (assert_checkpointing_keeps_the_gradient, dog_teacher, run_train,
                                teacher_student_through_the_text_encoder, text_encoders_in_fp32)

KEY = "qwen3_4b"


@pytest.fixture(scope="module")
def zimage_files(comfy, checkpoints, checkpoint_cache_dir):
    import comfy.supported_models as sm
    if not hasattr(sm, "ZImage"):
        pytest.skip("HOST TESTS SKIPPED: this ComfyUI has no Z-Image (supported_models.ZImage came after 0.3.64)")
    return checkpoints.ensure_zimage_files(checkpoint_cache_dir)


@pytest.fixture(scope="module")
def zimage(comfy, checkpoints, checkpoint_cache_dir, zimage_files, embeddings_dir):
    """``SimpleNamespace(out=(model, clip, vae), log, paths)``: UNETLoader + CLIPLoader (type lumina2, as
    ComfyUI's Z-Image template; the thin Qwen3's model_options) + VAELoader. One per module: each load
    holds the 151936 x 2560 token table; the tests leave the models as they found them. (After
    ``embeddings_dir``: the tokenizer takes ComfyUI's embeddings folders when it is built.)"""
    return checkpoints.load_zimage(checkpoint_cache_dir, embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"))


def table_norm_mean(encoder):
    emb = encoder.transformer.get_input_embeddings()
    with torch.no_grad():
        return float(emb.weight.float().norm(dim=-1).mean())


def test_thin_z_image_is_detected_by_comfyui_loaders(zimage, checkpoints, dti_pack):
    import comfy.sd
    from safetensors import safe_open

    model, clip, _ = zimage.out
    assert checkpoints.load_problems(zimage.log) == []
    assert type(model.model).__name__ == "Lumina2" and type(model.model.model_config).__name__ == "ZImage"
    assert float(model.get_model_object("model_sampling").shift) == 3.0
    with safe_open(str(zimage.paths["text_encoder"]), "pt") as f:
        sd = {k: f.get_slice(k) for k in f.keys() if "post_attention_layernorm" in k or "q_norm" in k}
        sd = {k: torch.empty(v.get_shape()) for k, v in sd.items()}
    assert comfy.sd.detect_te_model(sd) == comfy.sd.TEModel.QWEN3_4B
    ct = dti_pack.comfy_host
    assert list(ct.text.text_encoders(clip)) == [KEY] and ct.text.clip_widths(clip) == {KEY: 2560}
    assert clip.tokenizer.qwen3_4b.embedding_directory is not None  # the stock encode reads embedding:NAME
    assert len(clip.cond_stage_model.qwen3_4b.transformer.model.layers) == checkpoints.QWEN3_THIN_LAYERS
    assert ct.families.family_of(model, clip).name == "Z-Image"


def test_m_star_is_qwen3s_mean_token_norm(zimage, dti_pack):
    """Qwen3's lookup is a plain table (no scale, unlike 0.33's Gemma): m* is its rows' mean norm."""
    ct = dti_pack.comfy_host
    _, clip, _ = zimage.out
    enc = ct.text.text_encoders(clip)[KEY][2]
    assert ct.text.lookup_scale(enc) == 1.0
    with torch.inference_mode():
        _, _, m_star = ct.text.initial_vectors(clip, "cat", 1, "mean")
    assert m_star[KEY] == pytest.approx(table_norm_mean(enc), rel=1e-4)


def test_training_prompt_is_what_clip_text_encode_gives(zimage, dti_pack, embeddings_dir, comfy_nodes):
    """The step's text path (Qwen's chat template around the prompt, the word where the stock
    tokenizer puts ``embedding:NAME``) equals the stock CLIPTextEncode's output, attention mask too."""
    from dti_core.embedding_file import dti_metadata, save_embedding
    from dti_core.sphere import normalize

    _, clip, _ = zimage.out
    ct = dti_pack.comfy_host
    with torch.inference_mode():
        _, _, m_star = ct.text.initial_vectors(clip, "cat", 2, "mean")
    vectors = m_star[KEY] * normalize(torch.randn(2, 2560, generator=torch.Generator().manual_seed(4)))
    save_embedding(str(embeddings_dir), "zimg-end", {KEY: vectors}, dti_metadata(initializer="cat"))
    for template in ("a photo of a {}", "{}, on a beach"):
        with torch.inference_mode():
            (prompt,) = ct.text.tokenize_templates(clip, [template], 2)
            cond, _ = ct.text.encode_each(clip, [prompt.with_vectors({KEY: vectors})], False)
            (ref,) = comfy_nodes.CLIPTextEncode().encode(clip, template.replace("{}", "embedding:zimg-end"))
        assert torch.equal(cond[0], ref[0][0]), template
        mask = ref[0][1]["attention_mask"]
        assert mask.shape == (1, cond[0].shape[1]) and bool((mask == 1).all())
        # the chat template is around the prompt: "<|im_start|>user\n" first, the assistant turn last
        ids = [t for t, *_ in prompt.tokens[KEY][0]]
        start = ct.text.initializer_ids(clip.tokenizer.qwen3_4b, "<|im_start|>user\n")
        assert ids[:len(start)] == start
        assert prompt.slots[KEY][0][1] >= len(start)


def test_z_image_trains_through_the_node_and_the_stock_encode_reads_the_file(zimage, dti_pack, embeddings_dir,
                                                                             comfy_nodes, caplog):
    model, clip, vae = zimage.out
    ct = dti_pack.comfy_host
    enc = ct.text.text_encoders(clip)[KEY][2]
    with torch.inference_mode():
        vocab = ct.text.vocabulary(enc)
        dog = torch.nn.functional.normalize(
            vocab[ct.text.initializer_ids(clip.tokenizer.qwen3_4b, "dog")].detach().float().clone(), dim=-1)
    out = run_train(dti_pack, zimage.out, name="zimg-dog", initializer="dog", steps=2, batch_size=2,
                    resolution=64, learning_rate=0.05, templates="custom",
                    custom_templates="a photo of a {}\n{} on a beach, a good photo")
    assert out["ui"]["text"][0].startswith("Saved embedding:zimg-dog")
    emb = load_embedding(str(embeddings_dir / "zimg-dog.safetensors"))
    assert set(emb.vectors) == {KEY} and emb.metadata["dti.model_family"] == "Z-Image"
    v = emb.vectors[KEY]
    assert v.dtype == torch.float32 and v.shape == dog.shape and v.shape[1] == 2560
    assert emb.m_star(KEY) == pytest.approx(table_norm_mean(enc), rel=1e-4)
    assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), emb.m_star(KEY)), rtol=0, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(v, dog, dim=-1)
    assert bool((cos < 1 - 1e-4).all()), f"the vectors did not move from the initializer: {cos}"

    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        (with_word,) = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of embedding:zimg-dog")
        (plain,) = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of dog")
        (prompt,) = ct.text.tokenize_templates(clip, ["a photo of {}"], v.shape[0])
        spliced = clip.encode_from_tokens_scheduled(prompt.with_vectors({KEY: v}))
    assert with_word[0][0].shape[-1] == 2560 and not torch.equal(with_word[0][0], plain[0][0])
    assert torch.equal(with_word[0][0], spliced[0][0])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_teacher_student_recovers_a_word_through_qwen3(zimage, dti_pack):
    """Target: Qwen3's conditioning of "a photo of a {}" (in the chat template, as Z-Image reads it)
    with Qwen3's "dog" row, at m*, in the word's place; the student word starts at "car". The learned
    direction must turn toward that row. (Not the text "a photo of a dog": Qwen's BPE gives the word
    after a space as another token, " dog", whose row is another random one in a thin model.)

    The loss is on the text encoder's output, as in the Gemma (Lumina 2) test; the next test puts it on
    the DiT's prediction."""
    ct = dti_pack.comfy_host
    model, clip, _ = zimage.out
    with text_encoders_in_fp32(ct, clip):  # (the same numbers, without ComfyUI's per-call weight casts)
        before, after, result = teacher_student_through_the_text_encoder(ct, dti_pack.dti_core.training, model, clip,
                                                                         KEY, steps=60, lr=0.1)
    print(f"\nZ-Image teacher-student through Qwen3: cos(v, dog) {before:.3f} -> {after:.3f} in 60 steps")
    assert result.history.loss[-1] < 0.5 * result.history.loss[0], result.history.loss
    # a clear rise: more than eight standard deviations of a random direction's cosine (1/sqrt(2560))
    assert after > before + 8 / 2560 ** 0.5, (before, after, result.history.loss[::10])


def test_teacher_student_recovers_a_word_through_the_dit(zimage, dti_pack):
    """The same target word, with the loss on the NextDiT's prediction (as training sees it): the
    teacher is the DiT fed the conditioning with Qwen3's "dog" row at m* in the word's place, the
    student word starts at "car", fresh noisy latents and times at every step. Seen: cos(v, dog)
    -0.019 -> 0.131 in 10 steps at rate 0.15 (the bar is 0.079 above the start; 0.135 in 15 steps at 0.1,
    0.152 in 30 steps at 0.05: three times the time)."""
    ct = dti_pack.comfy_host
    core = dti_pack.dti_core.training
    model, clip, _ = zimage.out
    init, mu, m_star, prompt, target_cond, cos = dog_teacher(ct, clip, KEY)
    dit = model.model.diffusion_model

    def predict(x_t, sigma, cond):
        return dit(x_t, sigma, context=cond.float().expand(x_t.shape[0], -1, -1), num_tokens=cond.shape[1]).float()

    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        def loss_fn(embeds, step):
            g = core.step_generator(7, step)
            x_t, sigma = torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, generator=g)
            with torch.no_grad():
                target = predict(x_t, sigma, target_cond)
            cond, _ = ct.text.encode_tokens(clip, prompt.with_vectors({KEY: embeds[KEY]}))
            return ((predict(x_t, sigma, cond) - target) ** 2).mean() * 1e3

        before = cos(init)
        result = core.train(init, mu, m_star, loss_fn, core.TrainConfig(steps=10, lr=0.15, kappa=0.0))
    after = cos(result.vectors)
    print(f"\nZ-Image teacher-student through Qwen3 + NextDiT: cos(v, dog) {before:.3f} -> {after:.3f} in 10 steps; "
          f"loss {sum(result.history.loss[:5]) / 5:.3g} -> {sum(result.history.loss[-5:]) / 5:.3g} (5-step means)")
    assert sum(result.history.loss[-5:]) < sum(result.history.loss[:5]), result.history.loss
    # a clear rise: more than four standard deviations of a random direction's cosine (1/sqrt(2560))
    assert after > before + 4 / 2560 ** 0.5, (before, after, result.history.loss[::5])


def test_gradient_checkpointing_recomputes_qwen3s_layers_with_the_same_gradient(zimage, dti_pack):
    """Qwen3 (a Llama-style block whose residual add writes with out=) under checkpointing: the
    recomputation in the backward pass runs outside the encoder's forward, and still gives the word
    the same gradient; the encoder keeps fewer activations for backward."""
    ct = dti_pack.comfy_host
    model, clip, _ = zimage.out
    enc = ct.text.text_encoders(clip)[KEY][2]
    assert len(ct.autograd.encoder_checkpoint_units(enc)) == len(enc.transformer.model.layers)
    assert_checkpointing_keeps_the_gradient(ct, model, clip, KEY, "Qwen3 (3 layers)", 0.6)
