"""The network input from uint8 images, on the training device (`Preprocess`): the training set's mean RGB
subtracted (§2.1), and for training AlexNet's PCA lighting shift (§3.1), whose per-image coefficients the batch
streams draw with std `ALPHA_STD`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vgg.data.shard_format import ColourStats

ALPHA_STD = 0.1  # std of the PCA lighting coefficients (AlexNet, cited in §3.1)

# AlexNet's lighting noise is defined on pixels scaled to [0, 1]: offset = eigvec @ (alpha · λ) with λ the eigenvalues
# of the [0, 1]-scale RGB covariance (0.2175, 0.0188, 0.0045 for ImageNet, i.e. offsets of ~0.02 ≈ 5/255). Our
# stats are on the 0–255 scale, where λ₂₅₅ = 255² · λ₀₁; the same offset in 0–255 units is 255 · eigvec @ (alpha ·
# λ₀₁) = eigvec @ (alpha · λ₂₅₅ / 255). (Using λ₂₅₅ directly would add offsets of ~±270 levels and drown the image.)
LIGHTING_SCALE = 1.0 / 255.0


class Preprocess(nn.Module):
    """uint8 images → float32 network input on the training device, 0–255 scale (as the paper/Caffe; no division
    by a std): + the PCA colour shift eigvec @ (alpha · eigval / 255) per image when `colour` (alpha) is given
    (AlexNet lighting, §3.1; see LIGHTING_SCALE), − the training-set mean RGB (§2.1, the only pre-processing).
    Keeps the input's memory format (channels_last stays channels_last). Move it to the device with the model;
    copy batches with `.to(device, non_blocking=True)` before calling it."""

    def __init__(self, stats: ColourStats) -> None:
        super().__init__()
        self.register_buffer("mean_rgb", _float32(stats.mean_rgb))
        self.register_buffer("eigval", _float32(stats.eigval) * LIGHTING_SCALE)
        self.register_buffer("eigvec", _float32(stats.eigvec))

    def forward(self, images: Tensor, colour: Tensor | None = None) -> Tensor:
        shift = -self.mean_rgb.expand(images.shape[0], 3)
        if colour is not None:
            shift = shift + (colour.float() * self.eigval) @ self.eigvec.T  # row i: eigvec @ (alpha_i * eigval)
        return images.to(torch.float32, copy=True).add_(shift[:, :, None, None])


def _float32(values: object) -> Tensor:
    """A float32 copy of numbers (tuples from stats.json, or a tensor): the module owns its buffers."""
    return torch.as_tensor(values, dtype=torch.float32).detach().clone()
