"""The command line (``python -m dti_cli``) on the thin SD1.5 checkpoint, and previews while training."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dti_core.embedding_file import load_embedding
from tests_host_helpers import REPO, cli, jobs_file as _jobs_file, run_train, summary_records as _summary, write_images

TRAIN = dict(initializer="cat", steps=2, batch_size=2, resolution=64, seed=1, horizontal_flip=True)


def flags(**values):
    out = []
    for k, v in values.items():
        out += ["--" + k.replace("_", "-"), str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def test_cli_trains_from_a_folder_as_the_node_does(comfy, dti_pack, fresh_sd15, sd15_checkpoint, embeddings_dir, tmp_path):
    batch = write_images(tmp_path / "imgs")
    out_dir = tmp_path / "out"
    r = cli(comfy, "--checkpoint", sd15_checkpoint, "--images", tmp_path / "imgs", "--name", "cli-cat",
            "--output", out_dir, *flags(**TRAIN))
    assert r.returncode == 0, r.stderr
    assert "step 2/2 loss " in r.stderr and "ETA" in r.stderr
    assert "Saved embedding:cli-cat" in r.stdout
    got = load_embedding(str(out_dir / "cli-cat.safetensors"))
    m_star = got.m_star("clip_l")
    assert torch.allclose(got.vectors["clip_l"].norm(dim=-1), torch.tensor(m_star), atol=1e-5)
    # written readable by others, as the node writes
    assert (out_dir / "cli-cat.safetensors").stat().st_mode & 0o044 == 0o044

    # The node, in this process, on the same pixels and settings: the same file.
    run_train(dti_pack, fresh_sd15, images=batch, name="cli-cat-node", **TRAIN)
    node = load_embedding(str(embeddings_dir / "cli-cat-node.safetensors"))
    assert torch.allclose(got.vectors["clip_l"], node.vectors["clip_l"], atol=1e-6, rtol=0)
    strip = lambda meta: {k: v for k, v in meta.items() if k != "dti.name"}
    assert strip(got.metadata) == strip(node.metadata)  # the fingerprint covers pixels, model, settings
    assert got.metadata["dti.name"] == "cli-cat"


def test_jobs_file_trains_two_concepts_with_one_model_load(comfy, sd15_checkpoint, tmp_path):
    write_images(tmp_path / "a", n=2, seed=1)
    write_images(tmp_path / "b", n=2, seed=2)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f'checkpoint = "{sd15_checkpoint}"\n'
                    "[defaults]\nsteps = 1\nbatch_size = 1\nresolution = 64\n"
                    '[[job]]\nname = "job-a"\nimages = "a"\ninitializer = "dog"\n'
                    '[[job]]\nname = "sub/job-b"\nimages = "b"\ninitializer = "teddy bear"\nkappa = 0.0\n'
                    "preview_every = 1\n")
    r = cli(comfy, "--jobs", jobs, "--output", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("loading model") == 1 and "2 job(s)" in r.stderr
    a = load_embedding(str(tmp_path / "out" / "job-a.safetensors"))
    b = load_embedding(str(tmp_path / "out" / "sub" / "job-b.safetensors"))
    assert a.metadata["dti.initializer"] == "dog" and b.metadata["dti.initializer"] == "teddy bear"
    assert a.metadata["dti.steps"] == "1" and a.metadata["dti.kappa"] != b.metadata["dti.kappa"]
    assert b.vectors["clip_l"].shape[0] == 2  # 'teddy bear' is two tokens
    # job b's last preview beside its file (job a asked for none)
    preview = tmp_path / "out" / "sub" / "job-b.preview.png"
    assert f"-> {preview}" in r.stdout and Image.open(preview).format == "PNG"
    assert not (tmp_path / "out" / "job-a.preview.png").exists()


def test_bad_inputs_are_refused_before_the_model_loads(comfy, tmp_path):
    write_images(tmp_path / "good", n=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png at all")
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"checkpoint": "nowhere.safetensors", "job": [
        {"name": "ok", "images": "missing"},
        {"name": "ok2", "images": "empty"},
        {"name": "../escape", "images": "good"},
        {"name": "ok3", "images": "broken"},
    ]}))
    r = cli(comfy, "--jobs", jobs, "--output", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    err = r.stderr
    assert "job 1: image folder" in err and "does not exist" in err
    assert "job 2: no images in" in err
    assert "job 3:" in err and "escape" in err
    assert "job 4: cannot read image" in err and "x.png" in err
    assert "checkpoint" in err and "nowhere.safetensors does not exist" in err
    assert "loading model" not in err and "Traceback" not in err
    assert not (tmp_path / "out" / "ok.safetensors").exists()

    jobs.write_text(json.dumps({"job": [{"name": "x", "images": "good", "stepz": 3}]}))
    r = cli(comfy, "--jobs", jobs)
    assert r.returncode == 2 and "unknown key(s) stepz" in r.stderr


def test_cli_finds_the_comfyui_it_sits_in(tmp_path):
    # ComfyUI/custom_nodes/ComfyUI-DTI (a symlink here), no COMFYUI_PATH: ../.. is used.
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "comfy" / "sd.py").write_text("")
    (root / "folder_paths.py").write_text("")
    (root / "custom_nodes").mkdir()
    link = root / "custom_nodes" / "ComfyUI-DTI"
    link.symlink_to(REPO)
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    code = "import os, dti_cli.main as m; print(m.find_comfyui(None))"
    r = subprocess.run([sys.executable, "-c", code], cwd=link, env=dict(env, PWD=str(link)), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(root.resolve())


# ---------------------------------------------------------------------------------------------
# previews
# ---------------------------------------------------------------------------------------------

def test_previews_do_not_change_the_result(dti_pack, fresh_sd15, embeddings_dir, comfy):
    seen = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, preview)))
    try:
        plain = run_train(dti_pack, fresh_sd15, name="pv-off", steps=3, batch_size=1)
        shown = run_train(dti_pack, fresh_sd15, name="pv-on", steps=3, batch_size=1, preview_every=2,
                          preview_steps=1, preview_prompt="a {} on a table", preview_seed=5)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    a = load_embedding(str(embeddings_dir / "pv-off.safetensors"))
    b = load_embedding(str(embeddings_dir / "pv-on.safetensors"))
    assert torch.equal(a.vectors["clip_l"], b.vectors["clip_l"])
    assert plain["result"][2]["loss"] == shown["result"][2]["loss"]
    # off: a black placeholder; on: a real image of the preview size
    assert plain["result"][3].shape == (1, 64, 64, 3) and float(plain["result"][3].abs().sum()) == 0
    image = shown["result"][3]
    assert image.shape == (1, 64, 64, 3) and image.dtype == torch.float32 and float(image.std()) > 0
    # shown on the node at step 2 and at the end (step 3), in ComfyUI's preview format
    previews = [(v, p) for v, p in seen if p is not None]
    assert [v for v, _ in previews] == [2, 3]
    assert all(p[0] == "JPEG" and p[1].size == (64, 64) for _, p in previews)


def test_preview_follows_the_vectors(dti_pack, fresh_sd15):
    model, clip, vae = fresh_sd15
    pv = dti_pack.nodes.previews
    with torch.inference_mode():
        init, _, m_star = dti_pack.comfy_host.text.initial_vectors(clip, "cat", 0, "mean")
        v = {"clip_l": m_star["clip_l"] * init["clip_l"]}
        w = {"clip_l": m_star["clip_l"] * dti_pack.comfy_host.text.initial_vectors(clip, "car", 0, "mean")[0]["clip_l"]}
        one = pv.render(model, clip, vae, v, "a photo of {}", 3, 64, 1)
        again = pv.render(model, clip, vae, v, "a photo of {}", 3, 64, 1)
        other = pv.render(model, clip, vae, w, "a photo of {}", 3, 64, 1)
    assert torch.equal(one, again)  # fixed seed
    assert not torch.allclose(one, other, atol=1e-4)  # the vectors reach the image
    with pytest.raises(ValueError, match=r"must contain \{\}"):
        pv.check_prompt("a photo of a cat")


def test_evaluate_writes_the_nodes_numbers(comfy, dti_pack, checkpoints, checkpoint_cache_dir, tmp_path):
    """``python -m dti_cli evaluate``: the CSV holds DTI Evaluate's own numbers for the same images,
    reference photos and models (loaded here with ComfyUI's loaders), and a chart PNG is written."""
    import csv
    gen = write_images(tmp_path / "generated", n=2, seed=3)
    refs = write_images(tmp_path / "photos", n=2, seed=4)
    vitl = checkpoints.ensure_clip_vision(checkpoint_cache_dir, "clip-vision-vitl")
    clip_l = checkpoints.ensure_component("clip-l", checkpoint_cache_dir)
    prompts = "a photo of embedding:my-dog\nembedding:my-dog on a beach"
    r = cli(comfy, "evaluate", "--generated", tmp_path / "generated", "--references", tmp_path / "photos",
            "--image-model", vitl, "--text-encoder", clip_l, "--text-vision", vitl, "--prompts", prompts,
            "--out", tmp_path / "scores")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.reader(open(tmp_path / "scores" / "scores.csv")))
    assert rows[0] == ["image", "prompt", "image_score", "text_score"] and [x[0] for x in rows[1:]] == ["00.png", "01.png", "mean"]
    cv, _ = checkpoints.load_clip_vision(vitl)
    clip, _ = checkpoints.load_text_encoders([clip_l], "STABLE_DIFFUSION")
    with torch.inference_mode():
        out = dti_pack.nodes.evaluate_node.DTIEvaluate().evaluate(gen, cv, references=refs, clip=clip, text_vision=cv,
                                                                  prompts=prompts)["result"]
    assert [float(x[2]) for x in rows[1:3]] == pytest.approx(out[2], abs=1e-5)
    assert [float(x[3]) for x in rows[1:3]] == pytest.approx(out[3], abs=1e-5)
    assert float(rows[3][2]) == pytest.approx(out[0], abs=1e-5) and float(rows[3][3]) == pytest.approx(out[1], abs=1e-5)
    assert (tmp_path / "scores" / "scores.png").stat().st_size > 0


def test_evaluate_refuses_bad_inputs_with_status_2(comfy, checkpoints, checkpoint_cache_dir, tmp_path):
    write_images(tmp_path / "generated", n=1)
    vitl = checkpoints.ensure_clip_vision(checkpoint_cache_dir, "clip-vision-vitl")
    base = ["evaluate", "--generated", tmp_path / "generated", "--references", tmp_path / "generated",
            "--out", tmp_path / "o"]
    for extra, message in ((["--image-model", tmp_path / "nope.safetensors"], "does not exist"),
                           (["--image-model", vitl, "--text-encoder", vitl], "needs --text-encoder, --text-vision"),
                           (["--image-model", vitl, "--references", tmp_path / "missing"], "no such folder")):
        r = cli(comfy, *base, *extra)
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr[-2000:])


def test_evaluate_renders_a_prompt_set_at_seeds_then_scores(comfy, dti_pack, checkpoints, checkpoint_cache_dir,
                                                            sd15_checkpoint, fresh_sd15, tmp_path):
    """``--checkpoint --embedding --prompt-set FILE --seeds``: every prompt at every seed is rendered (the
    word's rows where {} is, as embedding:NAME gives them) into --generated, then scored with the word taken
    out of each prompt; the images are what the pack's own renderer gives for that prompt and seed."""
    import csv
    from dti_core.embedding_file import dti_metadata, save_embedding
    from dti_core.sphere import normalize
    refs = write_images(tmp_path / "photos", n=2, seed=5)
    vitl = checkpoints.ensure_clip_vision(checkpoint_cache_dir, "clip-vision-vitl")
    g = torch.Generator().manual_seed(0)
    save_embedding(str(tmp_path), "word", {"clip_l": 0.39 * normalize(torch.randn(1, 768, generator=g))},
                   dti_metadata(initializer="dog"))
    (tmp_path / "prompts.txt").write_text("a photo of {}\na {} on the beach\n")
    r = cli(comfy, "evaluate", "--checkpoint", sd15_checkpoint, "--embedding", tmp_path / "word.safetensors",
            "--prompt-set", tmp_path / "prompts.txt", "--seeds", "0-1", "--size", 64, "--steps", 1,
            "--generated", tmp_path / "gen", "--references", tmp_path / "photos", "--image-model", vitl,
            "--out", tmp_path / "scores")
    assert r.returncode == 0, r.stderr[-3000:]
    made = sorted(p.name for p in (tmp_path / "gen").iterdir())
    assert made == ["000.png", "001.png", "002.png", "003.png"]
    rows = list(csv.reader(open(tmp_path / "scores" / "scores.csv")))
    assert [x[1] for x in rows[1:5]] == ["a photo of {}", "a photo of {}", "a {} on the beach", "a {} on the beach"]
    # image 3 is the second prompt at seed 0, as the pack's renderer makes it
    from dti_core.embedding_file import load_embedding
    emb = load_embedding(str(tmp_path / "word.safetensors"))
    model, clip, vae = fresh_sd15
    with torch.inference_mode():
        want = dti_pack.comfy_host.sampling.render(model, clip, vae, emb.vectors, "a {} on the beach", 0, 64, 1, cfg=7.0)
    got = torch.from_numpy(np.asarray(Image.open(tmp_path / "gen" / "002.png"), np.float32) / 255.0)
    assert (got - want[0]).abs().max() <= 1 / 255 + 1e-6
    # bad render inputs: a folder that already holds images, a prompt file line without {}
    (tmp_path / "bad.txt").write_text("a photo of a dog\n")
    for extra, message in ((["--prompt-set", tmp_path / "prompts.txt", "--generated", tmp_path / "gen"], "must be a new or empty folder"),
                           (["--prompt-set", tmp_path / "bad.txt", "--generated", tmp_path / "gen2"], "every line needs {}"),
                           (["--prompt-set", "simple", "--seeds", "3-1", "--generated", tmp_path / "gen3"], "seeds '3-1'")):
        r = cli(comfy, "evaluate", "--checkpoint", sd15_checkpoint, "--embedding", tmp_path / "word.safetensors",
                "--references", tmp_path / "photos", "--image-model", vitl, "--out", tmp_path / "o", *extra)
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr[-2000:])


SHARD_NAMES = ["cat-a", "cat-b", "cat-c", "cat-d"]


def test_shards_together_train_what_one_run_trains(comfy, sd15_checkpoint, tmp_path):
    """--shard 0/2 and 1/2 at once into one folder and one summary file, as an array job runs them: every
    job trained once, the same files as the unsharded run (the same seeds and inputs; the shards run torch
    on one thread each, another summation order: 1e-8 seen), a JSON line per job."""
    from dti_cli.shards import shard_of
    jobs = _jobs_file(tmp_path, sd15_checkpoint, SHARD_NAMES)
    assert {shard_of(n, 2) for n in SHARD_NAMES} == {0, 1}  # both shards have work
    r = cli(comfy, "--jobs", jobs, "--output", tmp_path / "one")
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, COMFYUI_PATH=comfy.path, OMP_NUM_THREADS="1")  # (two processes on 2 cores)
    shards = [subprocess.Popen([sys.executable, "-m", "dti_cli", "--cpu", "--jobs", str(jobs),
                                "--output", str(tmp_path / "sharded"), "--shard", f"{k}/2",
                                "--summary", str(tmp_path / "runs.jsonl")], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    for k, proc in enumerate(shards):
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        mine = [n for n in SHARD_NAMES if shard_of(n, 2) == k]
        assert f"shard {k}/2: {len(mine)} of 4 job(s)" in err
        assert f"dti_cli: shard {k}/2: {len(mine)} job(s): {len(mine)} trained, 0 reused, 0 failed" in err
    records = _summary(tmp_path / "runs.jsonl")
    assert sorted(r["job"] for r in records if "job" in r) == SHARD_NAMES
    assert {r["status"] for r in records if "job" in r} == {"trained"}
    for name in SHARD_NAMES:
        a = load_embedding(str(tmp_path / "one" / f"{name}.safetensors"))
        b = load_embedding(str(tmp_path / "sharded" / f"{name}.safetensors"))
        assert torch.allclose(a.vectors["clip_l"], b.vectors["clip_l"], atol=1e-6)
        assert a.metadata["dti.fingerprint"] == b.metadata["dti.fingerprint"]
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == sorted(f"{n}.safetensors" for n in SHARD_NAMES)


def test_a_killed_shard_rerun_trains_only_what_was_left(comfy, sd15_checkpoint, tmp_path):
    """The shard is killed once its first file is written; the rerun reuses that file (its fingerprint
    matches) and trains the rest; every file in the folder loads whole."""
    import time as _time
    jobs = _jobs_file(tmp_path, sd15_checkpoint, SHARD_NAMES[:3])
    out = tmp_path / "out"
    env = dict(os.environ, COMFYUI_PATH=comfy.path)
    proc = subprocess.Popen([sys.executable, "-m", "dti_cli", "--cpu", "--jobs", str(jobs), "--output", str(out),
                             "--shard", "0/1", "--summary", str(tmp_path / "runs.jsonl")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = _time.monotonic() + 600
    while _time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and any(p.suffix == ".safetensors" for p in out.iterdir()):
            break
        _time.sleep(0.2)
    proc.kill()
    proc.communicate(timeout=60)
    done = sorted(p.stem for p in out.iterdir() if p.suffix == ".safetensors")
    assert 1 <= len(done) < 3, done  # killed mid-run
    r = cli(comfy, "--jobs", jobs, "--output", out, "--shard", "0/1", "--summary", tmp_path / "runs.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    rerun = [x for x in _summary(tmp_path / "runs.jsonl") if "job" in x][-3:]
    assert {x["job"] for x in rerun if x["status"] == "reused"} == set(done)
    assert {x["job"] for x in rerun if x["status"] == "trained"} == set(SHARD_NAMES[:3]) - set(done)
    for p in out.iterdir():
        if p.suffix == ".safetensors":
            assert load_embedding(str(p)).is_dti
    assert [p.name for p in out.iterdir() if not p.name.endswith(".safetensors")] == []  # no temp file left


@pytest.mark.parametrize("spec", ["3/2", "0/0", "a/b"])
def test_bad_shard_specs_exit_2_with_one_line(comfy, sd15_checkpoint, tmp_path, spec):
    jobs = _jobs_file(tmp_path, sd15_checkpoint, ["only"])
    r = cli(comfy, "--jobs", jobs, "--shard", spec)
    # refused before ComfyUI is even imported (it prints where it found ComfyUI then)
    assert r.returncode == 2 and "loading model" not in r.stderr and "ComfyUI at" not in r.stderr, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("dti_cli: error:")]
    assert len(errors) == 1 and "--shard" in errors[0], r.stderr


def test_help_lists_every_dti_train_input(comfy):
    """``--help`` reads the node's inputs (ComfyUI found): every DTI Train widget input is an option."""
    r = cli(comfy, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--learning-rate", "--kappa", "--method", "--gradient-checkpointing", "--preview-every",
                 "--shard", "--summary"):
        assert flag in r.stdout, flag
