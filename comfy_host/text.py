"""The text path: the CLIP's encoders, the learned word's place in a prompt, and the encode.

The learned vectors enter the text encoder exactly as an ``embedding:NAME`` does at inference:
as tensor tokens that ComfyUI's own tokenizer placed and ``encode_token_weights`` splices in.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import tempfile

import torch

from ..dti_core.magnitude import target_norm
from ..dti_core.sphere import normalize
from . import memory, ops
from .contracts import HostContractError, UnsupportedModelError

# The embedding name used while tokenizing training prompts; its file lives only in a temporary folder.
PLACEHOLDER_NAME = "__dti_training_placeholder__"
# How far (in ulps of the largest value) a batched encode may differ from one encode per prompt.
BATCH_ULPS = 64
# Marker rows stand in for the learned vectors until each step splices the real ones in.
_MARK_A, _MARK_B = 12345.0, -98765.0


def text_encoders(clip) -> dict[str, tuple[str, object, torch.nn.Module]]:
    """``{embedding_key: (token_dict_key, tokenizer, encoder)}`` for every text encoder of the CLIP
    whose ComfyUI tokenizer reads ``embedding:NAME`` (CLIP-L/G/H, T5-XXL, ...).

    The embedding key is what ComfyUI looks up in an embedding file for that encoder
    (``clip_l``, ``clip_g``, ``clip_h``, ``t5xxl``); the token dict key is the encoder's key in
    ``clip.tokenize(...)`` output (``l``, ``g``, ``h``, ``t5xxl``).
    """
    found = {}
    outer = clip.tokenizer
    for attr, tok in vars(outer).items():
        key = getattr(tok, "embedding_key", None)
        # (a tokenizer that reads embedding:NAME carries the identifier and its embeddings folders)
        if (key is None or not hasattr(tok, "embedding_identifier") or not hasattr(tok, "embedding_directory")
                or attr not in (key, "clip_" + key)):
            continue
        # (the tokenizer and the model may name it differently: PixArt/Chroma's T5 is clip_t5xxl vs t5xxl)
        encoder = next((e for e in (getattr(clip.cond_stage_model, a, None) for a in (attr, key, "clip_" + key))
                        if e is not None and hasattr(e, "transformer")), None)
        if encoder is None:
            continue
        if attr == getattr(outer, "clip", None) and getattr(outer, "clip_name", None):
            tkey = outer.clip_name  # a one-encoder SD1Tokenizer wrapper: tokens under its clip_name
        else:
            tkey = attr[len("clip_"):] if attr.startswith("clip_") else attr
        found[key] = (tkey, tok, encoder)
    if not found:
        raise UnsupportedModelError(
            f"this CLIP ({type(clip.cond_stage_model).__name__}) has no text encoder whose tokenizer reads embedding:NAME")
    return found


def clip_widths(clip) -> dict[str, int]:
    """``{embedding_key: token width}`` of the CLIP's text encoders."""
    return {key: tok.embedding_size for key, (_, tok, _) in text_encoders(clip).items()}


def vocabulary(encoder) -> torch.Tensor:
    """The encoder's token table, read through the host's ops (an fp8 or quantized table too), as
    stored: rows as the encoder sees them are ``lookup_scale(encoder)`` times these."""
    return ops.read_weight(encoder.transformer.get_input_embeddings())


def lookup_scale(encoder) -> float:
    """How much the encoder's own token lookup scales a table row, where ``embedding:NAME`` rows,
    spliced in after the lookup, are not scaled. Hosts differ for Gemma: 0.33's lookup is a
    ``ScaledEmbedding`` (rows times sqrt(width) = 48, learned rows not), while 0.3.64 scales every
    input row after the lookup, learned ones too (1.0 here). m* is the norm tokens have where the
    learned rows enter, so it is scaled by this. Measured on a few rows, not read off the version."""
    emb = encoder.transformer.get_input_embeddings()
    table = ops.read_weight(emb)
    ids = torch.nonzero(table[:256].float().norm(dim=-1) > 0).flatten()[:16]
    if ids.numel() == 0:
        return 1.0
    with torch.no_grad():
        try:  # (fp32 out: the scale itself, not the fp16 rounding of the scaled rows)
            out = emb(ids.to(table.device), out_dtype=torch.float32)
        except TypeError:
            out = emb(ids.to(table.device))
    ratio = out.float().norm(dim=-1) / table[ids].float().norm(dim=-1)
    scale = float(ratio.median())
    return 1.0 if abs(scale - 1.0) < 1e-3 else scale


def initializer_ids(tokenizer, words: str) -> list[int]:
    """Token ids of ``words`` as this tokenizer splits them, without start/end tokens."""
    ids = tokenizer.tokenizer(words)["input_ids"]
    end = -1 if getattr(tokenizer, "tokenizer_adds_end_token", True) else None
    return list(ids[tokenizer.tokens_start : end])


def initial_vectors(clip, words: str, count: int, magnitude, keys=None) -> tuple[dict, dict, dict]:
    """``(init, mu, m_star)`` per encoder (all of the CLIP's, or ``keys``).

    By default one vector per initializer token of that encoder's tokenizer (CLIP and
    T5 may split a word differently), each starting at (and pulled toward) its
    token's direction. With an explicit ``count`` that differs, every vector starts
    at the mean direction of the initializer tokens.
    """
    if not words.strip():
        raise ValueError("initializer word is empty: give a word that describes the concept, e.g. 'dog'")
    init, mu, m_star = {}, {}, {}
    for key, (_, tok, encoder) in text_encoders(clip).items():
        if keys is not None and key not in keys:
            continue
        vocab = vocabulary(encoder)
        rows = normalize(_token_rows(tok, vocab, words))
        n = count if count > 0 else rows.shape[0]
        if n != rows.shape[0]:
            rows = normalize(rows.mean(dim=0, keepdim=True)).expand(n, -1).clone()
        init[key], mu[key] = rows, rows.clone()
        with torch.inference_mode(False):
            # row norms block by block, no float copy of the whole table (Gemma-2's is 256000 x 2304)
            m_star[key] = target_norm(vocab.detach(), magnitude)
        if isinstance(magnitude, str):  # (a number the user gave is taken as it is)
            m_star[key] *= lookup_scale(encoder)
    return init, mu, m_star


def initializer_rows(clip, words: str, count: int, keys) -> dict[str, torch.Tensor]:
    """``{key: (n, width)}``: the initializer's token rows as the encoder sees them where learned rows
    enter (times ``lookup_scale``), one per token, or their mean repeated ``count`` times: where the
    plain-TI baseline starts, its own norms included."""
    out = {}
    for key, (_, tok, encoder) in text_encoders(clip).items():
        if key not in keys:
            continue
        rows = _token_rows(tok, vocabulary(encoder), words) * lookup_scale(encoder)
        n = count if count > 0 else rows.shape[0]
        out[key] = rows.mean(dim=0, keepdim=True).expand(n, -1).clone() if n != rows.shape[0] else rows
    return out


def _token_rows(tok, vocab: torch.Tensor, words: str) -> torch.Tensor:
    """The table rows (float32, CPU, as stored) of ``words``' tokens as ``tok`` splits them."""
    ids = initializer_ids(tok, words)
    if not ids:
        raise ValueError(f"initializer {words!r} produced no tokens")
    with torch.inference_mode(False):
        return vocab[ids].detach().float().cpu().clone()


def _marker(n: int, width: int) -> torch.Tensor:
    marker = torch.zeros(n, width)
    marker[:, 0], marker[:, 2] = _MARK_A, _MARK_B
    marker[:, 1] = torch.arange(n, dtype=torch.float32)
    return marker


@contextlib.contextmanager
def placeholder_tokenizers(clip, num_vectors):
    """While active, ``embedding:PLACEHOLDER_NAME`` tokenizes to marker rows: ``num_vectors`` of
    them (an int for every encoder, or ``{embedding_key: count}``).

    The rows are a real embedding file in a temporary folder that each tokenizer reads beside its
    own embeddings folders, so the host's own ``embedding:NAME`` parsing places them (name splitting,
    trailing commas, weights) and no tokenizer method is replaced. The folder is removed on exit."""
    encoders = text_encoders(clip)
    rows = {}
    for key, (_, tok, _) in encoders.items():
        rows[key] = _marker(num_vectors if isinstance(num_vectors, int) else num_vectors[key], tok.embedding_size)
    import safetensors.torch

    saved = []
    with tempfile.TemporaryDirectory(prefix="dti-placeholder-") as folder:
        safetensors.torch.save_file(rows, os.path.join(folder, PLACEHOLDER_NAME + ".safetensors"))
        try:
            for _, tok, _ in encoders.values():
                own = tok.embedding_directory
                saved.append((tok, own))
                own = [own] if isinstance(own, str) else list(own or [])
                tok.embedding_directory = [folder] + own
            yield
        finally:
            for tok, own in saved:
                tok.embedding_directory = own


def _marker_row(t) -> int | None:
    if torch.is_tensor(t) and t.dim() == 1 and t.shape[0] > 2 and float(t[0]) == _MARK_A and float(t[2]) == _MARK_B:
        return int(t[1])
    return None


_CHECKED_TOKENIZERS: set[type] = set()


def check_placeholder_contract(clip) -> None:
    """Once per tokenizer class: ``embedding:NAME`` alone must tokenize to that file's rows, in order.
    The one behaviour of ComfyUI's tokenizers the training path relies on; a host that changed it
    gets a ``HostContractError`` naming it, before anything runs."""
    encoders = text_encoders(clip)
    todo = {key: v for key, v in encoders.items() if type(v[1]) not in _CHECKED_TOKENIZERS}
    if not todo:
        return
    with placeholder_tokenizers(clip, 2):
        tokens = clip.tokenize("embedding:" + PLACEHOLDER_NAME)
    for key, (tkey, tok, _) in todo.items():
        chunks = tokens.get(tkey)
        if not isinstance(chunks, list) or not chunks or not all(isinstance(e, tuple) for c in chunks for e in c):
            raise HostContractError(f"{type(tok).__name__} tokenization ({key})",
                                    "a list of chunks of (token, weight, ...) tuples", repr(type(chunks)))
        found = [r for c in chunks for e in c if (r := _marker_row(e[0])) is not None]
        if found != [0, 1]:
            raise HostContractError(f"{type(tok).__name__}: embedding:NAME in a prompt ({key})",
                                    "the rows of NAME.safetensors from the tokenizer's embeddings folders",
                                    f"{len(found)} of its 2 rows")
        _CHECKED_TOKENIZERS.add(type(tok))


class PromptTokens:
    """One tokenized training prompt with the positions of the learned vectors."""

    def __init__(self, tokens: dict, slots: dict[str, list[tuple[int, int, int]]]):
        self.tokens = tokens  # as clip.tokenize returns it
        self.slots = slots  # token dict key -> [(chunk, position, vector row)]

    def with_vectors(self, embeds_by_token_key: dict[str, torch.Tensor]) -> dict:
        out = {k: [list(chunk) for chunk in chunks] for k, chunks in self.tokens.items()}
        for k, slots in self.slots.items():
            for c, j, row in slots:
                entry = out[k][c][j]
                out[k][c][j] = (embeds_by_token_key[k][row],) + tuple(entry[1:])
        return out


def _with_placeholder(template: str) -> str:
    """The template with ``{}`` as ``embedding:PLACEHOLDER_NAME``. Text glued to the word ("{}'s",
    "{}[1]") is set apart by a space: hosts differ in where a name ends (0.33 cuts it at ``<``/``[``,
    0.3.64 only at spaces and trailing commas), and a name with text glued on is no file on either."""
    return re.sub(r"\{\}(?=[^\s,])", "{} ", template).replace("{}", "embedding:" + PLACEHOLDER_NAME)


def tokenize_templates(clip, templates: list[str], num_vectors) -> list[PromptTokens]:
    """Each template with ``{}`` replaced by the learned word, tokenized by the CLIP's own tokenizers.

    ``num_vectors``: an int for every encoder, or ``{embedding_key: count}``."""
    encoders = text_encoders(clip)
    for key, (_, tok, _) in encoders.items():
        if tok.embedding_directory is None:
            # ComfyUI's tokenizer then ignores every "embedding:" word, in training and in prompts.
            raise ValueError(
                f"this CLIP's {key} tokenizer has no embeddings folder, so embedding:NAME cannot work with it. "
                f"Load the model with CheckpointLoaderSimple or CLIPLoader, which set the embeddings folders, "
                f"or pass the CLIP through DTI Enable Embeddings."
            )
    check_placeholder_contract(clip)
    result = []
    with placeholder_tokenizers(clip, num_vectors):
        for template in templates:
            text = _with_placeholder(template)
            tokens = clip.tokenize(text)
            slots = {}
            for tkey, chunks in tokens.items():
                found = [(c, j, _marker_row(e[0])) for c, chunk in enumerate(chunks) for j, e in enumerate(chunk)]
                slots[tkey] = [s for s in found if s[2] is not None]
            for key, (tkey, _, _) in encoders.items():
                n = num_vectors if isinstance(num_vectors, int) else num_vectors[key]
                if sorted(r for _, _, r in slots.get(tkey, [])) != list(range(n)):
                    raise ValueError(f"template {template!r}: the learned word did not tokenize into the {key} prompt")
            result.append(PromptTokens(tokens, slots))
    return result


def encode_tokens(clip, tokens):
    """``(cond, pooled)`` of a token dict through ``encode_token_weights``, as CLIPTextEncode gets them.

    Does what ``CLIP.encode_from_tokens`` does around the encode (clip skip; on hosts that have
    one, the execution device and its CUDA device context), without re-loading the models each
    step; tensor tokens keep their gradients.
    """
    cm = clip.cond_stage_model
    cm.reset_clip_options()
    if clip.layer_idx is not None:
        cm.set_clip_options({"layer": clip.layer_idx})
    device = clip.patcher.load_device
    # (0.3.64's encoders ignore the option and have no device context: both are no-ops there)
    cm.set_clip_options({"execution_device": device})
    with memory.device_context(device):
        cond, pooled = cm.encode_token_weights(tokens)[:2]
    return cond, pooled


def encode_token_batch(clip, token_dicts: list[dict], want_pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode several one-chunk prompts in one text-encoder pass: ``(B, L, width)`` and pooled ``(B, ...)``.

    The prompts go through ``encode_token_weights`` as the chunks of one long prompt: ComfyUI
    encodes chunks as independent rows of one batch and concatenates them, so row k equals a
    separate encode of prompt k -- for CLIP-style wrappers. The wrapper keeps only the first
    chunk's pooled output, so the pooled rows are read from the encoder's own forward. Prompts of
    several chunks fall back to one call each. Whether this trick is exact for a given CLIP is
    checked once per run by ``TextPath``.
    """
    if any(len(chunks) != 1 for td in token_dicts for chunks in td.values()):
        return encode_each(clip, token_dicts, want_pooled)
    merged = {k: [td[k][0] for td in token_dicts] for k in token_dicts[0]}
    captured: dict[str, list] = {}
    hooks = [
        encoder.register_forward_hook(lambda mod, args, out, _k=key: captured.setdefault(_k, []).append(out))
        for key, (_, _, encoder) in text_encoders(clip).items()
    ]
    try:
        cond, first_pooled = encode_tokens(clip, merged)
    finally:
        for h in hooks:
            h.remove()
    b = len(token_dicts)
    cond = cond.reshape(b, -1, cond.shape[-1])
    if first_pooled is None or not want_pooled:
        return cond, None
    if b == 1:
        return cond, first_pooled  # one prompt: the wrapper's own pooled output is its row
    for outs in captured.values():
        rows = outs[0][1] if isinstance(outs[0], tuple) and len(outs[0]) > 1 else None
        if rows is not None and rows.shape[-1] == first_pooled.shape[-1] and torch.allclose(
                rows[0:1].to(first_pooled.device, first_pooled.dtype), first_pooled, rtol=0, atol=0, equal_nan=True):
            # The encoder's own rows sit on its execution device (the GPU); ComfyUI hands its pooled
            # output on the intermediate device (the CPU unless --gpu-only): follow ComfyUI, as a
            # differentiable copy, so the batched and per-prompt paths agree on devices.
            return cond, rows[:b].to(first_pooled.device)
    raise RuntimeError("could not find the pooled output of the batched prompts")


def encode_each(clip, token_dicts: list[dict], want_pooled: bool = True):
    """One ``encode_token_weights`` call per prompt: a list of ``(1, L_k, width)`` conds (lengths
    may differ, e.g. T5 without padding) and the pooled rows ``(B, ...)`` or None."""
    outs = [encode_tokens(clip, td) for td in token_dicts]
    pooled = [p for _, p in outs]
    conds = [c for c, _ in outs]
    return conds, (torch.cat(pooled) if want_pooled and pooled[0] is not None else None)


class TextPath:
    """Encodes a step's prompts the way CLIPTextEncode would, batched where that is exact.

    A step's prompts are batched only among prompts of one token shape: tokenizers that do not
    pad (Gemma-2, T5 without min_length) give prompts of different lengths, which no one encoder
    pass can hold, so each shape is its own pass. At the start of a run, two different training
    prompts of one shape (the first prompt twice where no two share one) are encoded both ways (no
    gradient): if the one-pass batch equals one encode per prompt to the precision of the encoder's
    dtype, the batched passes are used; otherwise (wrappers that join encoders along the sequence or
    whose pooled vector no single encoder gives, like SD3's) one encode per prompt. A run whose steps
    hold one prompt each (``batch_size`` 1) has nothing to batch and skips the probe: four encodes
    saved, a minute on the CPU through a full-depth T5-XXL.
    """

    def __init__(self, clip, prompts: list[PromptTokens], embeds_by_token_key: dict, want_pooled: bool,
                 batch_size: int = 2):
        self.clip, self.want_pooled = clip, want_pooled
        self.batched = False
        # The dtypes the encoders compute in, seen in the probe or else in the first step's encode (read
        # after it, step.py): ComfyUI may store fp16 weights and compute in fp32 (the CPU) or in fp16
        # (NVIDIA), which decides the loss scaling.
        self.compute_dtypes: set[torch.dtype] = set()
        self._watch_first_call = batch_size < 2
        if self._watch_first_call:
            return
        probe = [p.with_vectors(embeds_by_token_key) for p in _probe_pair(prompts)]
        with self._watching_dtypes(), torch.no_grad():
            conds, ref_pooled = encode_each(clip, probe, want_pooled)
            try:
                cond, pooled = encode_token_batch(clip, probe, want_pooled)
            except (RuntimeError, ValueError):
                return
        if torch.is_tensor(cond) and all(c.shape[1:] == cond.shape[1:] for c in conds):
            ref = torch.cat(conds)
            # Rows of one batch and single rows may round differently (other GEMM blocking): seen 8.2
            # ulps of the largest value in fp32 through 0.33's Gemma-2 on the CPU (2026-12-05), so 64;
            # rows that were mixed differ by the values' own size, millions of ulps in fp32.
            tol = BATCH_ULPS * torch.finfo(ref.dtype).eps * float(ref.abs().max()) if ref.is_floating_point() else 0.0
            # (compared on one device: a host that hands the two paths' outputs on different devices
            # must not turn this check into a device error)
            same = torch.allclose(cond.float().to(ref.device), ref.float(), rtol=0, atol=tol)
            if same and ref_pooled is not None:
                same = pooled is not None and torch.allclose(
                    pooled.float().to(ref_pooled.device), ref_pooled.float(), rtol=0,
                    atol=BATCH_ULPS * torch.finfo(ref_pooled.dtype).eps * float(ref_pooled.abs().max()))
            self.batched = bool(same)

    @contextlib.contextmanager
    def _watching_dtypes(self):
        """Forward hooks on each encoder for the block: the dtypes of what they return."""
        def saw(module, args, out):
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            if torch.is_tensor(first) and first.is_floating_point():
                self.compute_dtypes.add(first.dtype)

        hooks = [getattr(enc, "transformer", enc).register_forward_hook(saw)
                 for _, _, enc in text_encoders(self.clip).values()]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def __call__(self, token_dicts: list[dict]):
        """``(conds, pooled)``: conds a ``(B, L, width)`` tensor, or a list of ``(1, L_k, width)``."""
        if self._watch_first_call:
            self._watch_first_call = False
            with self._watching_dtypes():
                return self._encode(token_dicts)
        return self._encode(token_dicts)

    def _encode(self, token_dicts: list[dict]):
        if not self.batched:
            return encode_each(self.clip, token_dicts, self.want_pooled)
        groups: dict[tuple, list[int]] = {}
        for i, td in enumerate(token_dicts):
            groups.setdefault(_token_shape(td), []).append(i)
        if len(groups) == 1:
            return encode_token_batch(self.clip, token_dicts, self.want_pooled)
        conds, pooled = [None] * len(token_dicts), [None] * len(token_dicts)
        for rows in groups.values():
            cond, rows_pooled = encode_token_batch(self.clip, [token_dicts[i] for i in rows], self.want_pooled)
            for k, i in enumerate(rows):
                conds[i] = cond[k:k + 1] if torch.is_tensor(cond) else cond[k]
                pooled[i] = None if rows_pooled is None else rows_pooled[k:k + 1]
        return conds, (torch.cat(pooled) if pooled[0] is not None else None)


def _token_shape(tokens: dict) -> tuple:
    """The chunk lengths of a token dict per encoder: prompts of one shape can share an encoder pass."""
    return tuple((key, tuple(len(chunk) for chunk in chunks)) for key, chunks in sorted(tokens.items()))


def _probe_pair(prompts: list[PromptTokens]) -> tuple[PromptTokens, PromptTokens]:
    """The first two different prompts of one token shape (what a batched pass will hold), or the first
    prompt twice: its batch still shows a wrapper whose batched output is not per-prompt (SD3's pooled)."""
    seen: dict[tuple, PromptTokens] = {}
    for p in prompts:
        shape = _token_shape(p.tokens)
        if shape in seen:
            return seen[shape], p
        seen[shape] = p
    return prompts[0], prompts[0]


def encode_conditioning(clip, tokens, guidance=None):
    """CONDITIONING of a token dict by CLIPTextEncode's own call: every extra the encoder returns
    (pooled output, Lumina 2's attention mask, ...) stays; FluxGuidance's key on top."""
    return clip.encode_from_tokens_scheduled(tokens, add_dict={} if guidance is None else {"guidance": float(guidance)},
                                             show_pbar=False)


# Outer tokenizers whose own code reads every token as an int id after the inner tokenizer ran, so a
# tensor token (embedding:NAME) raises there: QwenImageTokenizer looks for its image-token id
# (``r[i][0] == 151655``: "Boolean value of Tensor ... is ambiguous"), on 0.3.64 and 0.33.0 alike.
# tests/host/test_qwen_image.py pins that host failure: drop the class here the day it fails.
INT_TOKENS_ONLY = ("QwenImageTokenizer",)
# A learned word glued to the text after it ("embedding:NAME<|im_end|>", as a chat template puts a
# prompt's last word): 0.33 ends a name at "<", 0.3.64 only at a space, so a space is put between.
# 0.33 splits the rest at whitespace either way: its tokens are the same with the space or without.
_GLUED = re.compile(r"(embedding:[^\s<]+)(?=<)")


def _keeps_newline_before_a_word(inner) -> bool:
    """Whether the inner tokenizer keeps a newline that comes right before ``embedding:NAME`` (0.33
    does; 0.3.64 splits the prompt at "\\nembedding:" and drops the newline). Probed on a copy without
    an embeddings folder: the split happens all the same, and nothing is looked up."""
    probe = copy.copy(inner)
    probe.embedding_directory = None
    end = -1 if getattr(inner, "tokenizer_adds_end_token", True) else None
    ref = list(inner.tokenizer("a\n")["input_ids"][inner.tokens_start:end])
    ids = [e[0] for chunk in probe.tokenize_with_weights("a\nembedding:x") for e in chunk]
    start = 1 if getattr(inner, "start_token", None) is not None else 0
    return ids[start:start + len(ref)] == ref


def _tensor_tokens_as_ints(outer, attr: str) -> None:
    """On this (copied) outer tokenizer: its inner tokenizer ``attr`` hands tensor tokens to the outer
    code as negative stand-in ids (no real id is negative), and the outer call puts the tensors back.
    Both are the host's public ``tokenize_with_weights``, wrapped on the instance; the class and the
    input CLIP's tokenizer are untouched, and none of the host's template logic is re-implemented."""
    inner = getattr(outer, attr)
    inner_call, outer_call = inner.tokenize_with_weights, outer.tokenize_with_weights
    held: list[torch.Tensor] = []
    # Where the host drops the newline before a word that opens the user's prompt ("user\\n" + word),
    # its encoder then reads the learned row where it looks for that newline token (Qwen-Image's
    # template cut, ``tok_pairs[template_end + 2][0] == 198``) and raises: a space keeps the newline
    # in the text before, as 0.33 tokenizes it.
    keep_newline = not _keeps_newline_before_a_word(inner)

    def inner_tokenize(text, *args, **kwargs):
        text = _GLUED.sub(r"\1 ", text)
        if keep_newline:
            text = text.replace("\nembedding:", "\n embedding:")
        chunks = inner_call(text, *args, **kwargs)
        for chunk in chunks:
            for i, entry in enumerate(chunk):
                if torch.is_tensor(entry[0]):
                    held.append(entry[0])
                    chunk[i] = (-len(held),) + tuple(entry[1:])
        return chunks

    def outer_tokenize(text, *args, **kwargs):
        held.clear()
        tokens = outer_call(text, *args, **kwargs)
        for chunks in tokens.values():
            for chunk in chunks:
                for i, entry in enumerate(chunk):
                    if isinstance(entry[0], int) and entry[0] < 0:
                        chunk[i] = (held[-entry[0] - 1],) + tuple(entry[1:])
        return tokens

    inner.tokenize_with_weights = inner_tokenize
    outer.tokenize_with_weights = outer_tokenize


def with_embeddings_folder(clip, folders: list[str]):
    """``(clip', enabled keys)``: a clone whose tokenizers without an embeddings folder get ``folders``.

    ``CLIP.clone()`` shares its tokenizer object, so the outer tokenizer and each changed inner one
    are copied; the input CLIP keeps its own (unchanged) tokenizers.
    """
    enabled, changes = [], {}
    for attr, inner in vars(clip.tokenizer).items():
        if hasattr(inner, "embedding_identifier") and getattr(inner, "embedding_directory", "") is None:
            new = copy.copy(inner)
            new.embedding_directory = list(folders)
            changes[attr] = new
            enabled.append(getattr(inner, "embedding_key", attr))
    if not changes:
        return clip, []
    out = clip.clone()
    out.tokenizer = copy.copy(clip.tokenizer)
    for attr, new in changes.items():
        setattr(out.tokenizer, attr, new)
        if type(clip.tokenizer).__name__ in INT_TOKENS_ONLY:
            _tensor_tokens_as_ints(out.tokenizer, attr)
    return out, enabled
