"""Testing (§3.2): dense, multi-crop and multi-scale evaluation, fusion, top-1/top-5 error."""

from vgg.evaluate.metrics import errors, top_k_error
from vgg.evaluate.posteriors import (
    MODES,
    Posteriors,
    TorchvisionNormalize,
    checkpoint_meta,
    compute_posteriors,
    fuse,
    load_model,
    scale_meta,
    score_samples,
)
from vgg.evaluate.views import at_scale, dense_views, grid_positions, multicrop_views, to_chw

__all__ = [
    "MODES",
    "Posteriors",
    "TorchvisionNormalize",
    "at_scale",
    "checkpoint_meta",
    "compute_posteriors",
    "dense_views",
    "errors",
    "fuse",
    "grid_positions",
    "load_model",
    "multicrop_views",
    "scale_meta",
    "score_samples",
    "to_chw",
    "top_k_error",
]
