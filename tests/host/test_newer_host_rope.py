"""The newer hosts' text-encoder RoPE (ComfyUI about 0.36 to 0.38.1), emulated on 0.33.0
(``newer_host.py``): Gemma-2 and Qwen's ``apply_rope`` call comfy-kitchen's ``apply_rope_split_half``,
which has no backward. DTI Train trains through it with the torch-RoPE gradient (``comfy_host/kernels.py``
gives the op a backward for the run), and an op that nothing can differentiate is one clear error.
CI also runs this file with comfy-kitchen 0.2.36, the version the newer hosts pin (``.ci/run``)."""

import importlib.metadata

import pytest
import torch

import tests_host_newer_host as newer
from dti_core.embedding_file import load_embedding
from tests_host_helpers import encoder_grad_and_saved_bytes, run_train

# family -> (loader in checkpoints.py, encoder key, ComfyUI's supported_models class)
FAMILIES = {"lumina2": ("load_lumina2", "gemma2_2b", "Lumina2"), "z_image": ("load_zimage", "qwen3_4b", "ZImage"),
            "flux2_klein": ("load_flux2_klein", "qwen3_4b", "Flux2"),
            "qwen_image": ("load_qwen_image", "qwen25_7b", "QwenImage")}


def _host_has_033_rope():
    import comfy.text_encoders.llama as llama

    freqs = llama.precompute_freqs_cis(8, torch.arange(3).unsqueeze(0), 10000.0)
    return isinstance(freqs, tuple) and len(freqs) == 3


@pytest.fixture(params=sorted(FAMILIES))
def family(request, comfy, checkpoints, checkpoint_cache_dir, embeddings_dir):
    import comfy.supported_models as sm

    loader, key, cls = FAMILIES[request.param]
    if not hasattr(sm, cls):
        pytest.skip(f"HOST TESTS SKIPPED: this ComfyUI has no {cls}")
    if not _host_has_033_rope():
        pytest.skip("the emulation replaces 0.33's llama.apply_rope (cos, sin, -sin tables); this host's differs")
    loaded = getattr(checkpoints, loader)(checkpoint_cache_dir,
                                          embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"))
    return request.param, key, loaded.out


def test_kitchen_rope_emulation_is_the_newer_hosts_op_without_a_backward(comfy, monkeypatch):
    import comfy.text_encoders.llama as llama

    if not _host_has_033_rope():
        pytest.skip("the emulation replaces 0.33's llama.apply_rope (cos, sin, -sin tables); this host's differs")

    freqs = llama.precompute_freqs_cis(16, torch.arange(5).unsqueeze(0), 10000.0)
    x = torch.randn(1, 2, 5, 16, requires_grad=True)
    ref = llama.apply_rope(x, x, freqs)
    with newer.kitchen_rope(monkeypatch) as apply_rope:
        got = apply_rope(x, x, freqs)
        assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(got, ref))
        with pytest.raises(RuntimeError, match="no autograd formula"):
            (got[0].sum() + got[1].sum()).backward()
    print("comfy-kitchen", importlib.metadata.version("comfy-kitchen"))


def _split_half_formula(xq, xk, freqs):
    """comfy-kitchen's documented split-half formula in plain torch (autograd differentiates it)."""
    def one(t):
        t_ = t.reshape(*t.shape[:-1], 2, -1).movedim(-2, -1).unsqueeze(-2).to(freqs.dtype)
        out = freqs[..., 0] * t_[..., 0] + freqs[..., 1] * t_[..., 1]
        return out.movedim(-1, -2).reshape(*t.shape).type_as(t)
    return one(xq), one(xk)


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_llm_encoders_train_through_the_kitchen_rope_with_the_torch_rope_gradient(family, dti_pack, monkeypatch):
    """The learned rows' gradient through the kitchen op (given a backward for the run) equals autograd's
    through the same formula in torch and through 0.33's torch RoPE, to the encoder's own sensitivity
    to fp32 rounding: 1e-3 relative, except the thin Qwen2.5, which amplifies rounding (its gradient's
    cosine to itself after a 1e-6 relative change of the rows is 0.9991; the torch formula vs 0.33's
    code, both differentiated by autograd: 0.9986), where the cosine must be at least 0.998."""
    name, key, (model, clip, vae) = family
    ct = dti_pack.comfy_host
    with torch.inference_mode():
        # (through DTI Enable Embeddings: Gemma's and Qwen-Image's tokenizers have no embeddings folder)
        (clip,) = dti_pack.nodes.embedding_nodes.DTIEnableEmbeddings().enable(clip)["result"]
        init, _, m_star = ct.text.initial_vectors(clip, "dog", 0, "mean", keys=[key])
        (prompt,) = ct.text.tokenize_templates(clip, ["a photo of a {}"], init[key].shape[0])
    tkey = ct.text.text_encoders(clip)[key][0]
    vectors = {tkey: m_star[key] * init[key]}
    ref = encoder_grad_and_saved_bytes(ct, model, clip, prompt, vectors, False)[0][tkey]
    with newer.kitchen_rope(monkeypatch, _split_half_formula):
        formula = encoder_grad_and_saved_bytes(ct, model, clip, prompt, vectors, False)[0][tkey]
    with newer.kitchen_rope(monkeypatch):
        got = [encoder_grad_and_saved_bytes(ct, model, clip, prompt, vectors, False)[0][tkey]]
        if name == "lumina2":  # and with the layers recomputed in backward (gradient checkpointing), once
            got.append(encoder_grad_and_saved_bytes(ct, model, clip, prompt, vectors, True)[0][tkey])
    assert torch.isfinite(got[0]).all() and got[0].abs().sum() > 0
    for g in got:
        for want in (formula, ref):
            if name == "qwen_image":
                assert _cos(g, want) >= 0.998
            else:
                assert torch.allclose(g, want, rtol=1e-3, atol=1e-4 * float(want.abs().max())), \
                    f"{name}: {float((g - want).abs().max())}"


# (not klein: its node run takes 85 s here and adds nothing the gradient test and Z-Image's run, the same
# Qwen3, do not)
@pytest.mark.parametrize("family", ["lumina2", "qwen_image", "z_image"], indirect=True)
def test_dti_train_writes_its_file_at_m_star_on_the_newer_hosts_rope(family, dti_pack, embeddings_dir, monkeypatch):
    name, key, loaded = family
    with newer.kitchen_rope(monkeypatch):
        out = run_train(dti_pack, loaded, name=f"kitchen-{name}", initializer="dog", steps=1, batch_size=1,
                        resolution=64, kappa=5e-5, templates="custom", custom_templates="a photo of a {}")
    assert out["ui"]["text"][0].startswith(f"Saved embedding:kitchen-{name}")
    emb = load_embedding(str(embeddings_dir / f"kitchen-{name}.safetensors"))
    v = emb.vectors[key]
    assert torch.isfinite(v).all()
    assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), emb.m_star(key)), rtol=0, atol=1e-5)


def test_a_host_op_without_any_backward_is_one_clear_error_before_anything_is_written(comfy, checkpoints,
                                                                                     checkpoint_cache_dir,
                                                                                     embeddings_dir, dti_pack,
                                                                                     monkeypatch):
    """An op no stand-in knows (a later host kernel): the first run's check names the op, the encoder
    and the ComfyUI version; nothing is trained or written; the host's functions are as before."""
    if not _host_has_033_rope():
        pytest.skip("the emulation replaces 0.33's llama.apply_rope (cos, sin, -sin tables); this host's differs")
    import comfy.text_encoders.llama as llama

    ct = dti_pack.comfy_host
    loaded = checkpoints.load_lumina2(checkpoint_cache_dir,
                                      embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"))
    before = sorted(p.name for p in embeddings_dir.iterdir())
    op = newer.no_backward_rope_op()
    with newer.kitchen_rope(monkeypatch, op) as apply_rope:
        with pytest.raises(ct.contracts.HostContractError) as info:
            run_train(dti_pack, loaded.out, name="no-backward", initializer="dog", steps=2, batch_size=1,
                      resolution=64, templates="custom", custom_templates="a photo of a {}")
        assert llama.apply_rope is apply_rope  # the run put nothing of its own in the host's place
    message = str(info.value)
    assert "dti_test.rope_without_backward" in message and "gemma2_2b text encoder" in message
    assert f"ComfyUI {ct.contracts.comfyui_version()}" in message and "Nothing was trained or written" in message
    assert "Traceback" not in message
    assert sorted(p.name for p in embeddings_dir.iterdir()) == before
    assert torch.overrides._get_current_function_mode_stack() == []
    # sampling after the failed run uses the host's own kernels: a stock encode runs under inference
    model, clip, _ = loaded.out
    with torch.inference_mode():
        cond = clip.encode_from_tokens(clip.tokenize("a photo of a dog"))
    assert torch.isfinite(cond).all()
