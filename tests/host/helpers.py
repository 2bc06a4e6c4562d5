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
        return node.run(model, clip, vae, batch, **train_args(**over))
