"""Jobs per hour of one jobs file three ways, side by side in one run: the sequential CLI (one process,
one model load), N array shards at once (``--shard k/N``: N processes, N loads) and a local Ray with
N actors (``--ray local``: N actors, N loads). Each way trains the same jobs into a fresh folder.

  COMFYUI_PATH=/opt/ComfyUI python bench/bench_jobs.py --checkpoint MODEL.safetensors --jobs 8 --steps 50
  ... --cpu --workers 2   # this CPU; on a GPU machine leave --cpu out (one shard / actor per GPU)

The photos are generated (random 64 px images): the rate is the training's, not a quality figure.
Prints one JSON line per way: seconds, jobs/hour, and the model load time the CLI reported.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def write_jobs(folder: Path, checkpoint: str, count: int, steps: int, resolution: int) -> Path:
    lines = [f'checkpoint = "{checkpoint}"', "[defaults]", f"steps = {steps}", "batch_size = 1",
             f"resolution = {resolution}", 'initializer = "dog"']
    for i in range(count):
        images = folder / f"img{i}"
        images.mkdir(parents=True)
        rng = np.random.RandomState(i)
        for j in range(2):
            Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8")).save(images / f"{j}.png")
        lines += ["[[job]]", f'name = "job-{i:03d}"', f'images = "img{i}"']
    path = folder / "jobs.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dti_cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs) -> str:
    texts = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"bench_jobs: a run failed (status {p.returncode}):\n{err[-3000:]}")
        texts.append(err)
    return "\n".join(texts)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="shards run at once, and Ray actors")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dti-bench-jobs-"))
    jobs = write_jobs(work, str(Path(a.checkpoint).resolve()), a.jobs, a.steps, a.resolution)
    common = (["--cpu"] if a.cpu else []) + ["--jobs", str(jobs)]
    ways = [("sequential", lambda out: [cli(common + ["--output", out])])]
    ways.append((f"{a.workers} shards", lambda out: [cli(common + ["--output", out, "--shard", f"{k}/{a.workers}"])
                                                     for k in range(a.workers)]))
    if not a.skip_ray:
        ways.append((f"ray, {a.workers} actors",
                     lambda out: [cli(common + ["--output", out, "--ray", "local", "--actors", str(a.workers)])]))
    for label, start in ways:
        out = work / re.sub(r"\W+", "-", label)
        t0 = time.perf_counter()
        err = finish(start(str(out)))
        seconds = time.perf_counter() - t0
        files = len(list(out.glob("*.safetensors")))
        loads = [float(x) for x in re.findall(r"model loaded in ([\d.]+) s", err)]
        print(json.dumps({"way": label, "jobs": a.jobs, "files": files, "steps": a.steps, "seconds": round(seconds, 1),
                          "jobs_per_hour": round(3600 * a.jobs / seconds), "model_load_s": loads,
                          "device": "cpu" if a.cpu else "gpu"}), flush=True)


if __name__ == "__main__":
    main()
