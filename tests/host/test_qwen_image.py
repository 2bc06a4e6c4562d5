"""Qwen-Image (``supported_models.QwenImage``, Qwen2.5-VL-7B's language model) is refused, and why: ComfyUI's
own Qwen-Image tokenizer fails on any ``embedding:NAME`` (``QwenImageTokenizer.tokenize_with_weights``
compares every token with the image-token id, ``r[i][0] == 151655``; a learned word's token is a
vector, and the comparison raises "Boolean value of Tensor with more than one value is ambiguous"),
on 0.3.64 and 0.33.0 alike. A trained word could not be used in a prompt, nor placed in training.

Thin random models that ComfyUI's own loaders detect: a one-block Qwen-Image DiT at the real width and
ComfyUI's Qwen2.5-VL-7B class at 2 of its 28 layers. When a ComfyUI reads embeddings there, the host
test below fails: that is the time to add the family.
"""

import pytest
import torch

from dti_core.embedding_file import dti_metadata, save_embedding
from dti_core.sphere import normalize


@pytest.fixture(scope="module")
def qwen_image(comfy, checkpoints, checkpoint_cache_dir, embeddings_dir):
    import comfy.supported_models as sm
    if not hasattr(sm, "QwenImage"):
        pytest.skip("HOST TESTS SKIPPED: this ComfyUI has no Qwen-Image (supported_models.QwenImage)")
    return checkpoints.load_qwen_image(checkpoint_cache_dir,
                                       embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"))


def test_qwen_image_is_refused_with_the_reason(qwen_image, checkpoints, dti_pack):
    model, clip = qwen_image.out
    assert checkpoints.load_problems(qwen_image.log) == []
    assert type(model.model).__name__ == "QwenImage" and type(clip.tokenizer).__name__ == "QwenImageTokenizer"
    with pytest.raises(ValueError, match=r"does not train Qwen-Image models yet .*QwenImage configuration; "
                                         r"ComfyUI's own Qwen-Image tokenizer fails on any embedding:NAME"):
        dti_pack.comfy_host.families.family_of(model, clip)


def test_comfyuis_qwen_image_tokenizer_fails_on_an_embedding(qwen_image, dti_pack, embeddings_dir, comfy_nodes):
    """The host fact behind the refusal (a plain word encodes; the same prompt with embedding:NAME,
    through DTI Enable Embeddings, raises inside ComfyUI's tokenizer)."""
    _, clip = qwen_image.out
    (on,) = dti_pack.nodes.embedding_nodes.DTIEnableEmbeddings().enable(clip)["result"]
    save_embedding(str(embeddings_dir), "qwen-image-word",
                   {"qwen25_7b": normalize(torch.randn(1, 3584, generator=torch.Generator().manual_seed(1)))},
                   dti_metadata(initializer="cat"))
    with torch.inference_mode():
        (plain,) = comfy_nodes.CLIPTextEncode().encode(on, "a photo of a cat")
        assert plain[0][0].shape[-1] == 3584
        with pytest.raises(RuntimeError, match="Boolean value of Tensor with more than one value is ambiguous"):
            # (not at the end: 0.3.64 would read the name glued to the template's "<|im_end|>")
            comfy_nodes.CLIPTextEncode().encode(on, "a photo of embedding:qwen-image-word on a beach")
