"""ComfyUI made importable outside its server (the command line, benchmarks).

Loaded by file path before the pack itself (its modules import ComfyUI at the top), so it has no
imports of the pack. ComfyUI has a top-level ``nodes.py``, this pack a ``nodes/`` package: the
pack's folder leaves ``sys.path`` and ComfyUI's goes first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def start(comfy_path, cpu: bool, pack_root=None) -> None:
    """Put ComfyUI first on ``sys.path``, set ``--cpu`` if asked, and let it choose its device."""
    if pack_root is not None:
        root = os.path.realpath(str(pack_root))
        sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
    for name in [n for n in sys.modules if n == "nodes" or n.startswith("nodes.")]:
        del sys.modules[name]
    sys.path.insert(0, str(Path(comfy_path)))
    from comfy.cli_args import args  # parses no command line unless ComfyUI's main enabled it

    if cpu:
        args.cpu = True
    import comfy.model_management  # noqa: F401  (chooses the device from args)
