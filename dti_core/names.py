"""One check for every name a node writes under: refuse, never silently rewrite.

A name may hold subfolders (``people/anna``), as ComfyUI's ``embedding:people/anna``
does, but nothing that could leave the target folder or that a prompt could not
spell. Refusing keeps the file name equal to what the user typed, so the
``embedding:NAME`` they write later is the one they expect.
"""

from __future__ import annotations

import os
import re

# ComfyUI's tokenizer splits the prompt on whitespace and reads `embedding:NAME`
# up to the next space or comma, so those never belong in a name.
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(10)} | {f"lpt{i}" for i in range(10)}
MAX_COMPONENT = 100
MAX_NAME = 200
EXTENSIONS = (".safetensors", ".pt", ".bin")


class UnsafeNameError(ValueError):
    """A name was refused; the message says why and what is accepted."""


def _refuse(name: str, why: str) -> UnsafeNameError:
    return UnsafeNameError(
        f"name {name!r} refused: {why}. Use letters, digits, '_', '-' and '.', "
        f"optionally in subfolders separated by '/', at most {MAX_NAME} characters."
    )


def check_name(name: str) -> str:
    """Return ``name`` (without a ``.safetensors`` suffix) or raise ``UnsafeNameError``."""
    if not isinstance(name, str):
        raise _refuse(repr(name), "not a string")
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name.strip():
        raise _refuse(name, "it is empty")
    if "\x00" in name:
        raise _refuse(name, "it contains a NUL character")
    if len(name) > MAX_NAME:
        raise _refuse(name[:40] + "...", f"it is {len(name)} characters long")
    if "\\" in name or re.match(r"^[A-Za-z]:", name):
        raise _refuse(name, "backslashes and drive letters are not allowed")
    if name.startswith("/"):
        raise _refuse(name, "absolute paths are not allowed")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise _refuse(name, "empty, '.' or '..' path parts are not allowed")
        if len(part) > MAX_COMPONENT:
            raise _refuse(name, f"a path part is longer than {MAX_COMPONENT} characters")
        if not _COMPONENT.match(part):
            raise _refuse(name, f"part {part!r} has a character outside letters, digits, '_', '-', '.'")
        if part.endswith("."):
            raise _refuse(name, "a path part may not end with '.'")
        if part.split(".")[0].lower() in _WINDOWS_RESERVED:
            raise _refuse(name, f"{part!r} is a reserved device name on Windows")
    return name


def resolve_inside(root: str, name: str, extension: str = ".safetensors") -> str:
    """Checked absolute path of ``root/name + extension``.

    Follows symlinks on both sides and refuses a result outside ``root``, so a
    symlinked subfolder that points elsewhere is caught too.
    """
    name = check_name(name)
    root_real = os.path.realpath(root)
    target = os.path.realpath(os.path.join(root_real, *name.split("/")) + extension)
    if os.path.commonpath([root_real, target]) != root_real:
        raise _refuse(name, f"it resolves outside the folder {root_real}")
    return target
