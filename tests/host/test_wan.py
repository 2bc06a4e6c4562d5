"""DTI on Wan 2.1 / 2.2 text-to-video (0.33: ``supported_models.WAN21_T2V`` on ``model_base.WAN21``, a
UMT5-XXL text encoder), trained on still images as one-frame videos, as the authors' Wan launcher does.

Thin random models that ComfyUI's own loaders detect: the Wan DiT at width 256 (one block), the Wan 2.1
VAE at its real width (96; its 3-D latents: 16 channels, one frame per image, 1/8 of the image), and
ComfyUI's own UMT5-XXL class at 2 of its 24 layers with a small SentencePiece vocabulary (its
tokenizer reads the SentencePiece model from the file; the width is the real 4096). ComfyUI's loader
recognises a UMT5-XXL file only by its 24th block, so the CLIP is built as CLIPLoader(type wan) builds
it for a full file (checkpoints.load_wan). ComfyUI builds Wan's UMT5 tokenizer without an embeddings
folder (as Gemma's): prompts read the word through DTI Enable Embeddings.
"""

import pytest
import torch

from tests_host_helpers import (assert_m_star_is_the_tables_mean_norm,
                                assert_node_trains_a_word_the_enabled_encode_reads,
                                dog_teacher,
                                one_frame_flow_loss_and_reference,
                                padded_to,
                                teacher_student_through_the_text_encoder,
                                text_encoders_in_fp32)

KEY = "umt5xxl"
WIDTH = 4096
PAD_TO = 16  # the teacher-student prompt's padded length (its real tokens: 7)


@pytest.fixture(scope="module")
def wan(comfy, checkpoints, checkpoint_cache_dir, embeddings_dir):
    import comfy.supported_models as sm
    if not hasattr(sm, "WAN21_T2V"):
        pytest.skip("HOST TESTS SKIPPED: this ComfyUI has no Wan 2.1 (supported_models.WAN21_T2V)")
    return checkpoints.load_wan(checkpoint_cache_dir, embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"))


def enabled(dti_pack, clip):
    (out,) = dti_pack.nodes.embedding_nodes.DTIEnableEmbeddings().enable(clip)["result"]
    return out


def test_thin_wan_is_detected_by_comfyui_loaders(wan, checkpoints, dti_pack):
    model, clip, vae = wan.out
    assert checkpoints.load_problems(wan.log) == []
    assert type(model.model).__name__ == "WAN21" and type(model.model.model_config).__name__ == "WAN21_T2V"
    assert model.get_model_object("latent_format").latent_dimensions == 3
    assert vae.latent_channels == 16 and vae.spacial_compression_encode() == 8
    assert type(clip.tokenizer).__name__ == "WanT5Tokenizer"
    ct = dti_pack.comfy_host
    assert ct.text.text_encoders(clip)[KEY][1].embedding_directory is None  # ComfyUI builds it without a folder
    assert list(ct.text.text_encoders(clip)) == [KEY] and ct.text.clip_widths(clip) == {KEY: WIDTH}
    fam = ct.families.family_of(model, clip)
    assert fam.name == "Wan 2.1 / 2.2" and fam.enable_embeddings and fam.resolution == 512


def test_m_star_is_umt5s_mean_token_norm(wan, dti_pack):
    assert_m_star_is_the_tables_mean_norm(dti_pack.comfy_host, wan.out[1], KEY)


def test_training_prompt_is_what_clip_text_encode_gives(wan, dti_pack, embeddings_dir, comfy_nodes):
    """The step's text path (512 tokens, the padding zeroed as Wan's encoder does, the word where the
    stock tokenizer puts ``embedding:NAME`` once the CLIP went through DTI Enable Embeddings) equals
    the stock CLIPTextEncode's output."""
    from dti_core.embedding_file import dti_metadata, save_embedding
    from dti_core.sphere import normalize

    _, clip, _ = wan.out
    clip = enabled(dti_pack, clip)
    ct = dti_pack.comfy_host
    with torch.inference_mode():
        _, _, m_star = ct.text.initial_vectors(clip, "cat", 2, "mean")
    vectors = m_star[KEY] * normalize(torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(4)))
    save_embedding(str(embeddings_dir), "wan-end", {KEY: vectors}, dti_metadata(initializer="cat"))
    for template in ("a photo of a {}", "{}, on a beach"):
        with torch.inference_mode():
            (prompt,) = ct.text.tokenize_templates(clip, [template], 2)
            cond, _ = ct.text.encode_each(clip, [prompt.with_vectors({KEY: vectors})], False)
            (ref,) = comfy_nodes.CLIPTextEncode().encode(clip, template.replace("{}", "embedding:wan-end"))
        assert cond[0].shape == (1, 512, WIDTH)
        assert torch.equal(cond[0], ref[0][0]), template
        assert float(cond[0][0, -1].abs().max()) == 0.0  # the padding, zeroed


def test_wan_trains_on_still_images_through_the_node_and_the_stock_encode_reads_the_file(wan, dti_pack, embeddings_dir,
                                                                                        comfy_nodes, caplog):
    """The node's run on one-frame 3-D latents (preview too, decoded by the video VAE), the input CLIP
    left as it was, a file that the stock encode reads through DTI Enable Embeddings."""
    assert_node_trains_a_word_the_enabled_encode_reads(dti_pack, wan.out, embeddings_dir, comfy_nodes, caplog, KEY,
                                                       "Wan 2.1 / 2.2", "wan-dog")


def test_flow_loss_on_one_frame_latents_equals_an_independent_computation(wan, dti_pack):
    """One step of the node's loss on a 3-D latent: x_t = (1 - s) x0 + s n at the model's own shifted
    sigma, target n - x0, the Wan DiT called directly with the UMT5 conditioning."""
    model, clip, vae = wan.out
    loss, ref = one_frame_flow_loss_and_reference(dti_pack.comfy_host, dti_pack.dti_core.training, model,
                                                  enabled(dti_pack, clip), vae, KEY)
    assert loss == pytest.approx(ref, rel=1e-4)


def test_teacher_student_recovers_a_word_through_umt5(wan, dti_pack):
    """Target: Wan's conditioning of "a photo of a {}" with UMT5's "dog" row at m* in the word's place;
    the student starts at "car"; the loss on the conditioning (bidirectional attention: every position
    sees the word). The learned direction must turn toward the dog row.

    UMT5 as Wan builds it masks its padding and zeroes its output there, so the run pads the prompt to
    PAD_TO tokens instead of 512: the same loss at a 32nd of the encoder's cost; with the encoder stored
    in fp32 for the run (text_encoders_in_fp32: the same numbers) it took 12 s here, 88-119 s before.
    Asserted first: the short encode equals the 512-token one at the real positions, and both are zero
    after them."""
    ct = dti_pack.comfy_host
    model, clip, _ = wan.out
    clip = enabled(dti_pack, clip)
    tok, enc = ct.text.text_encoders(clip)[KEY][1:]
    stored = {n: p.dtype for n, p in enc.named_parameters()}
    with text_encoders_in_fp32(ct, clip):  # (the same numbers, without ComfyUI's per-call weight casts)
        *_, target, _ = dog_teacher(ct, clip, KEY)
        with padded_to(tok, PAD_TO):
            *_, short, _ = dog_teacher(ct, clip, KEY)
        assert target.shape[1] == 512 and short.shape[1] == PAD_TO, (target.shape, short.shape)
        real = int((target.abs().amax(-1) > 0).sum())
        assert 0 < real < PAD_TO and (short[:, real:] == 0).all() and (target[:, real:] == 0).all(), real
        torch.testing.assert_close(short, target[:, :PAD_TO], rtol=1e-4, atol=1e-5 * float(target.abs().max()))

        before, after, result = teacher_student_through_the_text_encoder(ct, dti_pack.dti_core.training, model, clip,
                                                                         KEY, steps=30, lr=0.1, pad_to=PAD_TO)
    assert {n: p.dtype for n, p in enc.named_parameters()} == stored  # the module's CLIP as it was
    # seen here: -0.005 -> 0.137 in 30 steps, the loss 7.82 -> 3.77
    print(f"\nWan teacher-student through UMT5: cos(v, dog) {before:.3f} -> {after:.3f} in 30 steps; "
          f"loss {result.history.loss[0]:.3g} -> {result.history.loss[-1]:.3g}")
    assert result.history.loss[-1] < 0.5 * result.history.loss[0], result.history.loss
    assert after > before + 8 / WIDTH ** 0.5, (before, after, result.history.loss[::5])
