"""Non-square, masked, captioned training on the real ComfyUI server: LoadImage of a cut-out PNG
(MASK = 1 - alpha) -> InvertMask -> DTI Train's mask, a folder of photos of other sizes, one caption per
image, SDXL (whose y carries each photo's size and crop)."""

import json

import torch
from PIL import Image, ImageDraw

import dti_workflow_harness as h
from dti_core.embedding_file import load_embedding

RUN_TIMEOUT = 480.0
FOLDER = "dti_datafeed"


def write_inputs(input_dir):
    """A wide cut-out (opaque disc on a transparent background) and a folder with a tall photo and a
    square cut-out: three sizes, three aspect ratios."""
    def disc(size, mode, bg):
        img = Image.new(mode, size, bg)
        w, hgt = size
        r = min(w, hgt) // 3
        ImageDraw.Draw(img).ellipse([w // 2 - r, hgt // 2 - r, w // 2 + r, hgt // 2 + r], fill=(240, 130, 30, 255)[:len(mode)])
        return img

    disc((128, 64), "RGBA", (0, 0, 0, 0)).save(input_dir / "dti_cutout_wide.png")
    disc((64, 96), "RGB", (60, 160, 70)).save(input_dir / "dti_photo_no_alpha.png")  # LoadImage lists top level only
    folder = input_dir / FOLDER
    folder.mkdir(exist_ok=True)
    disc((64, 112), "RGB", (40, 110, 200)).save(folder / "a_tall.png")
    disc((80, 80), "RGBA", (0, 0, 0, 0)).save(folder / "b_square.png")


def train_prompt(mask_from, name, captions):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": h.SDXL_CKPT}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "dti_cutout_wide.png"}},
        "3": {"class_type": "InvertMask", "inputs": {"mask": ["2", 1]}},
        "4": {"class_type": "DTITrain", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "name": name,
            "initializer": "dog", "steps": 2, "batch_size": 2, "learning_rate": 0.01, "kappa": 1e-4,
            "magnitude": "mean", "magnitude_value": 0.4, "templates": "object", "custom_templates": "",
            "resolution": 64, "horizontal_flip": False, "seed": 0, "save_every": 0, "resume_from": "(none)",
            "overwrite": False, "mask": mask_from, "image_folder": FOLDER, "captions": captions}},
    }
    return prompt


CAPTIONS = "a photo of {} on a white table\na photo of {} in the park\na close-up photo of {}"


def test_non_square_masked_captioned_training_runs_on_the_server(server, object_info):
    write_inputs(server.input)
    prompt = train_prompt(["3", 0], "datafeed-xl", CAPTIONS)
    # object_info read after the inputs were written: LoadImage's list must hold them
    assert h.validate_prompt(prompt, server.object_info()) == []
    entry = server.run(prompt, timeout=RUN_TIMEOUT)
    path = server.embeddings / "datafeed-xl.safetensors"
    assert path.is_file(), entry["outputs"]
    emb = load_embedding(str(path))
    assert emb.is_dti and emb.metadata["dti.steps"] == "2" and set(emb.vectors) == {"clip_l", "clip_g"}
    for key, v in emb.vectors.items():
        assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), emb.m_star(key)), atol=1e-4)
    text = entry["outputs"]["4"]["text"][0]
    assert text.startswith("Saved embedding:datafeed-xl"), text


def test_loadimage_mask_without_invert_is_refused_with_the_convention(server, object_info):
    """LoadImage's MASK is 1 where the PNG is transparent: wired straight in, the cut-out's subject
    would be ignored. On a photo without alpha it is all 0, and the node says what to do."""
    write_inputs(server.input)
    prompt = train_prompt(["2", 1], "datafeed-bad", "")
    prompt["2"]["inputs"]["image"] = "dti_photo_no_alpha.png"  # no alpha: LoadImage's MASK is all 0
    prompt["4"]["inputs"]["image_folder"] = ""
    # object_info read after the inputs were written: LoadImage's list must hold them
    assert h.validate_prompt(prompt, server.object_info()) == []
    status = server.wait(server.queue(prompt), timeout=RUN_TIMEOUT)["status"]
    assert status["status_str"] == "error"
    message = json.dumps(status["messages"])
    assert "InvertMask" in message and "empty" in message, message[:2000]
    assert not (server.embeddings / "datafeed-bad.safetensors").exists()
