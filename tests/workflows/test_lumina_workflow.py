"""The Lumina 2 example workflow against the real server: every node and input valid, the learned
word reaching the stock CLIPTextEncode through DTI Enable Embeddings, the Gemma-2 recipe's settings.

Running it end to end needs a Gemma-2 file that the stock CLIPLoader builds (26 layers, 256k vocabulary:
5 GB of weights in memory on the CPU); the thin Gemma of tests/host trains through the node's run() in
tests/host/test_lumina.py instead.
"""

import dti_workflow_harness as h

NAME = "dti_train_lumina2.json"


def test_lumina2_workflow_is_valid_and_wired_through_enable_embeddings(object_info):
    prompt = h.ui_to_api(h.load_workflow(NAME), object_info)
    assert h.validate_prompt(prompt, object_info) == []
    by_type = {}
    for nid, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append((nid, node))
    (loader_id, loader), = by_type["CLIPLoader"]
    assert loader["inputs"]["type"] == "lumina2"
    (train_id, train), = by_type["DTITrain"]
    assert train["inputs"]["clip"] == [loader_id, 0]
    assert train["inputs"]["kappa"] == 5e-5 and train["inputs"]["steps"] == 500 and train["inputs"]["resolution"] == 0
    (enable_id, enable), = by_type["DTIEnableEmbeddings"]
    assert enable["inputs"]["clip"] == [loader_id, 0]
    encodes = by_type["CLIPTextEncode"]
    assert len(encodes) == 2 and all(n["inputs"]["clip"] == [enable_id, 0] for _, n in encodes)
    # CLIPTextEncodeLumina2's "superior" system prompt (comfy_extras/nodes_lumina2.py), then the separator
    system = ("You are an assistant designed to generate superior images with the superior degree of "
              "image-text alignment based on textual prompts or user prompts. <Prompt Start> ")
    (_, replace), = by_type["StringReplace"]
    assert replace["inputs"]["string"].startswith(system) and replace["inputs"]["replace"] == [train_id, 0]
