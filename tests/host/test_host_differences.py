"""Where the tested ComfyUI releases (0.3.64, 0.33.0) differ, the host layer detects the capability, not
the version. One test per difference, named after it. Each runs on whichever ComfyUI COMFYUI_PATH is,
checks that the layer took that host's route, and that the route gives the right result; the suite
runs on both hosts, so both routes are exercised.

What only a GPU shows (a dynamic-VRAM patcher: 0.33 builds one only for a CUDA load device) is in
bench/gpu_check.sh.
"""

import contextlib
import copy
import inspect

import pytest
import torch

from tests_host_helpers import run_train


def _has(module, name):
    return getattr(module, name, None) is not None


def test_ops_cast_uncast_pair_0_33_or_cast_only_0_3_64(comfy, dti_pack):
    """0.33's cast_bias_weight(..., offloadable) returns (weight, bias, stream) and is paired with
    uncast_bias_weight; 0.3.64's returns (weight, bias). Either way, the weight read is the one the
    layer's own forward uses."""
    import comfy.ops

    ops = dti_pack.comfy_host.ops
    pair = _has(comfy.ops, "uncast_bias_weight") and "offloadable" in inspect.signature(
        comfy.ops.cast_bias_weight).parameters
    assert ops.HAS_UNCAST == pair

    g = torch.Generator().manual_seed(0)
    layer = comfy.ops.manual_cast.Linear(4, 3, dtype=torch.float16)
    layer.weight = torch.nn.Parameter(torch.randn(3, 4, generator=g).half(), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(3, generator=g).half(), requires_grad=False)
    x = torch.randn(2, 4, generator=g)
    with ops.cast_weights(layer, x) as (weight, bias):
        assert weight.dtype == torch.float32 and torch.equal(weight, layer.weight.float())
        got = torch.nn.functional.linear(x, weight, bias)
    with torch.no_grad():
        assert torch.allclose(got, layer(x), atol=1e-6)


def test_quantized_tensor_weights_are_read_dequantized_where_the_host_has_them(comfy, dti_pack):
    """0.33 carries fp8/quantized checkpoints as comfy.quant_ops.QuantizedTensor (comfy-kitchen);
    0.3.64 has no quant_ops. A quantized token table is read as plain numbers through the host's cast."""
    import comfy.ops

    ops = dti_pack.comfy_host.ops
    try:
        import comfy.quant_ops as quant_ops
    except ImportError:
        quant_ops = None
    qt_type = getattr(quant_ops, "QuantizedTensor", None)
    assert ops._quantized_type() is qt_type
    plain = torch.randn(8, 4)
    assert not ops.is_quantized(plain)
    if qt_type is None:
        return  # 0.3.64: nothing quantized can reach the layer; plain weights are covered above
    qt = qt_type.from_float(plain, "TensorCoreFP8E4M3Layout")
    assert ops.is_quantized(qt)
    table = comfy.ops.manual_cast.Embedding(8, 4)
    table.weight = torch.nn.Parameter(qt, requires_grad=False)
    got = ops.read_weight(table)
    assert not ops.is_quantized(got) and type(got) is torch.Tensor
    assert torch.equal(got.float(), qt.dequantize().float())
    # (fp8 keeps ~2 significant digits: the dequantized table is near the original)
    assert torch.allclose(got.float(), plain, rtol=0.07, atol=1e-2)


def test_text_encoders_run_on_the_execution_device_where_the_host_has_that_option(comfy, dti_pack, sd15_loaded):
    """0.33's CLIP.encode_from_tokens sets ``execution_device`` on the encoders and enters
    ``cuda_device_context``; 0.3.64 has neither. The training encode does the same as the host's own."""
    import comfy.model_management as mm

    text, memory = dti_pack.comfy_host.text, dti_pack.comfy_host.memory
    _, clip, _ = sd15_loaded
    encoder = clip.cond_stage_model.clip_l
    has_option = hasattr(encoder, "execution_device")
    ctx = memory.device_context(torch.device("cpu"))
    assert isinstance(ctx, contextlib.nullcontext) == (not _has(mm, "cuda_device_context"))
    with ctx:
        pass  # the host's context is a no-op for a CPU device, and usable on either host
    tokens = clip.tokenize("a photo of a dog")
    with torch.inference_mode():
        ours, ours_pooled = text.encode_tokens(clip, tokens)
        host, host_pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    if has_option:
        assert encoder.execution_device == clip.patcher.load_device
    assert torch.equal(ours, host) and torch.equal(ours_pooled, host_pooled)


def test_dynamic_vram_patchers_are_swapped_for_classic_ones_and_classic_ones_kept(comfy, dti_pack, fresh_sd15):
    """0.33's ModelPatcher has ``is_dynamic()`` and ``clone(disable_dynamic=...)`` (dynamic VRAM, on by
    default on NVIDIA); 0.3.64's has neither. A classic patcher, which is what both hosts build on the
    CPU, is trained as it is: no copy, no reload."""
    import comfy.model_patcher

    memory = dti_pack.comfy_host.memory
    model, clip, _ = fresh_sd15
    has_dynamic = hasattr(comfy.model_patcher.ModelPatcher, "is_dynamic")
    assert ("disable_dynamic" in inspect.signature(comfy.model_patcher.ModelPatcher.clone).parameters) == has_dynamic
    assert memory._is_dynamic(model) is False and memory._is_dynamic(clip.patcher) is False
    got_model, got_clip = memory.trainable(model, clip)
    assert got_model is model and got_clip is clip


def test_out_of_memory_is_recognised_by_the_hosts_is_oom_where_it_has_one(comfy, dti_pack):
    """0.33's model_management.is_oom also knows the accelerator's own OOM errors; 0.3.64 has only
    OOM_EXCEPTION. Either way an OOM is one and another error is not."""
    import comfy.model_management as mm

    memory = dti_pack.comfy_host.memory
    oom, other = torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("shape mismatch")
    assert memory.is_oom(oom) and not memory.is_oom(other)
    if _has(mm, "is_oom"):
        for e in (oom, other, ValueError("x")):
            assert memory.is_oom(e) == bool(mm.is_oom(e))
    assert memory.is_oom(memory.oom_error("no room"))


def test_text_glued_to_the_word_tokenizes_on_both_name_rules(comfy, dti_pack, fresh_sd15):
    """Hosts differ in where ``embedding:NAME`` ends: 0.33's ``_try_get_embedding`` returns (embed, name,
    leftover) and cuts the name at ``<`` or ``[``; 0.3.64's cuts only at spaces (and a trailing comma).
    The old pack replaced that private method and broke every run on 0.33. The training placeholder is
    now a real file read by the host's own parsing, and text glued to the word in a template or caption
    is set apart, so the word's rows are found on either rule and the rest is tokenized as text."""
    text = dti_pack.comfy_host.text
    _, clip, _ = fresh_sd15
    templates = ["a photo of {}[1]", "{}'s toy", "a {}, in the style of x", "{}<x>", "a photo of {}"]
    prompts = text.tokenize_templates(clip, templates, 2)
    tok = clip.tokenizer.clip_l
    for template, p in zip(templates, prompts):
        assert sorted(r for _, _, r in p.slots["l"]) == [0, 1], template
        words = [e[0] for e in p.tokens["l"][0] if not torch.is_tensor(e[0]) and e[0] not in (tok.start_token,
                                                                                             tok.end_token)]
        plain = tok.tokenizer(template.replace("{}", " "))["input_ids"][1:-1]
        assert words == plain, template  # everything but the word, as plain text
class _ChangedTokenizerHost:
    """A CLIP whose CLIP-L tokenizer is a subclass of the host's own, changed the way a future ComfyUI
    could change it: ``embedding:NAME`` no longer finds files beside the tokenizer's folders."""

    @staticmethod
    def clip(clip):
        new = clip.clone()
        new.tokenizer = copy.copy(clip.tokenizer)  # (CLIP.clone shares the tokenizer object)
        tok = new.tokenizer.clip_l
        base = type(tok)

        class IgnoresEmbeddingFolders(base):
            def _try_get_embedding(self, embedding_name):
                out = super()._try_get_embedding(embedding_name)
                return (None,) + tuple(out[1:]) if isinstance(out, tuple) else None

        changed = object.__new__(IgnoresEmbeddingFolders)
        changed.__dict__.update(tok.__dict__)
        new.tokenizer.clip_l = changed
        return new


def test_a_host_whose_tokenizer_contract_differs_gets_one_clear_error_and_no_file(comfy, dti_pack, fresh_sd15,
                                                                                 embeddings_dir):
    contracts = dti_pack.comfy_host.contracts
    model, clip, vae = fresh_sd15
    changed = _ChangedTokenizerHost.clip(clip)
    before = sorted(p.name for p in embeddings_dir.rglob("*"))
    with pytest.raises(contracts.HostContractError) as err:
        run_train(dti_pack, (model, changed, vae), name="contract_probe", steps=1, batch_size=1)
    msg = str(err.value)
    assert "IgnoresEmbeddingFolders" in msg and "embedding:NAME" in msg
    assert f"ComfyUI {contracts.comfyui_version()}" in msg and "0.3.64 and 0.33.0" in msg
    assert "Nothing was trained or written" in msg
    assert contracts.comfyui_version() != "unknown"
    assert sorted(p.name for p in embeddings_dir.rglob("*")) == before
    # the host's own tokenizer class still passes, so a real run goes on working
    run_train(dti_pack, fresh_sd15, name="contract_probe_ok", steps=1, batch_size=1)
    assert (embeddings_dir / "contract_probe_ok.safetensors").is_file()


def test_a_good_first_step_is_the_backward_check_and_costs_no_extra_encode(comfy, dti_pack, fresh_sd15,
                                                                           embeddings_dir):
    """The first training step's own gradient shows the text encoder's backward works: a one-step run at
    batch 1 encodes once (the step), not once more for a separate check."""
    model, clip, vae = fresh_sd15
    (_, _, encoder), = dti_pack.comfy_host.text.text_encoders(clip).values()
    calls = []
    handle = encoder.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        run_train(dti_pack, fresh_sd15, name="one_encode", steps=1, batch_size=1)
    finally:
        handle.remove()
    assert (embeddings_dir / "one_encode.safetensors").is_file()
    assert len(calls) == 1, f"{len(calls)} CLIP-L forward passes for a one-step run at batch 1"


def test_an_encoder_that_cuts_the_gradient_is_one_clear_error_naming_it(comfy, dti_pack, fresh_sd15,
                                                                       embeddings_dir):
    """A host whose text encoder hands back its output cut from the graph: the first step's missing
    gradient runs the check, which names the encoder and the ComfyUI version; nothing is written."""
    contracts = dti_pack.comfy_host.contracts
    model, clip, vae = fresh_sd15
    (_, _, encoder), = dti_pack.comfy_host.text.text_encoders(clip).values()
    cut = lambda out: out.detach() if torch.is_tensor(out) else type(out)(cut(o) for o in out) \
        if isinstance(out, (tuple, list)) else out
    handle = encoder.register_forward_hook(lambda m, i, o: cut(o))
    before = sorted(p.name for p in embeddings_dir.rglob("*"))
    try:
        with pytest.raises(contracts.HostContractError) as err:
            run_train(dti_pack, fresh_sd15, name="cut_gradient", steps=2, batch_size=1)
    finally:
        handle.remove()
    msg = str(err.value)
    assert "clip_l text encoder" in msg and "no gradient" in msg, msg
    assert f"ComfyUI {contracts.comfyui_version()}" in msg and "Nothing was trained or written" in msg
    assert sorted(p.name for p in embeddings_dir.rglob("*")) == before
