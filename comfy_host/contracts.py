"""The host's version and the errors this layer raises when a model or a ComfyUI does not fit.

Where the ComfyUI releases this pack is tested on (0.3.64, 0.33.0) differ, the layer detects
the capability (an attribute, a signature, a return shape), never a version string; the version
only goes into messages, so a user on another ComfyUI can say what they run.
"""

from __future__ import annotations

import functools
import sys

TESTED_ON = ("0.3.64", "0.33.0")


class UnsupportedModelError(ValueError):
    """The MODEL / CLIP is not one DTI Train can train (a clear refusal, never a traceback)."""


class HostContractError(RuntimeError):
    """A ComfyUI behaviour this pack relies on is not what it was on the tested hosts."""

    def __init__(self, contract: str, expected: str, got: str):
        self.contract, self.expected, self.got = contract, expected, got
        super().__init__(
            f"ComfyUI {comfyui_version()} differs from the ComfyUI this pack was tested on "
            f"({' and '.join(TESTED_ON)}) in {contract}: expected {expected}, got {got}. Nothing was trained or "
            f"written. Please report this with your ComfyUI version, or use a tested ComfyUI.")


@functools.cache
def comfyui_version() -> str:
    """``comfyui_version.__version__`` of the running ComfyUI (the file at its root), or 'unknown'."""
    module = sys.modules.get("comfyui_version")
    if module is None:
        try:
            import comfyui_version as module
        except ImportError:
            return "unknown"
    return str(getattr(module, "__version__", "unknown"))
