"""What the pack's nodes share: type names, the embedding-file guard, the result text."""

from __future__ import annotations

import logging
import os

from ..comfy_host.paths import embedding_folders, embeddings_root, load_listed, prompt_name, target_path  # noqa: F401
from ..comfy_host.ui import LISTENERS, send_to_client  # noqa: F401
from ..dti_core.embedding_file import Embedding, EmbeddingFileError, load_embedding

log = logging.getLogger("ComfyUI-DTI")

# The type name of the handle DTI nodes pass between each other.
EMBEDDING_TYPE = "DTI_EMBEDDING"
HISTORY_TYPE = "DTI_HISTORY"
CATEGORY = "DTI"


def file_state(path: str) -> str:
    """A cheap fingerprint of a file's presence and content, for IS_CHANGED."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_mtime_ns}:{st.st_size}"


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
                  final_loss: float | None = None, learned=None, norms: dict | None = None) -> str:
    """DTI Train's result text: the file, then per encoder how many vectors it learned and why
    (``norms``: a plain-TI run's final lengths per encoder, shown instead of m*).

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
        if norms is not None and key in norms:  # plain TI: the lengths are free
            shown = ", ".join(f"{x:.4f}" for x in norms[key])
            length = f", |v| = {shown} (plain TI: free lengths; m* {m:.4f})" if m is not None else f", |v| = {shown}"
        lines.append(f"{key}: {n} {plural} ({why}), {state}{length}")
    if not num_vectors and max(counts.values(), default=1) > 1:
        lines.append("Every token of the initializer becomes one vector of the word; "
                     "set num_vectors to choose the count instead.")
    return "\n".join(lines)
