"""Command line for DTI Train: ``python -m dti_cli`` from the pack's folder.

Trains embeddings from folders of images without the ComfyUI server, through ComfyUI's own
loaders and DTI Train's own code (the node class is called as ComfyUI's executor calls it), so the
files, defaults and metadata are the node's. See ``python -m dti_cli --help`` and docs/cli.md.
"""
