"""DTI on Qwen-Image (``supported_models.QwenImage``, Qwen2.5-VL-7B's language model, the Wan 2.1 VAE's
3-D latents), on 0.3.64 and 0.33.0.

Two host facts shape it, both pinned below so that a ComfyUI which changes them fails here:
- ComfyUI builds Qwen-Image's tokenizer without an embeddings folder (as Gemma's and UMT5's);
- ``QwenImageTokenizer.tokenize_with_weights`` compares every token with the image-token id
  (``r[i][0] == 151655``); a learned word's token is a vector, and the comparison raises "Boolean value
  of Tensor with more than one value is ambiguous". DTI Enable Embeddings hands the learned rows through
  that code as stand-in ids on its copy of the tokenizer (``text.INT_TOKENS_ONLY``).

Thin random models that ComfyUI's own loaders detect: a one-block Qwen-Image DiT at the real width (the
loader reads only its depth from a file), ComfyUI's Qwen2.5-VL-7B class at 2 of its 28 layers with the
real 152064 x 3584 table, and the thin Wan 2.1 VAE.
"""

import copy
import logging

import pytest
import torch

from dti_core.embedding_file import dti_metadata, save_embedding
from dti_core.sphere import normalize
from tests_host_helpers import (assert_m_star_is_the_tables_mean_norm,
                                assert_node_trains_a_word_the_enabled_encode_reads,
                                one_frame_flow_loss_and_reference,
                                teacher_student_through_the_text_encoder)

KEY = "qwen25_7b"
WIDTH = 3584


@pytest.fixture(scope="module")
def qwen_image(comfy, checkpoints, checkpoint_cache_dir, embeddings_dir):
    import comfy.supported_models as sm
    if not hasattr(sm, "QwenImage"):
        pytest.skip("HOST TESTS SKIPPED: this ComfyUI has no Qwen-Image (supported_models.QwenImage)")
    return checkpoints.load_qwen_image(checkpoint_cache_dir,
                                       embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"))


def enabled(dti_pack, clip):
    (out,) = dti_pack.nodes.embedding_nodes.DTIEnableEmbeddings().enable(clip)["result"]
    return out


def word_file(embeddings_dir, name, n=2, seed=1, scale=1.0):
    vectors = scale * normalize(torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed)))
    save_embedding(str(embeddings_dir), name, {KEY: vectors}, dti_metadata(initializer="cat"))
    return vectors


def test_thin_qwen_image_is_detected_by_comfyui_loaders(qwen_image, checkpoints, dti_pack):
    model, clip, vae = qwen_image.out
    assert checkpoints.load_problems(qwen_image.log) == []
    assert type(model.model).__name__ == "QwenImage" and type(model.model.model_config).__name__ == "QwenImage"
    assert type(clip.tokenizer).__name__ == "QwenImageTokenizer"
    assert vae.latent_channels == 16 and vae.spacial_compression_encode() == 8
    ct = dti_pack.comfy_host
    assert ct.text.text_encoders(clip)[KEY][1].embedding_directory is None  # ComfyUI builds it without a folder
    assert ct.text.clip_widths(clip) == {KEY: WIDTH}
    fam = ct.families.family_of(model, clip)
    assert fam.name == "Qwen-Image" and fam.enable_embeddings and fam.resolution == 1328


def test_comfyuis_own_qwen_image_tokenizer_fails_on_a_tensor_token(qwen_image, comfy, embeddings_dir, comfy_nodes):
    """The host fact behind ``text.INT_TOKENS_ONLY``: with only an embeddings folder given to its
    tokenizer (what DTI Enable Embeddings does for UMT5 and Gemma), ComfyUI's Qwen-Image tokenizer
    raises on embedding:NAME. The day this fails, ComfyUI reads embeddings there and the stand-ins can go."""
    _, clip, _ = qwen_image.out
    word_file(embeddings_dir, "qwen-image-raw")
    plain = clip.clone()
    plain.tokenizer = copy.copy(clip.tokenizer)
    inner = copy.copy(plain.tokenizer.qwen25_7b)
    inner.embedding_directory = comfy.folder_paths.get_folder_paths("embeddings")
    plain.tokenizer.qwen25_7b = inner
    with torch.inference_mode():
        (cond,) = comfy_nodes.CLIPTextEncode().encode(plain, "a photo of a cat")
        assert cond[0][0].shape[-1] == WIDTH
        with pytest.raises(RuntimeError, match="Boolean value of Tensor with more than one value is ambiguous"):
            comfy_nodes.CLIPTextEncode().encode(plain, "a photo of embedding:qwen-image-raw on a beach")


def test_m_star_is_qwen25s_mean_token_norm(qwen_image, dti_pack):
    assert_m_star_is_the_tables_mean_norm(dti_pack.comfy_host, qwen_image.out[1], KEY)


def test_the_word_reaches_the_encoder_where_comfyui_puts_a_token(qwen_image, dti_pack, embeddings_dir, comfy_nodes,
                                                                  caplog):
    """Through DTI Enable Embeddings, embedding:NAME in the stock CLIPTextEncode equals the same prompt
    with the file's rows given as tokens by hand in the word's place (the rows, the positions, the
    template cut that Qwen-Image's encoder makes after the system prompt); a word at the very end of a
    prompt too (the template glues "<|im_end|>" to it), and one that opens it (0.3.64 would drop the
    newline before it); no warning."""
    _, clip, _ = qwen_image.out
    on = enabled(dti_pack, clip)
    rows = word_file(embeddings_dir, "qwen-image-word", scale=20.0)
    caplog.set_level(logging.WARNING)
    for prompt in ("a photo of embedding:qwen-image-word on a beach", "a photo of embedding:qwen-image-word",
                   "embedding:qwen-image-word on a beach"):
        with torch.inference_mode():
            (with_word,) = comfy_nodes.CLIPTextEncode().encode(on, prompt)
            tokens = on.tokenize(prompt)
            chunk = tokens[KEY][0]
            at = [j for j, e in enumerate(chunk) if torch.is_tensor(e[0])]
            assert len(at) == 2 and at[1] == at[0] + 1, prompt
            assert all(torch.equal(chunk[j][0].float(), rows[k]) for k, j in enumerate(at))
            assert all(isinstance(e[0], int) and e[0] >= 0 for e in chunk if not torch.is_tensor(e[0]))
            if prompt.startswith("embedding:"):  # "user", "\n", then the word: the newline kept on both hosts
                assert [chunk[at[0] - 2][0], chunk[at[0] - 1][0]] == [872, 198], prompt
            (without,) = comfy_nodes.CLIPTextEncode().encode(on, prompt.replace("embedding:qwen-image-word", "cat"))
        assert with_word[0][0].shape[-1] == WIDTH
        assert not torch.equal(with_word[0][0], without[0][0])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # the input CLIP and its tokenizer class are as ComfyUI made them
    assert dti_pack.comfy_host.text.text_encoders(clip)[KEY][1].embedding_directory is None
    assert "tokenize_with_weights" not in vars(clip.tokenizer)


def test_training_prompt_is_what_clip_text_encode_gives(qwen_image, dti_pack, embeddings_dir, comfy_nodes):
    """The step's text path (the word where the stock tokenizer puts ``embedding:NAME``, inside the
    template, on a CLIP through DTI Enable Embeddings) equals the stock CLIPTextEncode's output."""
    _, clip, _ = qwen_image.out
    clip = enabled(dti_pack, clip)
    ct = dti_pack.comfy_host
    with torch.inference_mode():
        _, _, m_star = ct.text.initial_vectors(clip, "cat", 2, "mean")
    vectors = m_star[KEY] * normalize(torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(4)))
    save_embedding(str(embeddings_dir), "qwen-image-end", {KEY: vectors}, dti_metadata(initializer="cat"))
    for template in ("a photo of a {}", "{}, on a beach"):
        with torch.inference_mode():
            (prompt,) = ct.text.tokenize_templates(clip, [template], 2)
            cond, _ = ct.text.encode_each(clip, [prompt.with_vectors({KEY: vectors})], False)
            (ref,) = comfy_nodes.CLIPTextEncode().encode(clip, template.replace("{}", "embedding:qwen-image-end"))
        assert torch.equal(cond[0], ref[0][0]), template


def test_qwen_image_trains_through_the_node_and_the_stock_encode_reads_the_file(qwen_image, dti_pack, embeddings_dir,
                                                                               comfy_nodes, caplog):
    """The node's run on one-frame 3-D latents (preview too), the input CLIP left as it was, a file that
    the stock encode reads through DTI Enable Embeddings as the training prompts placed it."""
    assert_node_trains_a_word_the_enabled_encode_reads(dti_pack, qwen_image.out, embeddings_dir, comfy_nodes, caplog, KEY,
                                                       "Qwen-Image", "qwen-image-dog")


def test_flow_loss_on_one_frame_latents_equals_an_independent_computation(qwen_image, dti_pack):
    """One step of the node's loss: x_t = (1 - s) x0 + s n at the model's own shifted sigma, target
    n - x0, the Qwen-Image DiT called directly with the Qwen2.5 conditioning, on 3-D latents."""
    model, clip, vae = qwen_image.out
    loss, ref = one_frame_flow_loss_and_reference(dti_pack.comfy_host, dti_pack.dti_core.training, model,
                                                  enabled(dti_pack, clip), vae, KEY)
    assert loss == pytest.approx(ref, rel=1e-4)


def test_teacher_student_recovers_a_word_through_qwen25(qwen_image, dti_pack):
    """Target: Qwen-Image's conditioning of "a photo of a {}" with Qwen2.5's "dog" row at m* in the
    word's place; the student starts at "car"; the loss on the conditioning (causal attention: the word's
    position and what follows see it). The learned direction must turn toward the dog row, by more than 3
    standard deviations of a random direction's cosine (1/sqrt(3584)).

    Slower than the other families: in the thin random encoder (weights N(0, 0.02), rows of norm 0.84)
    each layer adds ~100 times the word's own norm to the residual stream, so the word reaches the output
    only through the attention and MLP maps; the loss falls 3x long before the direction is found."""
    STEPS = 200
    ct = dti_pack.comfy_host
    model, clip, _ = qwen_image.out
    before, after, result = teacher_student_through_the_text_encoder(ct, dti_pack.dti_core.training, model,
                                                                     enabled(dti_pack, clip), KEY, steps=STEPS, lr=0.1)
    print(f"\nQwen-Image teacher-student through Qwen2.5: cos(v, dog) {before:.3f} -> {after:.3f} in {STEPS} steps; "
          f"loss {result.history.loss[0]:.3g} -> {result.history.loss[-1]:.3g}")
    assert result.history.loss[-1] < 0.5 * result.history.loss[0], result.history.loss
    assert after > before + 3 / WIDTH ** 0.5, (before, after, result.history.loss[::20])
