"""ComfyUI-DTI: Directional Textual Inversion nodes for ComfyUI.

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS and
WEB_DIRECTORY. The pure core (``dti_core``) imports without ComfyUI; the node
modules are only imported when ComfyUI's ``comfy`` package is present, so tools
and tests can import this package anywhere.
"""

WEB_DIRECTORY = "./js"

try:
    import comfy.model_management  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
