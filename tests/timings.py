"""Where a test run's set-up time goes: each model generation, server start and browser start appends
one line to ``$DTI_TIMINGS`` (JSON lines; .ci/run sets it per host and prints the sums at the end of
that host's run). Without the variable nothing is written. Pure helper: no pytest, no ComfyUI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def record(kind: str, name: str, seconds: float) -> None:
    path = os.environ.get("DTI_TIMINGS")
    if not path:
        return
    line = json.dumps({"kind": kind, "name": name, "seconds": round(seconds, 2)}) + "\n"
    with open(path, "a", encoding="utf-8") as f:  # one short append per line: whole lines, even from two processes
        f.write(line)


def summary(path: str | Path) -> list[str]:
    """``kind: N, total s (largest: name s, ...)`` per kind, for .ci/run's report."""
    by_kind: dict[str, list[tuple[float, str]]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        by_kind.setdefault(row["kind"], []).append((row["seconds"], row["name"]))
    out = []
    for kind, rows in sorted(by_kind.items()):
        rows.sort(reverse=True)
        top = ", ".join(f"{n} {s:.1f} s" for s, n in rows[:6])
        out.append(f"{kind}: {len(rows)}, {sum(s for s, _ in rows):.0f} s in all (largest: {top})")
    return out


if __name__ == "__main__":  # python tests/timings.py FILE
    for text in summary(sys.argv[1]):
        print(text)
