"""Splitting a jobs file across array-job tasks (Slurm arrays, Kubernetes Indexed Jobs, or by hand).

A job belongs to shard ``sha256(name) mod N``: the same job lands in the same shard whatever the order
of the file or which task reads it, so shards never overlap and a requeued shard takes the same jobs.
Nothing here imports ComfyUI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

# Slurm: the task's index within its array (minus the array's first index) and the array's size.
SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")
# Kubernetes Indexed Job: the pod's index; the count is the Job's .spec.completions, which the manifest
# in docs/cli.md passes as JOB_COMPLETIONS (Kubernetes does not set it by itself).
K8S = ("JOB_COMPLETION_INDEX", "JOB_COMPLETIONS")


class ShardError(ValueError):
    pass


def parse_shard(text: str, env: dict | None = None) -> tuple[int, int]:
    """``"K/N"`` (0 <= K < N) -> ``(K, N)``; ``"auto"`` reads Slurm's or Kubernetes' variables."""
    env = os.environ if env is None else env
    text = (text or "").strip()
    if text == "auto":
        if env.get(SLURM[0]) is not None:
            try:
                k = int(env[SLURM[0]]) - int(env.get(SLURM[1], "0"))
                n = int(env[SLURM[2]])
            except (KeyError, ValueError):
                raise ShardError(f"--shard auto: Slurm sets {SLURM[0]} but not a whole {SLURM[2]} "
                                 f"(submit with --array)") from None
        elif env.get(K8S[0]) is not None:
            try:
                k, n = int(env[K8S[0]]), int(env[K8S[1]])
            except (KeyError, ValueError):
                raise ShardError(f"--shard auto: {K8S[0]} is set but {K8S[1]} is not a whole number (set it to the "
                                 f"Job's .spec.completions, as the manifest in docs/cli.md does)") from None
        else:
            raise ShardError(f"--shard auto: no array task here (neither {SLURM[0]} nor {K8S[0]} is set); "
                             f"give K/N instead")
        where = "--shard auto"
    else:
        m = re.fullmatch(r"(\d+)\s*/\s*(\d+)", text)
        if not m:
            raise ShardError(f"--shard {text!r}: write K/N with whole numbers, 0 <= K < N (e.g. 0/4), or auto")
        k, n = int(m.group(1)), int(m.group(2))
        where = f"--shard {text}"
    if n < 1 or not 0 <= k < n:
        raise ShardError(f"{where}: shard {k} of {n} does not exist (0 <= K < N, N >= 1)")
    return k, n


def shard_of(name: str, count: int) -> int:
    """The shard (0..count-1) of the job whose output is ``name``."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select(jobs: list[dict], k: int, n: int, name=lambda job: job["inputs"]["name"]) -> list[dict]:
    """The jobs of shard ``k`` of ``n``, in file order."""
    return [job for job in jobs if shard_of(name(job), n) == k]


class Summary:
    """One JSON line per job (``--summary FILE``, appended: shards may share one file on a shared disk;
    each line is written with one ``write`` call on a file opened for appending) and a closing line."""

    def __init__(self, path: str | None, shard: tuple[int, int] | str):
        self.path, self.shard = path, shard if isinstance(shard, str) else f"{shard[0]}/{shard[1]}"
        self.counts = {"trained": 0, "reused": 0, "failed": 0}
        self.started = time.monotonic()

    def job(self, name: str, status: str, seconds: float, path: str | None = None, error: str | None = None) -> None:
        self.counts[status] += 1
        self._write({"shard": self.shard, "job": name, "status": status, "seconds": round(seconds, 3),
                     "path": path, "error": error})

    def line(self) -> str:
        c = self.counts
        total = sum(c.values())
        where = "ray" if self.shard == "ray" else f"shard {self.shard}"
        return (f"dti_cli: {where}: {total} job(s): {c['trained']} trained, {c['reused']} reused, "
                f"{c['failed']} failed in {time.monotonic() - self.started:.0f} s")

    def close(self) -> str:
        self._write({"shard": self.shard, "summary": dict(self.counts),
                     "seconds": round(time.monotonic() - self.started, 3)})
        return self.line()

    def _write(self, record: dict) -> None:
        if not self.path:
            return
        data = (json.dumps(record) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
