"""The host layer: the only code of this pack that touches ComfyUI's internals.

``comfy.*``, ``folder_paths``, ``server`` and private attributes are used here and nowhere else;
the node modules, the command line and the benchmarks call these modules:

* ``images``    training images: the IMAGE batch, photos read as LoadImage reads them, buckets
* ``text``      the CLIP's encoders, the learned word in a prompt (placeholder), tokenize and encode
* ``latents``   images VAE-encoded once, posterior moments in the model's latent space
* ``step``      one training step: conditioning, noise, loss (``DiffusionStep``)
* ``sampling``  previews through ComfyUI's sampler
* ``families``  which models DTI trains, and which of their encoders learn
* ``autograd``  the model made differentiable for a run, and undone (the autograd patches)
* ``ops``       weights read through the host's cast/uncast pair (fp8, quantized, offloaded)
* ``memory``    devices, loading, dynamic VRAM, out of memory, cancel, clean-up
* ``paths``     ComfyUI's folders (embeddings, input)
* ``ui``        progress bar and messages to the browser
* ``loaders``   loading a model as the loader nodes do (command line)
* ``startup``   ComfyUI importable outside its server (command line, benchmarks)
* ``contracts`` the host's version, and the errors for a model or host that does not fit

Where the tested ComfyUI releases differ, each module detects the capability (an attribute, a
signature, a return shape), never the version string.
"""
