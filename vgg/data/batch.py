"""The batches the loaders yield: decoded (`Batch`), or still JPEG bytes with their augmentation draws
(`RawBatch`) when the decode runs on the training device."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Batch(NamedTuple):
    """A batch as the loaders yield it. `images` is channels_last in memory (NHWC strides): the layout the
    decoder and the resampler produce (a transposing copy costs ~0.1 ms per 224² image) and the GPU step uses;
    `.contiguous()` gives NCHW."""

    images: Tensor  # uint8 [N, 3, crop, crop], RGB 0–255
    labels: Tensor  # int64 [N]
    colour: Tensor  # float32 [N, 3], PCA lighting alpha ~ N(0, 0.1) (zeros for validation)


class RawBatch(NamedTuple):
    """A training batch before decoding, as workers yield it when the decode runs on the device."""

    jpegs: list[bytes]
    draws: Tensor  # float64 [N, 4]: the uniforms TrainCrop draws per sample (S, left, top, flip)
    labels: Tensor  # int64 [N]
    colour: Tensor  # float32 [N, 3], PCA lighting alpha ~ N(0, 0.1)
