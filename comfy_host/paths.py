"""ComfyUI's folders: where embeddings are read and written, the input folder, the dropdown lists."""

from __future__ import annotations

import os

import folder_paths

from ..dti_core.embedding_file import Embedding, load_embedding
from ..dti_core.names import resolve_inside


def embedding_folders() -> list[str]:
    """Every ``embeddings`` folder ComfyUI reads (``embedding:NAME`` looks in all of them)."""
    return list(folder_paths.get_folder_paths("embeddings"))


def embedding_files() -> list[str]:
    """The files ComfyUI lists under ``embeddings`` (dropdown values)."""
    return sorted(folder_paths.get_filename_list("embeddings"))


def embedding_path(filename: str) -> str | None:
    """The full path of a listed embeddings file (a dropdown value), None if it is not there."""
    return folder_paths.get_full_path("embeddings", filename)


def add_embedding_folder(path: str) -> None:
    """Make ``path`` the first ``embeddings`` folder (where this pack writes)."""
    folder_paths.add_model_folder_path("embeddings", path, is_default=True)


def input_directory() -> str:
    return folder_paths.get_input_directory()


def set_input_directory(path: str) -> None:
    folder_paths.set_input_directory(path)


def embeddings_root() -> str:
    """The first ``embeddings`` folder: where this pack writes (ComfyUI reads all of them)."""
    paths = embedding_folders()
    if not paths:
        raise RuntimeError("ComfyUI has no 'embeddings' folder configured (see extra_model_paths.yaml)")
    return paths[0]


def target_path(name: str) -> str:
    """Checked path of ``embeddings/NAME.safetensors`` (raises on an unsafe name)."""
    return resolve_inside(embeddings_root(), name)


def prompt_name(path: str) -> str:
    """The ``NAME`` to write after ``embedding:`` for a file inside an embeddings folder."""
    for root in embedding_folders():
        root = os.path.realpath(root)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) == root:
            rel = os.path.relpath(real, root).replace(os.sep, "/")
            return os.path.splitext(rel)[0]
    raise ValueError(f"{path} is not inside a ComfyUI embeddings folder, so prompts cannot name it")


def load_listed(filename: str) -> Embedding:
    """Load one of the files ``folder_paths`` lists under ``embeddings`` (a dropdown value)."""
    path = embedding_path(filename)
    if path is None:
        raise FileNotFoundError(f"embedding {filename!r} is not in any ComfyUI embeddings folder")
    return load_embedding(path)
