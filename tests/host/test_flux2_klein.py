"""DTI on FLUX.2 klein (0.33: ``supported_models.Flux2``, Qwen3-4B through ``klein_te``): a thin random
model that ComfyUI's own loaders detect.

klein's text encoder stacks Qwen3's hidden layers 9, 18 and 27 into one 3 x 2560 wide token; its
tokenizer reads the embeddings folder (the stock CLIPTextEncode takes ``embedding:NAME``), wraps every
prompt in Qwen's chat template and pads it to 512 tokens. The Qwen3-4B encoder is ComfyUI's own class
built in-process at 28 of its 36 layers (the deepest one klein reads is the 28th) and thin in width (2
query heads, 1 key/value head, FFN 256; see checkpoints.py): the full model does not train on this
24 GiB CPU machine. The DiT is the host's FLUX.2 transformer at width 256; the VAE is FLUX.2's layout
(128-channel latents at 1/16 of the image).
"""

import logging

import pytest
import torch

from dti_core.embedding_file import load_embedding
from tests_host_helpers import (assert_m_star_is_the_tables_mean_norm, assert_saved_word, run_train,
                                teacher_student_through_the_text_encoder)

KEY = "qwen3_4b"
WIDTH = 2560


@pytest.fixture(scope="module")
def klein(comfy, checkpoints, checkpoint_cache_dir, embeddings_dir):
    """``SimpleNamespace(out=(model, clip, vae), log, paths)``: UNETLoader + CLIPLoader (type flux2, the
    thin Qwen3's model_options) + VAELoader. One per module: each load holds the 151936 x 2560 token
    table; the tests leave the models as they found them."""
    import comfy.supported_models as sm
    if not hasattr(sm, "Flux2"):
        pytest.skip("HOST TESTS SKIPPED: this ComfyUI has no FLUX.2 (supported_models.Flux2 came after 0.3.64)")
    return checkpoints.load_flux2_klein(checkpoint_cache_dir,
                                        embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"))


def test_thin_flux2_klein_is_detected_by_comfyui_loaders(klein, checkpoints, dti_pack):
    import comfy.sd
    from safetensors import safe_open

    model, clip, vae = klein.out
    assert checkpoints.load_problems(klein.log) == []
    assert type(model.model).__name__ == "Flux2" and type(model.model.model_config).__name__ == "Flux2"
    assert model.model.diffusion_model.params.context_in_dim == 3 * WIDTH
    with safe_open(str(klein.paths["text_encoder"]), "pt") as f:
        sd = {k: f.get_slice(k) for k in f.keys() if "post_attention_layernorm" in k or "q_norm" in k}
        sd = {k: torch.empty(v.get_shape()) for k, v in sd.items()}
    assert comfy.sd.detect_te_model(sd) == comfy.sd.TEModel.QWEN3_4B
    assert type(clip.tokenizer).__name__ == "KleinTokenizer"
    ct = dti_pack.comfy_host
    assert list(ct.text.text_encoders(clip)) == [KEY] and ct.text.clip_widths(clip) == {KEY: WIDTH}
    assert clip.tokenizer.qwen3_4b.embedding_directory is not None  # the stock encode reads embedding:NAME
    assert len(clip.cond_stage_model.qwen3_4b.transformer.model.layers) == checkpoints.QWEN3_KLEIN_LAYERS
    assert vae.spacial_compression_encode() == 16 and vae.latent_channels == 128
    assert ct.families.family_of(model, clip).name == "FLUX.2 klein"


def test_m_star_is_qwen3s_mean_token_norm(klein, dti_pack):
    assert_m_star_is_the_tables_mean_norm(dti_pack.comfy_host, klein.out[1], KEY)


def test_training_prompt_is_what_clip_text_encode_gives(klein, dti_pack, embeddings_dir, comfy_nodes):
    """The step's text path (chat template, 512-token padding, three stacked Qwen3 layers, the word
    where the stock tokenizer puts ``embedding:NAME``) equals the stock CLIPTextEncode's output; two
    prompts encoded in one batched pass equal their one-by-one encodes."""
    from dti_core.embedding_file import dti_metadata, save_embedding
    from dti_core.sphere import normalize

    _, clip, _ = klein.out
    ct = dti_pack.comfy_host
    with torch.inference_mode():
        _, _, m_star = ct.text.initial_vectors(clip, "cat", 2, "mean")
    vectors = m_star[KEY] * normalize(torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(4)))
    save_embedding(str(embeddings_dir), "klein-end", {KEY: vectors}, dti_metadata(initializer="cat"))
    templates = ["a photo of a {}", "{}, on a beach"]
    with torch.inference_mode():
        prompts = ct.text.tokenize_templates(clip, templates, 2)
        filled = [p.with_vectors({KEY: vectors}) for p in prompts]
        each, _ = ct.text.encode_each(clip, filled, False)
        batched, _ = ct.text.encode_token_batch(clip, filled, False)
    for template, prompt, cond in zip(templates, prompts, each):
        with torch.inference_mode():
            (ref,) = comfy_nodes.CLIPTextEncode().encode(clip, template.replace("{}", "embedding:klein-end"))
        assert cond.shape == (1, 512, 3 * WIDTH)
        assert torch.equal(cond, ref[0][0]), template
        ids = [t for t, *_ in prompt.tokens[KEY][0]]
        start = ct.text.initializer_ids(clip.tokenizer.qwen3_4b, "<|im_start|>user\n")
        assert ids[:len(start)] == start and prompt.slots[KEY][0][1] >= len(start)
    assert batched.shape == (2, 512, 3 * WIDTH)
    assert torch.allclose(batched.float(), torch.cat(each).float(), rtol=0, atol=1e-3 * float(batched.abs().max()))


def test_flux2_klein_trains_through_the_node_and_the_stock_encode_reads_the_file(klein, dti_pack, embeddings_dir,
                                                                                comfy_nodes, caplog):
    """The node's run on 128-channel, 16x latents (the preview too), a file the stock encode reads."""
    model, clip, vae = klein.out
    ct = dti_pack.comfy_host
    out = run_train(dti_pack, klein.out, name="klein-dog", initializer="dog", steps=2, batch_size=2,
                    resolution=64, learning_rate=0.05, templates="custom",
                    custom_templates="a photo of a {}\n{} on a beach, a good photo",
                    preview_every=2, preview_steps=1)
    assert out["ui"]["text"][0].startswith("Saved embedding:klein-dog")
    v = assert_saved_word(ct, clip, KEY, load_embedding(str(embeddings_dir / "klein-dog.safetensors")),
                          "FLUX.2 klein")
    preview = out["result"][3]
    assert preview.shape[0] >= 1 and preview.shape[-1] == 3 and bool(torch.isfinite(preview).all())

    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        (with_word,) = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of embedding:klein-dog")
        (plain,) = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of dog")
        (prompt,) = ct.text.tokenize_templates(clip, ["a photo of {}"], v.shape[0])
        spliced = clip.encode_from_tokens_scheduled(prompt.with_vectors({KEY: v}))
    assert with_word[0][0].shape[-1] == 3 * WIDTH and not torch.equal(with_word[0][0], plain[0][0])
    assert torch.equal(with_word[0][0], spliced[0][0])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_teacher_student_recovers_a_word_through_kleins_text_encoder(klein, dti_pack):
    """Target: klein's conditioning (Qwen3's layers 9, 18 and 27 stacked, 512 tokens in the chat
    template) of "a photo of a {}" with Qwen3's "dog" row at m* in the word's place; the student word
    starts at "car". The learned direction must turn toward that row.

    The loss is on the conditioning, not on the DiT's prediction: the thin DiT is 256 wide and sees
    the 7680-wide tokens through a 256-row projection, so many directions of the word give one
    prediction (seen: the DiT loss fell 9x in 30 steps while cos(v, dog) rose only 0.05). The node
    test above trains through the DiT. Seen here: cos(v, dog) -0.024 -> 0.069 in 20 steps, the loss
    187 -> 42 (28 random layers stand between the word and the three taps, so the rise is slower
    than through Z-Image's 3-layer Qwen3)."""
    ct = dti_pack.comfy_host
    model, clip, _ = klein.out
    before, after, result = teacher_student_through_the_text_encoder(ct, dti_pack.dti_core.training, model, clip, KEY,
                                                                     steps=20, lr=0.1)
    print(f"\nFLUX.2 klein teacher-student through klein's Qwen3 encode: cos(v, dog) {before:.3f} -> {after:.3f} "
          f"in 20 steps; loss {result.history.loss[0]:.3g} -> {result.history.loss[-1]:.3g}")
    assert result.history.loss[-1] < 0.5 * result.history.loss[0], result.history.loss
    # a clear rise: more than four standard deviations of a random direction's cosine (1/sqrt(2560))
    assert after > before + 4 / WIDTH ** 0.5, (before, after, result.history.loss[::5])


def test_a_refused_text_encoder_is_named_with_the_memory_a_run_would_need(klein, dti_pack, monkeypatch):
    """FLUX.2 dev (Flux2 + Mistral-3 24B) is refused before anything runs, with the weights a run would
    hold. No thin Mistral-3 file is built here (its tokenizer is a tekken file): the refusal path is run
    on klein's real CLIP with its Qwen3 key standing in for mistral3_24b in the table of refused encoders."""
    fam = dti_pack.comfy_host.families
    model, clip, _ = klein.out
    assert "mistral3_24b" in fam.ENCODERS_NOT_YET
    monkeypatch.setattr(fam, "ENCODERS_NOT_YET", {KEY: "FLUX.2 dev (its Mistral-3 24B text encoder)"})
    te, dm = clip.patcher.model_size() / 2**30, model.model_size() / 2**30
    with pytest.raises(ValueError) as e:
        fam.family_of(model, clip)
    text = str(e.value)
    assert text.startswith("DTI Train does not train FLUX.2 dev (its Mistral-3 24B text encoder) yet (this MODEL is Flux2)")
    assert f"({te:.1f} GiB of weights as loaded)" in text and f"({dm:.1f} GiB)" in text
    assert f"more than {te + dm:.0f} GiB before activations" in text and "It supports SD1.x" in text
