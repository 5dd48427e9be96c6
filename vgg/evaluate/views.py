"""The test-time views of §3.2: the dense view (whole image at scale Q, and its mirror image) and the
multi-crop views (a grid × grid regular grid of crop × crop crops, and their mirror images).

All views are uint8 CHW tensors on the 0–255 scale; mean subtraction happens later, on the device, in the
checkpoint's `Preprocess` (so the conv's zero padding pads with the mean colour, as in the paper).

Multi-crop vs dense (§3.2): the paper notes that multi-crop crops are "padded with zeros" at their borders
while dense evaluation sees the real neighbouring pixels there, which is why the two are complementary. Our
crops are plain crops of the rescaled image passed through the ordinary network, whose 3×3 convs pad every
feature map with zeros: that is exactly the paper's zero-padded crop (no extra padding is added around the
crop itself, and the paper adds none either — a 224 crop is the network's native input).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vgg.data.transforms import rescale
from vgg.errors import ConfigError


def to_chw(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a uint8 tensor [3, H, W]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def at_scale(image: Image.Image, *, q: int) -> torch.Tensor:
    """The image isotropically rescaled so that its smallest side is Q px (§3.2), as uint8 [3, H, W]."""
    return to_chw(rescale(image, q))


def dense_views(image: torch.Tensor) -> torch.Tensor:
    """The dense view (§3.2): the whole rescaled image and its horizontal flip, uint8 [2, 3, H, W]."""
    _check_chw(image)
    return torch.stack([image, image.flip(-1)])


def grid_positions(size: int, *, crop: int, grid: int) -> list[int]:
    """Top (or left) offsets, px, of `grid` crops of side `crop` spread evenly over a side of `size` px.

    The first crop touches the start, the last the end; the middle one of an odd grid is the centre crop
    at (size − crop) // 2 (offsets are floored, the same rounding as a centre crop).
    """
    if crop > size:
        raise ConfigError(f"multi-crop: crop {crop} px is larger than the rescaled image side {size} px; use Q >= crop")
    if grid < 1:
        raise ConfigError(f"multi-crop: grid must be >= 1, got {grid}")
    if grid == 1:
        return [(size - crop) // 2]
    return [i * (size - crop) // (grid - 1) for i in range(grid)]


def multicrop_views(image: torch.Tensor, *, crop: int, grid: int) -> torch.Tensor:
    """The multi-crop views (§3.2): grid × grid crops in row-major order (top-to-bottom, then
    left-to-right), followed by the horizontal flip of each crop in the same order.

    uint8 [2·grid², 3, crop, crop]: 50 views per scale for the paper's 5 × 5 grid.
    """
    _check_chw(image)
    _, height, width = image.shape
    tops = grid_positions(height, crop=crop, grid=grid)
    lefts = grid_positions(width, crop=crop, grid=grid)
    crops = torch.stack([image[:, top : top + crop, left : left + crop] for top in tops for left in lefts])
    return torch.cat([crops, crops.flip(-1)])


def _check_chw(image: torch.Tensor) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ConfigError(f"views: expected an image tensor [3, H, W], got shape {tuple(image.shape)}")
