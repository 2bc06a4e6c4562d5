"""Helpers shared by host tests: call DTI Train the way ComfyUI's executor does."""

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

def images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, size, size, 3, generator=g)


def train_args(**over):
    args = dict(name="cat", initializer="cat", steps=3, batch_size=2, learning_rate=0.01, kappa=1e-4,
                magnitude="mean", magnitude_value=0.4, templates="object", custom_templates="", resolution=64,
                horizontal_flip=True, seed=1, save_every=0, resume_from="(none)", overwrite=False)
    args.update(over)
    return args


def run_train(pack, loaded, images=None, **over):
    """Run DTITrain.run under torch.inference_mode(), as ComfyUI's executor calls every node."""
    model, clip, vae = loaded
    node = pack.nodes.train_node.DTITrain()
    batch = globals()["images"]() if images is None else images
    with torch.inference_mode():
        return node.run(model, clip, vae, images=batch, **train_args(**over))


def text_compute_dtypes(clip, encoders):
    """The dtypes the text encoders actually compute in, read from their hidden-state outputs
    during one encode (ComfyUI may store fp16 weights yet run the layers in fp32, or not)."""
    seen = set()
    hooks = [enc.transformer.register_forward_hook(
        lambda mod, args, out: seen.add((out[0] if isinstance(out, tuple) else out).dtype)) for enc in encoders]
    try:
        with torch.inference_mode():
            clip.encode_from_tokens(clip.tokenize("a photo"))
    finally:
        for h in hooks:
            h.remove()
    return seen


def rounding_tolerance(dtypes, scale, ulps=32):
    """Absolute tolerance for two computations of the same values that differ only in kernel
    shapes (batching, blocking): a few dozen roundings of the coarsest dtype at the values' size.
    It is not a bit-identity check: a different kernel may order its sums differently."""
    eps = max(torch.finfo(d).eps for d in dtypes)
    return ulps * eps * float(scale)


def replay_draws(step_generator, seed, step, b, n, n_prompts, sizes, crop, weights=None, channels=4, eps=True):
    """DiffusionStep's random draws for ``step``, replayed in its documented order from
    ``dti_core.training.step_generator``: the bucket (when there are several, ``weights``), the images,
    the flips, the prompts, the timesteps, the noise, the crop corners (``sizes``: each image's latent
    size; ``crop``: the bucket's), and the posterior sample (``eps``). The one description of the
    stream the host tests rebuild the step's inputs from."""
    g = step_generator(seed, step)
    k = int(torch.multinomial(weights, 1, generator=g)) if weights is not None else 0
    idx = torch.randint(n, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    which = torch.randint(n_prompts, (b,), generator=g)
    u = torch.rand(b, generator=g, dtype=torch.float64)
    noise = torch.randn(b, channels, *crop, generator=g)
    ru = torch.rand(b, generator=g, dtype=torch.float64)
    rv = torch.rand(b, generator=g, dtype=torch.float64)
    e = torch.randn(b, channels, *crop, generator=g) if eps else None
    corners = []
    for i in range(b):
        lh, lw = sizes[int(idx[i])]
        corners.append((math.floor(float(ru[i]) * (lh - crop[0] + 1)), math.floor(float(rv[i]) * (lw - crop[1] + 1))))
    return dict(k=k, idx=idx, flip=flip, which=which, u=u, noise=noise, corners=corners, eps=e)


def encoder_grad_and_saved_bytes(ct, model, clip, prompt, vectors, gradient_checkpointing):
    """``(grads, bytes)``: the gradient of a loss on the stock encode of ``prompt`` (a PromptTokens)
    with ``vectors`` (``{token_key: (n, width)}``) in the word's place, and the bytes of activations
    autograd kept for backward (weights, which are referenced and not copied, not counted), inside
    ``differentiable`` with or without gradient checkpointing."""
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip, gradient_checkpointing):
        weights = {q.data_ptr() for _, _, enc in ct.text.text_encoders(clip).values() for q in enc.parameters()}
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in vectors.items()}
        total = [0]

        def pack(t):
            if t.data_ptr() not in weights:
                total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cond, _ = ct.text.encode_tokens(clip, prompt.with_vectors(leaves))
        cond.float().square().mean().backward()
    return {k: v.grad.detach().clone() for k, v in leaves.items()}, total[0]


def dog_teacher(ct, clip, key):
    """``(init, mu, m_star, prompt, target, cos)`` for encoder ``key``: the student word at "car" in
    "a photo of a {}", the conditioning of that prompt with the encoder's own "dog" row(s) (their mean
    direction) at m* in the word's place (fp32, a normal tensor), and ``cos(vectors)``: the student's
    mean cosine to that direction."""
    tkey, tok, enc = ct.text.text_encoders(clip)[key]
    with torch.inference_mode():
        init, mu, m_star = ct.text.initial_vectors(clip, "car", 0, "mean")
        n = init[key].shape[0]
        (prompt,) = ct.text.tokenize_templates(clip, ["a photo of a {}"], {k: v.shape[0] for k, v in init.items()})
        dog = ct.text.initializer_ids(tok, "dog")
    with torch.inference_mode(False):
        rows = ct.text.vocabulary(enc)[dog].detach().float().clone()
        dog_dir = torch.nn.functional.normalize(rows.mean(0, keepdim=True), dim=-1)
    with torch.inference_mode():
        target, _ = ct.text.encode_tokens(clip, prompt.with_vectors({tkey: (m_star[key] * dog_dir).expand(n, -1)}))
    with torch.inference_mode(False):
        target = target.clone().float()

    def cos(vectors):
        return float((torch.nn.functional.normalize(vectors[key], dim=-1) * dog_dir).sum(-1).mean())
    return init, mu, m_star, prompt, target, cos


@contextlib.contextmanager
def padded_to(tokenizer, length):
    """Prompts padded to ``length`` tokens instead of the tokenizer's own ``min_length`` (put back on
    exit). Only for an encoder that masks its padding and zeroes its output there (UMT5 as Wan builds
    it): its real positions do not depend on how much padding follows, which the caller asserts."""
    before = tokenizer.min_length
    tokenizer.min_length = length
    try:
        yield
    finally:
        tokenizer.min_length = before


@contextlib.contextmanager
def text_encoders_in_fp32(ct, clip):
    """The CLIP's text encoders stored in fp32 while the block runs, then given back their own tensors (a
    shared fixture's CLIP comes back unchanged). ComfyUI computes text encoders in fp32 on the CPU and casts
    each fp16 weight per call; an fp16 or bf16 value is exact in fp32, so a run gives the same numbers
    without the casts, which took most of a teacher-student step here (torch converts fp16 to fp32 at ~1 G
    elements/s on this CPU). The fp32 copies are normal tensors (the loaded ones are inference tensors,
    which autograd may not save). Only for convergence runs: the node's own runs keep ComfyUI's storage."""
    kept = []
    with torch.no_grad():
        for _, _, enc in ct.text.text_encoders(clip).values():
            for module in enc.modules():
                for table in (module._parameters, module._buffers):
                    for name, t in table.items():
                        if t is None or not t.is_floating_point():
                            continue
                        assert t.dtype in (torch.float16, torch.bfloat16, torch.float32), t.dtype  # (exact in fp32)
                        kept.append((table, name, t))
                        copy = t.to(torch.float32, copy=True)
                        table[name] = torch.nn.Parameter(copy, requires_grad=False) if table is module._parameters else copy
    try:
        yield clip
    finally:
        for table, name, t in reversed(kept):
            table[name] = t


def teacher_student_through_the_text_encoder(ct, core, model, clip, key, steps, lr, pad_to=None):
    """Train the student of ``dog_teacher`` with the loss on the conditioning (squared error, mean over
    the width, summed over positions: with causal attention only the word's position and what follows
    see it). Returns ``(before, after, result)``; the norm stays m* (asserted here). ``pad_to``: the
    prompt padded to that many tokens (see padded_to)."""
    if pad_to is not None:
        with padded_to(ct.text.text_encoders(clip)[key][1], pad_to):
            return teacher_student_through_the_text_encoder(ct, core, model, clip, key, steps, lr)
    init, mu, m_star, prompt, target, cos = dog_teacher(ct, clip, key)
    tkey = ct.text.text_encoders(clip)[key][0]

    def loss_fn(embeds, step):
        cond, _ = ct.text.encode_tokens(clip, prompt.with_vectors({tkey: embeds[key]}))
        return ((cond.float() - target) ** 2).mean(-1).sum()

    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        before = cos(init)
        result = core.train(init, mu, m_star, loss_fn, core.TrainConfig(steps=steps, lr=lr, kappa=0.0))
    assert torch.allclose(result.vectors[key].norm(dim=-1), torch.tensor(m_star[key]), atol=1e-5)
    return before, cos(result.vectors), result


def assert_checkpointing_keeps_the_gradient(ct, model, clip, key, what, max_ratio):
    """The word's gradient through encoder ``key`` with and without gradient checkpointing: equal, and
    the activations kept for backward at most ``max_ratio`` of those without."""
    tkey = ct.text.text_encoders(clip)[key][0]
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 1, "mean")
        (prompt,) = ct.text.tokenize_templates(clip, ["a photo of a {} on a beach"], 1)
    vectors = {tkey: m_star[key] * init[key]}
    grad, saved = {}, {}
    for gc in (False, True):
        grad[gc], saved[gc] = encoder_grad_and_saved_bytes(ct, model, clip, prompt, vectors, gc)
    print(f"\n{what} activations kept for backward: {saved[False] / 2**20:.1f} MiB without, "
          f"{saved[True] / 2**20:.1f} MiB with gradient checkpointing")
    assert saved[True] < max_ratio * saved[False]
    g0, g1 = grad[False][tkey], grad[True][tkey]
    assert float(g0.norm()) > 0
    assert torch.allclose(g1, g0, rtol=1e-5, atol=1e-6 * float(g0.abs().max()))


def assert_m_star_is_the_tables_mean_norm(ct, clip, key):
    """An encoder whose lookup is a plain table (no scale, unlike 0.33's Gemma): m* is the mean norm of
    its rows."""
    enc = ct.text.text_encoders(clip)[key][2]
    assert ct.text.lookup_scale(enc) == 1.0
    with torch.inference_mode():
        _, _, m_star = ct.text.initial_vectors(clip, "cat", 1, "mean")
        table = enc.transformer.get_input_embeddings().weight
        mean_norm = float(table.float().norm(dim=-1).mean())
    assert abs(m_star[key] - mean_norm) <= 1e-4 * mean_norm, (m_star[key], mean_norm)


def assert_saved_word(ct, clip, key, emb, family, initializer="dog"):
    """A file the node wrote for one language-model encoder ``key``: that key only, the family named,
    fp32 rows at the table's mean norm m*, each moved away from its initializer token's direction."""
    enc = ct.text.text_encoders(clip)[key][2]
    tok = ct.text.text_encoders(clip)[key][1]
    with torch.inference_mode():
        table = enc.transformer.get_input_embeddings().weight
        mean_norm = float(table.float().norm(dim=-1).mean())
        start = torch.nn.functional.normalize(
            ct.text.vocabulary(enc)[ct.text.initializer_ids(tok, initializer)].detach().float().clone(), dim=-1)
    assert set(emb.vectors) == {key} and emb.metadata["dti.model_family"] == family
    v = emb.vectors[key]
    assert v.dtype == torch.float32 and v.shape == start.shape
    assert abs(emb.m_star(key) - mean_norm) <= 1e-4 * mean_norm
    assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), emb.m_star(key)), rtol=0, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(v, start, dim=-1)
    assert bool((cos < 1 - 1e-4).all()), f"the vectors did not move from the initializer: {cos}"
    return v


def one_frame_flow_loss_and_reference(ct, training, model, clip, vae, key):
    """``(loss, ref)``: one DiffusionStep's loss (batch 2, seed 11, step 0, 64 px, one prompt) on one-frame
    3-D latents (16 channels, 1/8), and the same loss computed independently: the step's draws replayed
    from ``step_generator``, x_t = (1 - s) x0 + s n at the model's own shifted sigma, target n - x0, the
    DiT called directly with the encoder's conditioning."""
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, ["a photo of a {}"], {key: init[key].shape[0]})
        latents = ct.latents.encode_latents(vae, model, torch.rand(2, 64, 64, 3), hflip=False)
    vectors = {key: m_star[key] * init[key]}
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        lat = latents.cloned()
        assert lat.mean.shape == (2, 16, 1, 8, 8)
        step = ct.step.DiffusionStep(model, clip, prompts, lat, None, 2, 11, 64, "cpu")
        loss = float(step(vectors, 0))
        g = training.step_generator(11, 0)
        idx = torch.randint(2, (2,), generator=g)
        torch.rand(2, generator=g)  # flip draws (no mirrored latents here)
        torch.randint(1, (2,), generator=g)  # prompt choice
        u = torch.rand(2, generator=g, dtype=torch.float64)
        noise = torch.randn((2, 16, 1, 8, 8), generator=g)
        ms = model.get_model_object("model_sampling")
        t_min, t_max = float(ms.timestep(ms.sigma_min)), float(ms.timestep(ms.sigma_max))
        sigma = ms.sigma((t_min + u * (t_max - t_min)).float())
        x0 = lat.mean[idx].float()
        x_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
        cond, _ = ct.text.encode_tokens(clip, prompts[0].with_vectors(vectors))
        v_pred = model.model.diffusion_model(x_t, ms.timestep(sigma).float(), context=cond.float().expand(2, -1, -1)).float()
        ref = float(((v_pred - (noise - x0)) ** 2).mean())
    return loss, ref


def assert_node_trains_a_word_the_enabled_encode_reads(dti_pack, loaded, embeddings_dir, comfy_nodes, caplog, key,
                                                       family, name):
    """For a family whose tokenizer ComfyUI builds without an embeddings folder: DTI Train's run (1 step at
    batch 2, a preview, on one-frame latents where the VAE gives them) leaves the input CLIP as it was and writes a
    file (``assert_saved_word``); through DTI Enable Embeddings the stock CLIPTextEncode reads it, as the
    training prompts placed it, without a warning. Returns the saved vectors."""
    import logging

    from dti_core.embedding_file import load_embedding
    model, clip, vae = loaded
    ct = dti_pack.comfy_host
    out = run_train(dti_pack, loaded, name=name, initializer="dog", steps=1, batch_size=2,
                    resolution=64, kappa=5e-5, learning_rate=0.05, templates="custom",
                    custom_templates="a photo of a {}\n{} on a beach, a good photo", preview_every=1, preview_steps=1)
    assert out["ui"]["text"][0].startswith(f"Saved embedding:{name}")
    assert ct.text.text_encoders(clip)[key][1].embedding_directory is None  # the input CLIP was left alone
    v = assert_saved_word(ct, clip, key, load_embedding(str(embeddings_dir / f"{name}.safetensors")), family)
    preview = out["result"][3]
    assert preview.dim() == 4 and preview.shape[-1] == 3 and bool(torch.isfinite(preview).all())

    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        (on,) = dti_pack.nodes.embedding_nodes.DTIEnableEmbeddings().enable(clip)["result"]
        (with_word,) = comfy_nodes.CLIPTextEncode().encode(on, f"a photo of embedding:{name}")
        (plain,) = comfy_nodes.CLIPTextEncode().encode(on, "a photo of dog")
        (prompt,) = ct.text.tokenize_templates(on, ["a photo of {}"], v.shape[0])
        spliced = on.encode_from_tokens_scheduled(prompt.with_vectors({key: v}))
    assert not torch.equal(with_word[0][0], plain[0][0])
    assert torch.equal(with_word[0][0], spliced[0][0])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    return v


# --- the command line (python -m dti_cli) in a subprocess, on generated image folders ---------------

REPO = Path(__file__).resolve().parents[2]


def write_images(folder: Path, n=3, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    arrays = [(rng.rand(64, 64, 3) * 255).astype("uint8") for _ in range(n)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)


def cli(comfy, *args, cwd=REPO, env_extra=None):
    env = dict(os.environ, COMFYUI_PATH=comfy.path)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dti_cli", "--cpu", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def jobs_file(tmp_path, checkpoint, names):
    lines = [f'checkpoint = "{checkpoint}"', "[defaults]", "steps = 2", "batch_size = 1", "resolution = 64",
             'initializer = "dog"']
    for i, name in enumerate(names):
        write_images(tmp_path / f"img{i}", n=2, seed=10 + i)
        lines += ["[[job]]", f'name = "{name}"', f'images = "img{i}"']
    path = tmp_path / "jobs.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def summary_records(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
