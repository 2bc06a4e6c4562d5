"""A file for another model family is refused with both families named, not only widths."""

import pytest
import torch

from dti_core.embedding_file import Embedding, EmbeddingFileError, check_fits, family_of_keys

WIDTH = {"clip_l": 768, "clip_g": 1280, "clip_h": 1024, "t5xxl": 4096}
CLIPS = {  # what comfy_host.text.clip_widths gives for each family's CLIP
    "SD1.x": {"clip_l": 768},
    "SD2.x": {"clip_h": 1024},
    "SDXL": {"clip_l": 768, "clip_g": 1280},
    "Flux-style": {"clip_l": 768, "t5xxl": 4096},
    "Chroma-style": {"t5xxl": 4096},
    "SD3-style": {"clip_l": 768, "clip_g": 1280, "t5xxl": 4096},
}


def emb(*keys, source=None, path="/e/thing.safetensors"):
    vectors = {k: torch.randn(2, WIDTH[k]) for k in keys}
    return Embedding(vectors=vectors, path=path, source_keys=source or {k: k for k in keys})


@pytest.mark.parametrize("family, keys", list(CLIPS.items()))
def test_family_of_keys_names_each_layout(family, keys):
    assert family_of_keys(keys) == family
    assert family_of_keys(list(keys)) == family


def test_family_of_other_layouts():
    assert family_of_keys({"clip_g", "t5xxl"}) == "Flux/SD3/Chroma-style"
    assert family_of_keys({"clip_g"}) == "clip_g"


def test_sd15_embedding_with_an_sdxl_clip_names_both_families():
    e = emb("clip_l", source={"clip_l": "emb_params"})
    with pytest.raises(EmbeddingFileError) as err:
        check_fits(e, CLIPS["SDXL"])
    msg = str(err.value)
    assert "this is an SD1.x embedding (key 'emb_params' is 768 wide)" in msg
    assert "the CLIP is SDXL (clip_l 768 + clip_g 1280)" in msg
    assert "no clip_g (1280-wide) vectors" in msg and "trained for SDXL" in msg
    assert msg.startswith("/e/thing.safetensors: ")


@pytest.mark.parametrize("file_keys, clip, ours, missing", [
    (("clip_h",), "SDXL", "an SD2.x embedding", "clip_l (768-wide), clip_g (1280-wide)"),
    (("clip_l", "clip_g"), "SD2.x", "an SDXL embedding", "clip_h (1024-wide)"),
    (("clip_l",), "Flux-style", "an SD1.x embedding", "t5xxl (4096-wide)"),
    (("clip_l", "t5xxl"), "SDXL", "a Flux-style embedding", "clip_g (1280-wide)"),
    (("t5xxl",), "SD1.x", "a Chroma-style embedding", "clip_l (768-wide)"),
])
def test_each_mismatch_names_file_family_clip_family_and_what_is_missing(file_keys, clip, ours, missing):
    with pytest.raises(EmbeddingFileError) as err:
        check_fits(emb(*file_keys), CLIPS[clip])
    msg = str(err.value)
    assert f"this is {ours} (" in msg and f"the CLIP is {clip} (" in msg and f"no {missing} vectors" in msg


@pytest.mark.parametrize("file_keys, clip", [(("clip_l", "clip_g"), "SD1.x"), (("clip_l", "clip_g"), "SDXL"),
                                             (("clip_l", "clip_g", "t5xxl"), "Flux-style")])
def test_a_file_covering_the_clip_fits(file_keys, clip):
    check_fits(emb(*file_keys), CLIPS[clip])
