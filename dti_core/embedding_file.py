"""Embedding files: our safetensors format, written atomically, and safe readers for the common ones.

Our file is what ComfyUI's ``load_embed`` picks per encoder: one tensor per text
encoder under ``clip_l`` (768 wide), ``clip_g`` (1280), ``clip_h`` (1024) or
``t5xxl`` (4096: Flux, SD3, Chroma), one row per token slot, plus string metadata under ``dti.*``. Reading goes through
safetensors or ``torch.load(weights_only=True)`` only, never plain unpickling.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from .names import resolve_inside

# Encoder key -> token width, as ComfyUI's sd1_clip.load_embed matches them.
ENCODER_WIDTHS = {"clip_l": 768, "clip_g": 1280, "clip_h": 1024, "t5xxl": 4096, "gemma2_2b": 2304, "qwen3_4b": 2560,
                  "qwen3_8b": 4096, "umt5xxl": 4096, "qwen25_7b": 3584}
# A file that names no encoder is read by its width; where two encoders share one (T5-XXL and
# Qwen3-8B, UMT5-XXL: 4096), the earlier in ENCODER_WIDTHS wins (T5: the older files in the wild).
WIDTH_TO_ENCODER: dict[int, str] = {}
for _k, _w in ENCODER_WIDTHS.items():
    WIDTH_TO_ENCODER.setdefault(_w, _k)
METHOD = "dti"
TI_METHOD = "ti"  # DTI Train's plain-TI baseline
META_PREFIX = "dti."
# A real embedding's header is a few hundred bytes; anything this large is hostile.
MAX_HEADER_BYTES = 1 << 20
MAX_FILE_BYTES = 256 << 20
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class EmbeddingFileError(ValueError):
    """An embedding file could not be read or written; the message names the file."""


@dataclass
class Embedding:
    """Vectors per encoder key (``(n, width)`` float32 tensors) and their metadata."""

    vectors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = METHOD
    path: str | None = None
    # encoder key -> the key it was read from in the file ("string_to_param", "emb_params", ...)
    source_keys: dict[str, str] = field(default_factory=dict)

    @property
    def is_dti(self) -> bool:
        return self.metadata.get(META_PREFIX + "method") == METHOD

    @property
    def is_plain_ti(self) -> bool:
        """Trained by DTI Train's plain-TI baseline (method ``ti``): free lengths, no prior."""
        return self.metadata.get(META_PREFIX + "method") == TI_METHOD

    def m_star(self, key: str) -> float | None:
        return finite_float(self.metadata.get(f"{META_PREFIX}m_star.{key}"))

    @property
    def num_vectors(self) -> int:
        return max(t.shape[0] for t in self.vectors.values())


def dti_metadata(**fields) -> dict[str, str]:
    """String metadata for a DTI file: ``dti.method`` plus the given fields, stringified."""
    meta = {META_PREFIX + "method": METHOD}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                meta[f"{META_PREFIX}{key}.{sub}"] = _stringify(v)
        else:
            meta[META_PREFIX + key] = _stringify(value)
    return meta


def _stringify(value) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def _check_vectors(vectors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    if not vectors:
        raise EmbeddingFileError(f"{where}: no vectors")
    out = {}
    for key, t in vectors.items():
        if not isinstance(t, torch.Tensor):
            raise EmbeddingFileError(f"{where}: key {key!r} is not a tensor")
        if t.dtype not in FLOAT_DTYPES:
            raise EmbeddingFileError(f"{where}: key {key!r} has dtype {t.dtype}, expected a float tensor")
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.shape[0] == 0:
            raise EmbeddingFileError(f"{where}: key {key!r} has shape {tuple(t.shape)}, expected (vectors, width)")
        t = t.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise EmbeddingFileError(f"{where}: key {key!r} holds NaN or infinite values")
        out[key] = t
    return out


def atomic_write_bytes(path: str, data: bytes, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``.

    A crash or cancel at any point leaves either the old file or the new one,
    never a torn file, and no temp file behind.
    """
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} already exists; enable overwrite to replace it")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would, so that a shared
        # or containerised ComfyUI (another user) can read it.
        os.chmod(tmp, _new_file_mode())
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # BaseException: a cancel (KeyboardInterrupt, host interrupt) must not leave the temp file.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _current_umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode() -> int:
    """What ``open(path, "w")`` would give a new file: 0666 minus the umask (0644 under umask 022).
    Also for a replaced file: earlier versions wrote 0600 by mistake, and overwriting mends that."""
    return 0o666 & ~_current_umask()


def _write_all(f, data: bytes) -> None:
    # A seam for tests that make the write fail half-way.
    f.write(data)


def save_embedding(
    root: str,
    name: str,
    vectors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``vectors`` as ``root/name.safetensors``; return the absolute path."""
    path = resolve_inside(root, name)
    where = os.path.basename(path)
    vectors = _check_vectors(vectors, where)
    for key, t in vectors.items():
        if key in ENCODER_WIDTHS and t.shape[1] != ENCODER_WIDTHS[key]:
            raise EmbeddingFileError(f"{where}: key {key!r} must be {ENCODER_WIDTHS[key]} wide, got {t.shape[1]}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    data = st_save_bytes({k: v.contiguous() for k, v in vectors.items()}, metadata=meta)
    atomic_write_bytes(path, data, overwrite=overwrite)
    return path


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise EmbeddingFileError(f"{path}: {size} bytes is far too large for an embedding")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise EmbeddingFileError(f"{path}: truncated safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(data) - 8:
        raise EmbeddingFileError(f"{path}: safetensors header length {header_len} is invalid for a {len(data)}-byte file")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EmbeddingFileError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise EmbeddingFileError(f"{path}: safetensors header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise EmbeddingFileError(f"{path}: safetensors metadata is not a JSON object")
    try:
        tensors = st_load_bytes(data)
    except Exception as e:  # safetensors raises its own error types for bad offsets/dtypes
        raise EmbeddingFileError(f"{path}: corrupt safetensors file ({e})") from None
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _read_pickle(path: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EmbeddingFileError(
            f"{path}: refused to load: it is not a plain tensor file that torch.load(weights_only=True) "
            f"accepts (it may contain code). Convert it to .safetensors from a trusted source. ({type(e).__name__})"
        ) from None


def _by_width(t: torch.Tensor, path: str, key: str) -> str:
    width = t.shape[-1]
    if width not in WIDTH_TO_ENCODER:
        raise EmbeddingFileError(
            f"{path}: key {key!r} is {width} wide, which matches no supported text encoder "
            f"({', '.join(f'{w} {k}' for k, w in ENCODER_WIDTHS.items())})"
        )
    return WIDTH_TO_ENCODER[width]


def _interpret(obj: object, path: str) -> tuple[dict[str, torch.Tensor], str, dict[str, str]]:
    """Map a loaded object to ``{encoder_key: tensor}``, a format name and the file key of each."""
    if isinstance(obj, torch.Tensor):
        key = _by_width(obj, path, "<tensor>")
        return {key: obj}, "tensor", {key: "<tensor>"}
    if not isinstance(obj, dict) or not obj:
        raise EmbeddingFileError(f"{path}: not an embedding (expected a dict of tensors, got {type(obj).__name__})")
    if any(k in obj for k in ENCODER_WIDTHS):
        found = {k: obj[k] for k in ENCODER_WIDTHS if k in obj}
        return found, "per-encoder", {k: k for k in found}
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise EmbeddingFileError(f"{path}: 'string_to_param' is empty or not a dict")
        t = next(iter(params.values()))
        key = _by_width(t, path, "string_to_param")
        return {key: t}, "a1111", {key: "string_to_param"}
    if "emb_params" in obj:
        t = obj["emb_params"]
        key = _by_width(t, path, "emb_params")
        return {key: t}, "a1111", {key: "emb_params"}
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:
        name, t = next(iter(tensors.items()))
        key = _by_width(t, path, name)
        return {key: t}, "diffusers", {key: str(name)}
    raise EmbeddingFileError(
        f"{path}: unrecognised embedding layout (keys: {', '.join(map(str, list(obj)[:8]))}); "
        f"expected clip_l/clip_g/clip_h, string_to_param, emb_params or a single tensor"
    )


def load_embedding(path: str) -> Embedding:
    """Read an embedding file of any supported format; raise ``EmbeddingFileError`` on anything else."""
    if not os.path.isfile(path):
        raise EmbeddingFileError(f"{path}: no such embedding file")
    ext = os.path.splitext(path)[1].lower()
    metadata: dict[str, str] = {}
    if ext == ".safetensors":
        obj, metadata = _read_safetensors(path)
    elif ext in (".pt", ".bin"):
        obj = _read_pickle(path)
    else:
        raise EmbeddingFileError(f"{path}: unsupported extension {ext!r}; use .safetensors, .pt or .bin")
    vectors, fmt, source_keys = _interpret(obj, path)
    vectors = _check_vectors(vectors, path)
    for key, t in vectors.items():
        if t.shape[1] != ENCODER_WIDTHS[key]:
            raise EmbeddingFileError(
                f"{path}: key {key!r} is {t.shape[1]} wide, expected {ENCODER_WIDTHS[key]} for that encoder"
            )
    if metadata.get(META_PREFIX + "method") in (METHOD, TI_METHOD):
        fmt = metadata[META_PREFIX + "method"]
    return Embedding(vectors=vectors, metadata=metadata, source_format=fmt, path=path, source_keys=source_keys)


def finite_float(text: str | None) -> float | None:
    """Parse a metadata number, ``None`` when absent or not finite."""
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


# Which model family a set of text-encoder keys belongs to (the keys an embedding file carries,
# or those of a CLIP). Several families share a layout; the name says so ("-style").
_FAMILIES_BY_KEYS = (
    (frozenset({"clip_l"}), "SD1.x"),
    (frozenset({"clip_h"}), "SD2.x"),
    (frozenset({"clip_l", "clip_g"}), "SDXL"),
    (frozenset({"clip_l", "t5xxl"}), "Flux-style"),
    (frozenset({"t5xxl"}), "Chroma-style"),
    (frozenset({"clip_l", "clip_g", "t5xxl"}), "SD3-style"),
)


def family_of_keys(keys) -> str:
    """The model family a set of encoder keys means: ``clip_l`` alone (768) is SD1.x, ``clip_h``
    (1024) SD2.x, ``clip_l`` + ``clip_g`` (1280) SDXL; with ``t5xxl`` (4096): Flux (+ ``clip_l``),
    Chroma (alone), SD3 (+ both CLIPs). Anything else is described by its keys."""
    keys = frozenset(keys)
    for family_keys, name in _FAMILIES_BY_KEYS:
        if keys == family_keys:
            return name
    if "t5xxl" in keys:
        return "Flux/SD3/Chroma-style"
    return " + ".join(sorted(keys)) or "no text encoder"


def _article(name: str) -> str:
    return "an" if name.startswith(("SD", "no ")) else "a"


def check_fits(emb: Embedding, expected: dict[str, int]) -> None:
    """Refuse an embedding that lacks vectors for one of a CLIP's encoders ``{key: width}``,
    saying which model family the file and the CLIP belong to.

    ComfyUI would only log a warning at encode time and silently drop the word.
    """
    where = emb.path or "embedding"
    missing = [key for key in expected if key not in emb.vectors]
    if not missing:
        return
    ours = family_of_keys(emb.vectors)
    theirs = family_of_keys(expected)
    found = ", ".join(
        f"key {emb.source_keys.get(k, k)!r} is {t.shape[1]} wide" for k, t in sorted(emb.vectors.items())
    )
    wants = " + ".join(f"{k} {w}" for k, w in expected.items())
    lacks = ", ".join(f"{k} ({expected[k]}-wide)" for k in missing)
    raise EmbeddingFileError(
        f"{where}: does not fit this CLIP: this is {_article(ours)} {ours} embedding ({found}) and the CLIP is "
        f"{theirs} ({wants}), so it has no {lacks} vectors. Use an embedding trained for {theirs}; "
        f"ComfyUI alone would silently drop the word."
    )
