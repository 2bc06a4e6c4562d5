"""Helpers shared by host tests: call DTI Train the way ComfyUI's executor does."""

import math

import torch


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
