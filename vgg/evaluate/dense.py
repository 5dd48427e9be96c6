"""Dense evaluation (§3.2) of several images in one forward pass, each padded to a shared shape.

Dense evaluation rescales each image so that its smallest side is Q; the other side follows the image's aspect
ratio, so photos come in many sizes and a batch of equal sizes is rare. An image padded at its bottom and right
to a larger shape gives the same class scores as the image alone if every feature map is zero outside the
image's own region before each convolution (that is what the unpadded net's zero padding sees there) and the
class score map is averaged over the image's own region only:
- a 3×3 conv (padding 1) at a position inside the region reads the region and, across its border, zeros;
- ReLU and LRN act per position; a 2×2 max-pool (stride 2, floor) maps a region of h to ⌊h/2⌋, whose windows
  all lie inside the region;
- fc6 as a k×k conv without padding, and fc7, fc8 as 1×1 convs, give valid scores at the first ⌊h/32⌋ − k + 1
  positions, read from the region only.
The padded result is equal in exact arithmetic; in floating point it differs by the summation order of the
kernels that run (tests check it against the image alone).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from vgg.data.transforms import draft_factor, scaled_size
from vgg.errors import ModelError
from vgg.models import VGG

# Layers that act per position (their output region is their input region).
_POINTWISE = (nn.ReLU, nn.LocalResponseNorm)


def rescaled_shape(size: tuple[int, int], q: int) -> tuple[int, int]:
    """(height, width) px of a JPEG of `size` (width, height) at test scale Q, as `vgg.evaluate.views.at_scale`
    gives it after `decode_rgb(min_side=Q)`: decoded in the DCT at 1/f (sides rounded up), then rescaled."""
    factor = draft_factor(size, q)
    decoded = (-(-size[0] // factor), -(-size[1] // factor))
    width, height = scaled_size(decoded, q)
    return height, width


def padded_shape(shape: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The shape an image of `shape` (height, width) at scale Q is padded to: its long side rounded up to a
    multiple of `multiple` px, its short side (Q) kept, so images at one Q fall into a few shapes. 1: unchanged."""
    height, width = shape
    if height > width:
        return -(-height // multiple) * multiple, width
    if width > height:
        return height, -(-width // multiple) * multiple
    return height, width


def pad_to(views: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Views [N, C, h, w] padded at the bottom and right to `shape` (the values there are masked later)."""
    height, width = views.shape[-2:]
    if (height, width) == tuple(shape):
        return views
    return nn.functional.pad(views, (0, shape[1] - width, 0, shape[0] - height))


def dense_scores(model: VGG, x: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """The class score map of each image of x [N, 3, H, W], averaged over the image's own region (§3.2): [N, C].

    `sizes`: long [N, 2], each image's (height, width) inside x (its top-left corner); None: all of x.
    """
    if sizes is None or bool((sizes == torch.tensor(x.shape[-2:], device=sizes.device)).all()):
        return model.score_map(x).float().mean(dim=(2, 3))
    sizes = sizes.to(x.device)
    with _masked(model, sizes):
        scores = model.score_map(x).float()
    pools = sum(isinstance(layer, nn.MaxPool2d) for layer in model.features)
    valid = (sizes >> pools) - model.head_kernel + 1  # the score map's own region per image
    mask = _region_mask(valid, scores.shape[-2:]).to(scores.dtype)
    return (scores * mask).sum(dim=(2, 3)) / valid.prod(dim=1, keepdim=True).to(scores.dtype)


def _region_mask(sizes: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """bool [N, 1, H, W]: True inside each image's region (top-left `sizes` [N, 2])."""
    rows = torch.arange(shape[0], device=sizes.device)
    cols = torch.arange(shape[1], device=sizes.device)
    inside_rows = rows[None, :] < sizes[:, :1]  # [N, H]
    inside_cols = cols[None, :] < sizes[:, 1:]  # [N, W]
    return (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]


@contextmanager
def _masked(model: VGG, sizes: torch.Tensor) -> Iterator[None]:
    """While active, every conv of `model.features` sees zeros outside each image's region (see the module doc)."""
    hooks = []
    level = 0  # 2×2 max-pools so far: the region is sizes >> level
    try:
        for layer in model.features:
            if isinstance(layer, nn.Conv2d):
                hooks.append(layer.register_forward_pre_hook(_zero_outside(sizes >> level)))
            elif isinstance(layer, nn.MaxPool2d):
                if (layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode) not in ((2, 2, 0, False),):
                    raise ModelError(f"dense evaluation of padded images: unsupported pooling {layer}")
                level += 1
            elif not isinstance(layer, _POINTWISE):
                raise ModelError(f"dense evaluation of padded images: unsupported layer {layer}")
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _zero_outside(sizes: torch.Tensor):  # noqa: ANN202 (a forward pre-hook)
    def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = inputs[0]
        return (x * _region_mask(sizes, x.shape[-2:]),)  # keeps x's dtype and memory format (masked_fill does not)

    return hook
