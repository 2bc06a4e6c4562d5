"""The reliability checklist (../shared/docs/reliability-checklist.md), row by row, on the real host.

Rows covered elsewhere: pickle payloads (tests/core/test_names_and_files.py,
test_embedding_nodes.py), inference tensors, cancel, caching, overwrite and resume
(test_train.py), width mismatch (test_embedding_nodes.py).
"""

import os

import pytest
import torch

from tests_host_helpers import run_train

HOSTILE = ["../x", "a/../../x", "/abs", "C:\\x", "..\\..\\x", "con", "", "x" * 300, "a\x00b", "link/x"]


def all_files(folder):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)


@pytest.fixture
def outside(embeddings_dir, tmp_path):
    """A folder outside the embeddings folder, reachable through a symlinked subfolder."""
    out = tmp_path / "outside"
    out.mkdir()
    link = embeddings_dir / "link"
    if link.is_symlink():
        link.unlink()
    os.symlink(out, link)
    yield out
    link.unlink()


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_write_nothing_outside_through_every_writing_node(name, dti_pack, fresh_sd15, embeddings_dir, outside):
    root = embeddings_dir.parent
    before = all_files(root)
    with pytest.raises(ValueError, match="refused"):
        run_train(dti_pack, fresh_sd15, name=name, steps=1, batch_size=1)
    slerp = dti_pack.nodes.embedding_nodes.DTISlerpConcepts()
    emb = dti_pack.dti_core.embedding_file.Embedding(vectors={"clip_l": torch.ones(1, 768)})
    with pytest.raises(ValueError, match="refused"):
        slerp.slerp(emb, emb, 0.5, name, False)
    assert all_files(root) == before
    assert list(outside.iterdir()) == []
    # the node's front-door validation refuses the same names before anything is queued
    assert dti_pack.nodes.train_node.DTITrain.VALIDATE_INPUTS(name=name) is not True


def test_checkpoint_names_go_through_the_same_check(dti_pack, fresh_sd15, embeddings_dir):
    # NAME-stepK is built from an accepted NAME, so it stays inside the folder.
    run_train(dti_pack, fresh_sd15, name="sub/ck", steps=2, batch_size=1, save_every=1)
    assert (embeddings_dir / "sub" / "ck-step1.safetensors").exists()
    assert (embeddings_dir / "sub" / "ck.safetensors").exists()


def test_failed_final_write_keeps_the_old_file_and_leaves_no_temp(dti_pack, fresh_sd15, embeddings_dir, monkeypatch):
    run_train(dti_pack, fresh_sd15, name="torn", steps=1, batch_size=1)
    path = embeddings_dir / "torn.safetensors"
    before = path.read_bytes()
    ef = dti_pack.dti_core.embedding_file

    def half_then_fail(f, data):
        f.write(data[: len(data) // 2])
        raise OSError("simulated disk failure")

    monkeypatch.setattr(ef, "_write_all", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        run_train(dti_pack, fresh_sd15, name="torn", steps=2, batch_size=1, overwrite=True)
    assert path.read_bytes() == before
    ef.load_embedding(str(path))  # still loads
    assert not [f for f in all_files(embeddings_dir) if f.endswith(".tmp")]


def test_injected_oom_says_what_to_lower_writes_nothing_and_releases(dti_pack, fresh_sd15, embeddings_dir, monkeypatch, comfy):
    ct = dti_pack.comfy_host
    released = []

    def oom(self, embeds, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ct.step.DiffusionStep, "__call__", oom)
    real_empty = comfy.model_management.soft_empty_cache
    monkeypatch.setattr(comfy.model_management, "soft_empty_cache", lambda *a, **k: (released.append(1), real_empty(*a, **k)))
    before = all_files(embeddings_dir)
    with pytest.raises(Exception, match="batch_size or resolution.*gradient_checkpointing") as err:
        run_train(dti_pack, fresh_sd15, name="oom", steps=3)
    assert isinstance(err.value, comfy.model_management.OOM_EXCEPTION)
    assert all_files(embeddings_dir) == before
    assert released


def test_non_finite_loss_stops_the_run_and_is_never_saved(dti_pack, fresh_sd15, embeddings_dir, monkeypatch):
    model = fresh_sd15[0]
    calls = []
    real = model.model.apply_model

    def poisoned(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(model.model, "apply_model", poisoned)
    with pytest.raises(RuntimeError, match="non-finite|became nan|lower the learning rate|Lower the learning rate"):
        run_train(dti_pack, fresh_sd15, name="nan-run", steps=4, batch_size=1, save_every=1)
    assert not (embeddings_dir / "nan-run.safetensors").exists()
    assert (embeddings_dir / "nan-run-step1.safetensors").exists()  # the last good checkpoint
    assert not (embeddings_dir / "nan-run-step2.safetensors").exists()


def test_fp16_unet_run_stays_finite(dti_pack, comfy, embeddings_dir, sd15_checkpoint, checkpoints):
    with torch.inference_mode():
        out, _ = checkpoints.load_checkpoint(sd15_checkpoint, embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"),
                                             model_options={"dtype": torch.float16})
    model, clip, vae = out
    assert model.model.get_dtype() == torch.float16
    result = run_train(dti_pack, (model, clip, vae), name="fp16", steps=2, batch_size=1)
    history = result["result"][2]
    assert all(torch.isfinite(torch.tensor(history["loss"])))
    assert (embeddings_dir / "fp16.safetensors").exists()


@pytest.mark.parametrize("case", ["one", "tiny", "rgba", "gray", "out_of_range", "huge"])
def test_odd_images_train(case, dti_pack, fresh_sd15, embeddings_dir):
    imgs = {
        "one": torch.rand(1, 64, 64, 3),
        "tiny": torch.rand(2, 1, 1, 3),
        "rgba": torch.rand(2, 64, 48, 4),
        "gray": torch.rand(2, 40, 64, 1),
        "out_of_range": torch.rand(2, 64, 64, 3) * 4 - 2,
        "huge": torch.rand(1, 8192, 8192, 3),
    }[case]
    run_train(dti_pack, fresh_sd15, name=f"img-{case}", steps=1, batch_size=1, images=imgs)
    assert (embeddings_dir / f"img-{case}.safetensors").exists()


@pytest.mark.parametrize("case, match", [
    ("empty", "empty"), ("nan", "NaN"), ("channels", "channels"), ("rank", "IMAGE batch"),
])
def test_bad_images_are_refused_clearly(case, match, dti_pack, fresh_sd15, embeddings_dir):
    imgs = {
        "empty": torch.rand(0, 64, 64, 3),
        "nan": torch.full((1, 64, 64, 3), float("nan")),
        "channels": torch.rand(1, 64, 64, 2),
        "rank": torch.rand(64, 64, 3),
    }[case]
    with pytest.raises(ValueError, match=match):
        run_train(dti_pack, fresh_sd15, name=f"bad-{case}", images=imgs)
    assert not (embeddings_dir / f"bad-{case}.safetensors").exists()


@pytest.mark.parametrize("over, match", [
    (dict(steps=0), "steps"), (dict(learning_rate=0.0), "learning_rate"), (dict(learning_rate=50.0), "learning_rate"),
    (dict(kappa=-1e-4), "kappa"), (dict(batch_size=0), "batch_size"), (dict(magnitude="number", magnitude_value=-1.0), "magnitude_value"),
    (dict(save_every=-1), "save_every"), (dict(num_vectors=99), "num_vectors"), (dict(magnitude="median"), "magnitude"),
])
def test_bad_numbers_are_refused_with_the_accepted_range(over, match, dti_pack, fresh_sd15):
    with pytest.raises(ValueError, match=match) as err:
        run_train(dti_pack, fresh_sd15, **over)
    if "between" in str(err.value):
        assert "and" in str(err.value)


def test_corrupt_file_through_the_load_node_names_the_file(dti_pack, embeddings_dir):
    (embeddings_dir / "broken.safetensors").write_bytes(b"\xff" * 7)
    with pytest.raises(ValueError, match="broken.safetensors.*truncated"):
        with torch.inference_mode():
            dti_pack.nodes.embedding_nodes.DTILoadEmbedding().load("broken.safetensors")


def test_unsupported_models_are_refused_naming_what_is_supported(dti_pack, fresh_sd15):
    import types

    ct = dti_pack.comfy_host
    model, clip, vae = fresh_sd15
    flux_like = types.SimpleNamespace(model=types.SimpleNamespace(model_config=object()))
    with pytest.raises(ValueError, match=r"supports SD1.x, SD2.x, SDXL, Flux.1, Chroma, SD3 / SD3.5, Lumina 2, Z-Image, FLUX.2 klein, Wan 2.1 / 2.2, Qwen-Image; this MODEL is SimpleNamespace"):
        run_train(dti_pack, (flux_like, clip, vae))
    no_text = types.SimpleNamespace(tokenizer=types.SimpleNamespace(), cond_stage_model=types.SimpleNamespace())
    with pytest.raises(ValueError, match=r"supports SD1.x, SD2.x, SDXL, Flux.1, Chroma, SD3 / SD3.5, Lumina 2, Z-Image, FLUX.2 klein, Wan 2.1 / 2.2, Qwen-Image; this CLIP \(SimpleNamespace\) has no text encoder"):
        ct.families.family_of(model, no_text)


def test_mixed_sizes_batched_by_comfyui_image_batch_train(dti_pack, fresh_sd15, comfy_nodes, embeddings_dir):
    # An IMAGE batch has one size; images of different sizes reach the node through
    # ComfyUI's ImageBatch, which resizes the second to the first. DTI Train then
    # centre-crops and resizes the batch to the training resolution.
    with torch.inference_mode():
        (batch,) = comfy_nodes.ImageBatch().batch(torch.rand(1, 64, 96, 3), torch.rand(1, 120, 40, 3))
    assert batch.shape == (2, 64, 96, 3)
    run_train(dti_pack, fresh_sd15, name="mixed", steps=1, batch_size=2, images=batch)
    assert (embeddings_dir / "mixed.safetensors").exists()


def test_clip_without_embeddings_folder_is_refused_clearly(dti_pack, checkpoints, sd15_checkpoint, embeddings_dir):
    # ComfyUI's tokenizer ignores "embedding:" words when its CLIP was loaded without the folder.
    out, _ = checkpoints.load_checkpoint(sd15_checkpoint, embedding_directory=None)
    with pytest.raises(ValueError, match="no embeddings folder.*CheckpointLoaderSimple"):
        run_train(dti_pack, out, name="no-folder", steps=1, batch_size=1)
    assert not (embeddings_dir / "no-folder.safetensors").exists()
