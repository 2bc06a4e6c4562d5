"""Helpers shared by host tests: call DTI Train the way ComfyUI's executor does."""

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
