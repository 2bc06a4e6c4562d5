"""DTI Load Embedding on the real ComfyUI: an SD1.5 file with an SDXL CLIP names both families."""

import pytest
import torch
from safetensors.torch import save_file


def test_sd15_embedding_with_sdxl_clip_says_sd1x_embedding_and_sdxl_clip(dti_pack, sdxl_loaded, embeddings_dir):
    _, clip, _ = sdxl_loaded
    save_file({"emb_params": torch.randn(2, 768)}, str(embeddings_dir / "family-sd15.safetensors"))
    with pytest.raises(ValueError) as err, torch.inference_mode():
        dti_pack.nodes.embedding_nodes.DTILoadEmbedding().load("family-sd15.safetensors", clip)
    msg = str(err.value)
    assert "family-sd15.safetensors: does not fit this CLIP: this is an SD1.x embedding (key 'emb_params' is 768 wide)" in msg
    assert "the CLIP is SDXL (clip_l 768 + clip_g 1280)" in msg, msg
    assert "clip_g encoder expects" not in msg
