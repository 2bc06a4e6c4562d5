"""Load, Slerp Concepts, the interpolation strip and Inspect on the real ComfyUI."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

# The pack raises its own copy of the core error classes (imported as a package), so match ValueError.
from dti_core.embedding_file import dti_metadata, load_embedding, save_embedding
from dti_core.sphere import angle, normalize

WIDTHS = {"sd15": {"clip_l": 768}, "sdxl": {"clip_l": 768, "clip_g": 1280}}


def m_star_of(clip, key):
    enc = getattr(clip.cond_stage_model, key)
    with torch.inference_mode(False):
        w = enc.transformer.get_input_embeddings().weight.detach().float().clone()
    n = w.norm(dim=-1)
    return float(n[n > 0].mean())


def make_dti(folder, name, clip, kind, seed, n=2):
    g = torch.Generator().manual_seed(seed)
    m = {k: m_star_of(clip, k) for k in WIDTHS[kind]}
    vectors = {k: m[k] * normalize(torch.randn(n, w, generator=g)) for k, w in WIDTHS[kind].items()}
    save_embedding(str(folder), name, vectors, dti_metadata(m_star=m, initializer="cat"))
    return vectors, m


def nodes_of(pack):
    return pack.nodes.embedding_nodes


def load(pack, filename, clip=None):
    with torch.inference_mode():
        return nodes_of(pack).DTILoadEmbedding().load(filename, clip)


def encode(comfy_nodes, clip, text):
    with torch.inference_mode():
        return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def test_load_lists_subfolders_and_reads_ours_and_foreign(dti_pack, sd15_loaded, embeddings_dir):
    _, clip, _ = sd15_loaded
    (embeddings_dir / "people").mkdir(exist_ok=True)
    make_dti(embeddings_dir, "people/anna", clip, "sd15", 1)
    torch.save({"string_to_param": {"*": torch.randn(3, 768)}, "name": "old"}, embeddings_dir / "a1111-style.pt")
    choices = nodes_of(dti_pack).DTILoadEmbedding.INPUT_TYPES()["required"]["embedding"][0]
    assert "people/anna.safetensors" in choices and "a1111-style.pt" in choices
    text, emb = load(dti_pack, "people/anna.safetensors", clip)
    assert text == "embedding:people/anna" and emb.is_dti
    text, emb = load(dti_pack, "a1111-style.pt", clip)
    assert text == "embedding:a1111-style" and emb.source_format == "a1111" and emb.vectors["clip_l"].shape == (3, 768)


def test_768_wide_embedding_for_sdxl_fails_at_load_naming_file_key_and_widths(dti_pack, sdxl_loaded, embeddings_dir):
    _, clip, _ = sdxl_loaded
    save_file({"emb_params": torch.randn(2, 768)}, str(embeddings_dir / "sd15-only.safetensors"))
    with pytest.raises(ValueError) as err:
        load(dti_pack, "sd15-only.safetensors", clip)
    msg = str(err.value)
    assert "sd15-only.safetensors" in msg and "'emb_params'" in msg and "768" in msg and "1280" in msg


def test_malicious_pt_is_refused_and_never_runs(dti_pack, embeddings_dir, monkeypatch):
    class Payload:
        def __reduce__(self):
            return (exec, ("import os; os.environ['DTI_SENTINEL'] = 'set'",))

    monkeypatch.delenv("DTI_SENTINEL", raising=False)
    with open(embeddings_dir / "evil.pt", "wb") as f:
        pickle.dump({"string_to_param": {"*": Payload()}}, f)
    with pytest.raises(ValueError, match="refused"):
        load(dti_pack, "evil.pt")
    assert "DTI_SENTINEL" not in os.environ


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_slerp_node_endpoints_norms_monotonic_angle_and_file_works(kind, request, dti_pack, embeddings_dir, comfy_nodes):
    _, clip, _ = request.getfixturevalue(f"{kind}_loaded")
    va, m = make_dti(embeddings_dir, f"sl-a-{kind}", clip, kind, 10)
    vb, _ = make_dti(embeddings_dir, f"sl-b-{kind}", clip, kind, 11)
    _, a = load(dti_pack, f"sl-a-{kind}.safetensors", clip)
    _, b = load(dti_pack, f"sl-b-{kind}.safetensors", clip)
    node = nodes_of(dti_pack).DTISlerpConcepts()
    out0 = node.slerp(a, b, 0.0, f"sl-0-{kind}", False)["result"][1]
    out1 = node.slerp(a, b, 1.0, f"sl-1-{kind}", False)["result"][1]
    for k in va:
        assert torch.equal(out0.vectors[k], va[k]) and torch.equal(out1.vectors[k], vb[k])
        assert torch.equal(load_embedding(str(embeddings_dir / f"sl-0-{kind}.safetensors")).vectors[k], va[k])
    prev = None
    for i, t in enumerate([0.2, 0.4, 0.6, 0.8]):
        emb = node.slerp(a, b, t, f"sl-{i}-mid-{kind}", False)["result"][1]
        for k in va:
            assert torch.allclose(emb.vectors[k].norm(dim=-1), torch.full((2,), m[k]), atol=1e-5)
        ang = angle(va["clip_l"], emb.vectors["clip_l"])
        assert prev is None or (ang > prev).all()
        prev = ang
    text, _ = node.slerp(a, b, 0.5, f"sl-mid-{kind}", False)["result"]
    assert text == f"embedding:sl-mid-{kind}"
    c_mid = encode(comfy_nodes, clip, f"a photo of {text}")
    c_a = encode(comfy_nodes, clip, f"a photo of embedding:sl-a-{kind}")
    assert not torch.allclose(c_mid[0][0], c_a[0][0])


def test_slerp_node_refuses_overwrite_bad_t_and_mismatched_encoders_and_warns_on_ti(dti_pack, sd15_loaded, sdxl_loaded, embeddings_dir):
    _, clip15, _ = sd15_loaded
    _, clipxl, _ = sdxl_loaded
    make_dti(embeddings_dir, "mx-a", clip15, "sd15", 20)
    make_dti(embeddings_dir, "mx-xl", clipxl, "sdxl", 21)
    save_file({"emb_params": 20.0 * normalize(torch.randn(2, 768))}, str(embeddings_dir / "mx-ti.safetensors"))
    _, a = load(dti_pack, "mx-a.safetensors")
    _, xl = load(dti_pack, "mx-xl.safetensors")
    _, ti = load(dti_pack, "mx-ti.safetensors")
    node = nodes_of(dti_pack).DTISlerpConcepts()
    with pytest.raises(ValueError, match="different text encoders"):
        node.slerp(a, xl, 0.5, "mx-out", False)
    for t in (float("nan"), 3.0):
        with pytest.raises(ValueError, match="t must"):
            node.slerp(a, a, t, "mx-out", False)
    out = node.slerp(a, ti, 0.5, "mx-warn", False)
    assert "plain TI" in out["ui"]["text"][0]
    path = embeddings_dir / "mx-warn.safetensors"
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        node.slerp(a, ti, 0.7, "mx-warn", False)
    assert path.read_bytes() == before
    node.slerp(a, ti, 0.7, "mx-warn", True)
    assert path.read_bytes() != before
    assert not (embeddings_dir / "mx-out.safetensors").exists()


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_strip_entries_equal_clip_text_encode_of_each_saved_blend(kind, request, dti_pack, embeddings_dir, comfy_nodes):
    _, clip, _ = request.getfixturevalue(f"{kind}_loaded")
    make_dti(embeddings_dir, f"st-a-{kind}", clip, kind, 30)
    make_dti(embeddings_dir, f"st-b-{kind}", clip, kind, 31)
    _, a = load(dti_pack, f"st-a-{kind}.safetensors", clip)
    _, b = load(dti_pack, f"st-b-{kind}.safetensors", clip)
    K = 4
    with torch.inference_mode():
        (cond,), ts = nodes_of(dti_pack).DTIInterpolationStrip().encode(clip, "a photo of {}, on a beach", a, b, K)
    assert ts == "0, 0.333, 0.667, 1"
    batch, extra = cond
    assert batch.shape[0] == K
    slerp = nodes_of(dti_pack).DTISlerpConcepts()
    for k in range(K):
        name = f"st-{k}-{kind}"
        slerp.slerp(a, b, k / (K - 1), name, False)
        (ref_cond, ref_extra), = encode(comfy_nodes, clip, f"a photo of embedding:{name}, on a beach")
        assert torch.allclose(batch[k:k + 1], ref_cond, atol=1e-6, rtol=0)
        if kind == "sdxl":
            assert torch.allclose(extra["pooled_output"][k:k + 1], ref_extra["pooled_output"], atol=1e-6, rtol=0)
    # every entry is its own blend: no two neighbours encode alike
    for k in range(K - 1):
        assert not torch.allclose(batch[k], batch[k + 1], atol=1e-3)


def test_strip_refuses_a_count_other_than_the_latent_batch(dti_pack, sd15_loaded, embeddings_dir):
    """With the latent linked, count K must equal its batch (a sampler would silently repeat or drop blends)."""
    _, clip, _ = sd15_loaded
    make_dti(embeddings_dir, "kb-a", clip, "sd15", 50)
    make_dti(embeddings_dir, "kb-b", clip, "sd15", 51)
    _, a = load(dti_pack, "kb-a.safetensors", clip)
    _, b = load(dti_pack, "kb-b.safetensors", clip)
    strip = nodes_of(dti_pack).DTIInterpolationStrip()
    latent = lambda n: {"samples": torch.zeros(n, 4, 8, 8)}  # noqa: E731  (EmptyLatentImage's layout)
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"count is 4 but the latent batch is 3: .*drop.*batch_size"):
            strip.encode(clip, "a photo of {}", a, b, 4, latent=latent(3))
        with pytest.raises(ValueError, match=r"count is 2 but the latent batch is 5: .*repeat"):
            strip.encode(clip, "a photo of {}", a, b, 2, latent=latent(5))
        (cond,), ts = strip.encode(clip, "a photo of {}", a, b, 3, latent=latent(3))
    assert cond[0].shape[0] == 3 and ts == "0, 0.5, 1"
    assert "latent" in type(strip).INPUT_TYPES()["optional"]


def test_inspect_reports_norms_angles_tokens_and_draws_a_chart(dti_pack, sdxl_loaded, embeddings_dir):
    _, clip, _ = sdxl_loaded
    make_dti(embeddings_dir, "insp", clip, "sdxl", 40)
    _, emb = load(dti_pack, "insp.safetensors", clip)
    with torch.inference_mode():
        out = dti_pack.nodes.inspect_node.DTIInspect().inspect(emb, clip, 3)
    report, image = out["result"]
    assert "clip_l" in report and "clip_g" in report and "percentile" in report and "from 'cat'" in report
    assert report.count("vector 0") == 2 and "nearest:" in report
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[1] == 2 * 220
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0


def test_inspect_numbers_percentile_degrees_and_nearest_tokens(dti_pack, sd15_loaded, embeddings_dir):
    import math
    import re

    ct = dti_pack.comfy_host
    _, clip, _ = sd15_loaded
    (_, tok, encoder), = ct.text.text_encoders(clip).values()
    with torch.inference_mode(False):
        vocab = ct.text.vocabulary(encoder).detach().float().clone()
    norms = vocab.norm(dim=-1)
    norms = norms[norms > 0]
    (cat,) = ct.text.initializer_ids(tok, "cat")
    c = normalize(vocab[cat])
    w = torch.randn(768, generator=torch.Generator().manual_seed(9))
    w = normalize(w - (w @ c) * c)
    n0, n1 = float(norms.median()), 2 * float(norms.max())
    rotated = math.cos(math.radians(60)) * c + math.sin(math.radians(60)) * w
    vectors = torch.stack([n0 * c, n1 * rotated])
    save_embedding(str(embeddings_dir), "insp-values", {"clip_l": vectors}, dti_metadata(initializer="cat"))
    _, emb = load(dti_pack, "insp-values.safetensors", clip)
    with torch.inference_mode():
        report = dti_pack.nodes.inspect_node.DTIInspect().inspect(emb, clip, 3)["result"][0]
    rows = re.findall(r"vector (\d+): norm ([\d.]+) \(([\d.]+)th percentile\), ([\d.]+) deg from 'cat'; nearest: (.*)",
                      report)
    assert len(rows) == 2, report
    assert report.splitlines()[0].split()[0] == "insp-values.safetensors"  # the file's name, not its full path
    unit = vocab / vocab.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    for (i, norm, pct, deg, near), v, deg_ref in zip(rows, vectors, (0.0, 60.0)):
        n = float(v.norm())
        assert float(norm) == pytest.approx(n, abs=1e-4)
        assert float(pct) == pytest.approx(100.0 * float((norms < n).sum()) / norms.numel(), abs=0.06)
        assert float(deg) == pytest.approx(deg_ref, abs=0.06)
        top = torch.topk(unit @ normalize(v), 3)
        expected = [f"{tok.inv_vocab[int(j)].replace('</w>', '')} ({float(cs):.2f})" for cs, j in zip(top.values, top.indices)]
        assert near == ", ".join(expected)
    assert rows[0][4].startswith("cat (1.00)") and float(rows[1][2]) == 100.0
