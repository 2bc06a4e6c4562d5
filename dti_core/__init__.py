"""Directional Textual Inversion, in pure torch: nothing here imports ComfyUI.

- ``sphere``: normalise, tangent projection, retraction, geodesic angle, slerp
- ``optim``: the DTI optimizer (Riemannian SGD with a vMF prior)
- ``magnitude``: the fixed norm m* from the vocabulary
- ``embedding_file``: our embedding files and safe readers for foreign ones
- ``names``: the one check for every name a node writes under
- ``training``: the training loop over an abstract step
"""

__version__ = "0.1.0"
