"""DTI Enable Embeddings: a CLIP whose tokenizer ignores embedding:NAME gets a copy that reads the folder.

ComfyUI builds some tokenizers without an embeddings folder (Gemma-2 of Lumina 2, UMT5, Pile-T5 in
0.3.64; any CLIP loaded without one). Tested here on an SD1.5 CLIP loaded without the folder, which
is the same situation in the same tokenizer class.
"""

import torch

from dti_core.embedding_file import dti_metadata, save_embedding
from dti_core.sphere import normalize
from tests_host_helpers import run_train


def encode(comfy_nodes, clip, text):
    with torch.inference_mode():
        return comfy_nodes.CLIPTextEncode().encode(clip, text)[0][0][0]


def test_enable_embeddings_makes_the_stock_encode_read_the_word_and_leaves_the_input_alone(
        dti_pack, checkpoints, sd15_checkpoint, sd15_loaded, embeddings_dir, comfy_nodes, caplog):
    en = dti_pack.nodes.embedding_nodes
    g = torch.Generator().manual_seed(3)
    save_embedding(str(embeddings_dir), "enable-x", {"clip_l": 0.39 * normalize(torch.randn(2, 768, generator=g))},
                   dti_metadata(initializer="cat"))
    text = "a photo of embedding:enable-x on a beach"
    (model, bare, vae), _ = checkpoints.load_checkpoint(sd15_checkpoint, embedding_directory=None)
    ignored = encode(comfy_nodes, bare, text)
    reads = encode(comfy_nodes, sd15_loaded[1], text)  # same weights, loaded with the folder
    assert not torch.equal(ignored, reads)

    with torch.inference_mode():
        out = en.DTIEnableEmbeddings().enable(bare)
    (enabled,) = out["result"]
    assert out["ui"]["text"] == ["embedding:NAME enabled for clip_l (this CLIP's ComfyUI tokenizer ignored it)."]
    assert enabled is not bare and enabled.tokenizer is not bare.tokenizer
    assert torch.equal(encode(comfy_nodes, enabled, text), reads)
    # the input CLIP still ignores the word: nothing shared was changed
    assert bare.tokenizer.clip_l.embedding_directory is None
    assert torch.equal(encode(comfy_nodes, bare, text), ignored)

    # DTI Train, refused on the bare CLIP, trains through the enabled one
    run_train(dti_pack, (model, enabled, vae), name="enabled-train", steps=1, batch_size=1)
    assert (embeddings_dir / "enabled-train.safetensors").exists()


def test_enable_embeddings_is_a_no_op_for_clips_that_already_read_them(dti_pack, sd15_loaded):
    with torch.inference_mode():
        out = dti_pack.nodes.embedding_nodes.DTIEnableEmbeddings().enable(sd15_loaded[1])
    assert out["result"][0] is sd15_loaded[1]
    assert out["ui"]["text"] == ["Nothing to do: every text encoder of this CLIP already reads embedding:NAME."]
