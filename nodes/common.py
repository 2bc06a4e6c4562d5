"""Small host helpers shared by the pack's nodes: folders, the embedding handle, UI messages."""

from __future__ import annotations

import logging
import os

import folder_paths

from ..dti_core.embedding_file import Embedding, EmbeddingFileError, load_embedding
from ..dti_core.names import resolve_inside

log = logging.getLogger("ComfyUI-DTI")

# The type name of the handle DTI nodes pass between each other.
EMBEDDING_TYPE = "DTI_EMBEDDING"
HISTORY_TYPE = "DTI_HISTORY"
CATEGORY = "DTI"


def embeddings_root() -> str:
    """The first ``embeddings`` folder: where this pack writes (ComfyUI reads all of them)."""
    paths = folder_paths.get_folder_paths("embeddings")
    if not paths:
        raise RuntimeError("ComfyUI has no 'embeddings' folder configured (see extra_model_paths.yaml)")
    return paths[0]


def target_path(name: str) -> str:
    """Checked path of ``embeddings/NAME.safetensors`` (raises on an unsafe name)."""
    return resolve_inside(embeddings_root(), name)


def file_state(path: str) -> str:
    """A cheap fingerprint of a file's presence and content, for IS_CHANGED."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_mtime_ns}:{st.st_size}"


def prompt_name(path: str) -> str:
    """The ``NAME`` to write after ``embedding:`` for a file inside an embeddings folder."""
    for root in folder_paths.get_folder_paths("embeddings"):
        root = os.path.realpath(root)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) == root:
            rel = os.path.relpath(real, root).replace(os.sep, "/")
            return os.path.splitext(rel)[0]
    raise ValueError(f"{path} is not inside a ComfyUI embeddings folder, so prompts cannot name it")


def load_listed(filename: str) -> Embedding:
    """Load one of the files ``folder_paths`` lists under ``embeddings`` (a dropdown value)."""
    path = folder_paths.get_full_path("embeddings", filename)
    if path is None:
        raise FileNotFoundError(f"embedding {filename!r} is not in any ComfyUI embeddings folder")
    return load_embedding(path)


def existing_result(path: str, name: str, fingerprint: str) -> Embedding | None:
    """For a node about to write ``path`` without overwrite: the file there if these exact inputs
    made it (reuse it), None if there is no file; otherwise refuse, never touching the file."""
    if not os.path.exists(path):
        return None
    try:
        existing = load_embedding(path)
    except EmbeddingFileError:
        existing = None
    if existing is not None and existing.metadata.get("dti.fingerprint") == fingerprint:
        return existing
    raise FileExistsError(
        f"embeddings/{name}.safetensors already exists and was not made from these inputs. "
        f"Choose another name, or enable 'overwrite' to replace it."
    )


# In-process listeners ``fn(event, data)`` of everything send_to_client sends (the command line's
# terminal progress bar uses them; a browser gets the same events through the server).
LISTENERS: list = []


def send_to_client(event: str, data: dict) -> None:
    """Push a message to the browser tab that queued the prompt; silent when no server runs."""
    for listener in list(LISTENERS):
        try:
            listener(event, data)
        except Exception as e:  # a progress display must never fail a training run
            log.debug("DTI: listener failed on %s: %s", event, e)
    try:
        from server import PromptServer
    except Exception:  # no server: tests, scripts
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return
    try:
        instance.send_sync(event, data, instance.client_id)
    except Exception as e:  # a UI message must never fail a training run
        log.debug("DTI: could not send %s: %s", event, e)


class WritesEmbeddingFile:
    """For nodes that write ``embeddings/NAME``: re-run when that file changes, refuse bad names early."""

    @classmethod
    def IS_CHANGED(cls, name="", **kwargs):
        # Re-run whenever the target file appeared, changed or disappeared; the node then
        # decides between writing, reusing an identical earlier result, or refusing.
        try:
            return file_state(target_path(name))
        except Exception:
            return float("nan")

    @staticmethod
    def name_problem(name) -> str | None:
        """The refusal message for ``name``, or None. None also for a linked (not yet known) name."""
        if name is None:
            return None
        try:
            target_path(name)  # the full check, symlinked subfolders included
        except ValueError as e:
            return str(e)
        return None

    @classmethod
    def VALIDATE_INPUTS(cls, name=None):
        # Only `name` is named: ComfyUI files the returned message under every argument named
        # here (so a second one would be blamed for a bad name too), and with **kwargs it would
        # skip its own range checks of every other input. Subclasses must not add arguments;
        # other inputs are checked when the node runs.
        return cls.name_problem(name) or True


def train_summary(name: str, counts: dict, m_star: dict, initializer: str, num_vectors: int = 0,
                  final_loss: float | None = None, learned=None) -> str:
    """DTI Train's result text: the file, then per encoder how many vectors it learned and why.

    An initializer that one tokenizer splits into several pieces ('teddy bear', or a rare word)
    trains one vector per piece; the text says so, since the user only typed one word."""
    head = f"Saved embedding:{name}" + (f" (final loss {final_loss:.5f})" if final_loss is not None else "")
    lines = [head]
    learned = set(counts if learned is None else learned)
    for key, n in counts.items():
        plural = "vector" if n == 1 else "vectors"
        if num_vectors:
            why = f"num_vectors = {num_vectors}"
        else:
            why = f"{initializer.strip()!r} is {n} token{'' if n == 1 else 's'} for this encoder"
        state = "learned" if key in learned else "kept at the initializer (not in train_encoders)"
        m = m_star.get(key)
        length = f", |v| = m* {m:.4f}" if m is not None else ""
        lines.append(f"{key}: {n} {plural} ({why}), {state}{length}")
    if not num_vectors and max(counts.values(), default=1) > 1:
        lines.append("Every token of the initializer becomes one vector of the word; "
                     "set num_vectors to choose the count instead.")
    return "\n".join(lines)
