"""The training augmentation of §3.1 with the JPEG decode on the training device: a batch of JPEG bytes goes to
the device in one `torchvision.io.decode_jpeg(list, device=...)` call (nvJPEG on CUDA: the A100/H100 hardware
decoder for baseline JPEGs, CUDA kernels otherwise; libjpeg-turbo on the CPU), and each image then gets the same
random rescale/crop/flip as `vgg.data.transforms.TrainCrop`, resampled on the device.

Use it when the CPU decode workers cannot keep up with the GPU (≈ 500–700 decode+crop/s per core at the
paper's S = 256, benchmarks/input_pipeline.py; VGG-16 on an H100 wants several thousand images/s). The host then
only reads JPEG bytes and draws the per-sample uniforms; benchmarks/gpu.py measures both input paths against the
model step.

Same draws, same crop: `draws[i]` are the four uniforms `TrainCrop` takes from sample i's generator
(`rng.random(4)`: scale, left, top, flip), so a generator seeded per sample as the loader seeds it gives the same
S, the same window and the same flip. Pixels: the resampler (`crop_window`, the same antialiased bicubic) runs in
float32 here, because CUDA has no uint8 kernel for it, and in uint8 in TrainCrop on the CPU, whose intermediate
rounding and clamping differ: ≈ 0.15 grey levels on average, up to ~5 where the bicubic overshoots (measured on
generated images). TrainCrop decodes at full size when the image's smallest side is < 2 S — every image of the
paper profile except those ingest shrank to exactly 512 px, at S = 256. Larger images it decodes at 1/2, 1/4 or
1/8 size in the DCT (PIL draft mode), which nvJPEG cannot; here the full-size decode is box-averaged by the same
factor to the same (rounded-up) size instead, so the geometry stays TrainCrop's and the pixels differ by the two
filters as well (≈ 1 grey level on average). On CUDA, nvJPEG's IDCT and chroma upsampling differ from
libjpeg-turbo's too; benchmarks/gpu.py measures the difference on the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vgg.config import ScaleRange
from vgg.data.transforms import TrainCrop, crop_window, scaled_size
from vgg.errors import DataError


def decode_jpegs(jpegs: Sequence[bytes], *, device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG bytes to uint8 RGB [3, H, W] tensors on `device`: one batched nvJPEG call on CUDA (asynchronous
    to the host: the current stream waits for the decoder's), libjpeg-turbo image by image on the CPU."""
    if not jpegs:
        raise DataError("decode_jpegs: no JPEGs given; pass a non-empty batch of JPEG bytes")
    from torchvision.io import ImageReadMode, decode_jpeg  # imported on use: see transforms.jpeg_decoder

    data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 warns on every call that its decoders move to TorchCodec; the op is unchanged.
            warnings.simplefilter("ignore", DeprecationWarning)
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0]
        raise DataError(
            f"cannot decode a JPEG of the batch on {device}: {reason}; re-run `vgg ingest` on the source"
        ) from None
    return images


@dataclass(frozen=True)
class DeviceTrainCrop:
    """`TrainCrop` for a batch, decoded and resampled on the device.

    `transform(jpegs, draws, device=...) -> uint8 [N, 3, crop, crop]` on `device`, channels_last in memory (the
    layout of `vgg.data.batch.Batch.images`); feed it to `Preprocess` on the same device.
    """

    scale: ScaleRange
    crop: int  # px (224, §2.1)

    def __post_init__(self) -> None:
        TrainCrop(scale=self.scale, crop=self.crop)  # the same bounds, and the same ConfigError when violated

    def __call__(
        self, jpegs: Sequence[bytes], draws: Sequence[Sequence[float]], *, device: torch.device
    ) -> torch.Tensor:
        """`draws`: per JPEG, the four uniforms in [0, 1) that TrainCrop draws (`rng.random(4)`)."""
        if len(draws) != len(jpegs):
            raise DataError(f"DeviceTrainCrop: {len(jpegs)} JPEGs but {len(draws)} draws; give four uniforms per JPEG")
        crop, s_min, s_max = self.crop, self.scale.s_min, self.scale.s_max
        images = decode_jpegs(jpegs, device=device)
        out = torch.empty((len(images), crop, crop, 3), dtype=torch.uint8, device=device)
        for i, (image, draw) in enumerate(zip(images, draws)):
            u_side, u_left, u_top, u_flip = (float(u) for u in draw)
            side = s_min + int(u_side * (s_max - s_min + 1))  # TrainCrop's arithmetic from here on
            image = _draft_reduce(image.float(), side=side)
            width, height = scaled_size((image.shape[2], image.shape[1]), side)
            left = int(u_left * (width - crop + 1))
            top = int(u_top * (height - crop + 1))
            window = crop_window(image, side=side, left=left, top=top, crop=crop, flip=u_flip < 0.5)
            out[i] = window.round_().clamp_(0, 255).permute(1, 2, 0)
        return out.permute(0, 3, 1, 2)


def _draft_reduce(image: torch.Tensor, *, side: int) -> torch.Tensor:
    """`image` (float [3, H, W], 0–255) reduced as `vgg.data.transforms.decode_chw` would have decoded it for
    smallest side `side`: unchanged below 2 × side; else at 1/2, 1/4 or 1/8 size as PIL's JPEG draft mode picks it
    (the largest factor f ≤ min(W // side, H // side); size rounded up), by an f × f box average rounded to whole
    levels like a decoder's output."""
    height, width = image.shape[1:]
    if min(width, height) < 2 * side:
        return image
    most = min(width // side, height // side)
    factor = next(f for f in (8, 4, 2) if f <= most)
    # ceil_mode: the partial blocks at the right and bottom edges average only their pixels inside the image.
    return F.avg_pool2d(image[None], factor, factor, ceil_mode=True)[0].round_()
