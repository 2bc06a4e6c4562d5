"""How fast this machine is right now, in the two things the suite spends its time on, so that two CI runs'
times can be compared: .ci/run prints it before and after the tests. Not a test, and nothing asserts on it.

* ``matmul``: fp32 GFLOP/s of a 1024 x 4096 by 4096 x 4096 product on torch's threads (the text
  encoders' and DiTs' linear layers are most of the suite's compute).
* ``fresh memory``: GB/s of casting 256 MiB of fp16 into newly allocated fp32 tensors, each freed after,
  as ComfyUI's per-call weight casts do (every such allocation is new pages from the kernel; on this VM
  their price varies from run to run more than compute does).

Each is the best of a few repeats (the least disturbed): about 3 s of measuring, 6 s with torch's import.
Pure torch, no ComfyUI.
"""

from __future__ import annotations

import time

import torch


def _best(fn, repeats):
    fn()  # warm-up: first touch, MKL's own set-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure() -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 4096, generator=g)
    b = torch.randn(4096, 4096, generator=g)
    t_mm = _best(lambda: torch.mm(a, b), 5)
    half = torch.randn(64, 1024, 1024, generator=g).half()  # 128 MiB of fp16 -> 256 MiB of fp32 per cast

    def casts():
        for _ in range(4):
            out = half.float()
            del out

    t_cast = _best(casts, 3)
    return {"matmul_gflops": 2 * 1024 * 4096 * 4096 / t_mm / 1e9,
            "fresh_memory_gbps": 4 * half.numel() * 4 / t_cast / 1e9}


if __name__ == "__main__":  # python tests/machine_speed.py
    m = measure()
    print(f"matmul {m['matmul_gflops']:.0f} GFLOP/s on {torch.get_num_threads()} threads, "
          f"fresh-memory casts {m['fresh_memory_gbps']:.1f} GB/s")
