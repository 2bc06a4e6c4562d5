"""The pack's ComfyUI nodes (classic node API). Imported only inside ComfyUI."""

from .embedding_nodes import DTIEnableEmbeddings, DTIInterpolationStrip, DTILoadEmbedding, DTISlerpConcepts
from .evaluate_node import DTIEvaluate
from .inspect_node import DTIInspect
from .train_node import DTITrain

NODE_CLASS_MAPPINGS = {
    "DTITrain": DTITrain,
    "DTILoadEmbedding": DTILoadEmbedding,
    "DTISlerpConcepts": DTISlerpConcepts,
    "DTIInterpolationStrip": DTIInterpolationStrip,
    "DTIInspect": DTIInspect,
    "DTIEnableEmbeddings": DTIEnableEmbeddings,
    "DTIEvaluate": DTIEvaluate,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DTITrain": "DTI Train (Directional Textual Inversion)",
    "DTILoadEmbedding": "DTI Load Embedding",
    "DTISlerpConcepts": "Slerp Concepts (DTI)",
    "DTIInterpolationStrip": "DTI Interpolation Strip",
    "DTIInspect": "DTI Inspect",
    "DTIEnableEmbeddings": "DTI Enable Embeddings",
    "DTIEvaluate": "DTI Evaluate",
}
