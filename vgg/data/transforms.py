"""Image transforms: the training augmentation of §3.1 and the isotropic rescale used at test time (§3.2).

Scale convention (§3.1): an image is rescaled isotropically so that its smallest side is S (training) or Q
(testing) px; the other side is truncated to whole px, as torchvision's `resize` (`scaled_size`).

Resampling: antialiased bicubic. `rescale` (PIL images, used by evaluation) is PIL's bicubic resize, whose
filter support widens with the downscale factor (antialiasing). The training hot path resamples uint8 tensors
with the kernel of `torch.nn.functional.interpolate(mode="bicubic", antialias=True)`, which implements the
same filter: it matches PIL within 2 grey levels (mean < 0.15) and is 4–6× faster here. Training resamples only
the crop window of the rescaled image, straight from the decoded image; the window's origin is rounded to a
whole source pixel (within ½ source px of the exact window) and its border pixels see no neighbours outside it.

Decoding: libjpeg-turbo. Training and validation crops decode only the window's box of the image
(`vgg.data.turbojpeg`, the same pixels as a full decode) where libturbojpeg ≥ 3.0 is installed, else the whole
image through torchvision's decode op (bit-identical to PIL's decoder, ~1.3× faster; torchvision 0.29
deprecates its decoders in favour of TorchCodec). When the image is at least twice the target scale, both decode
it at 1/2, 1/4 or 1/8 size in the DCT (PIL's draft mode), which is much cheaper, keeping the smallest side ≥ the
target scale.
"""

from __future__ import annotations

import functools
import importlib
import io
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vgg.config import ScaleRange
from vgg.data import turbojpeg
from vgg.errors import ConfigError, DataError

# JPEG start-of-frame markers (SOF0–SOF15 less DHT 0xC4, JPG 0xC8, DAC 0xCC): the segment holding the size.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0–RST7, SOI, EOI.
_STANDALONE = frozenset([0x01, *range(0xD0, 0xDA)])


def jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """(width, height) in px from the JPEG's start-of-frame header, without decoding (a few µs)."""
    if jpeg[:2] != b"\xff\xd8":
        raise DataError("not a JPEG: missing the start-of-image marker; re-run `vgg ingest` on the source")
    at, end = 2, len(jpeg) - 9
    while at < end:
        if jpeg[at] != 0xFF:
            break
        marker = jpeg[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
        elif marker in _SOF:
            height, width = struct.unpack_from(">HH", jpeg, at + 5)
            return width, height
        elif marker in _STANDALONE:
            at += 2
        else:
            at += 2 + struct.unpack_from(">H", jpeg, at + 2)[0]
    raise DataError("corrupt JPEG: no frame header found; re-run `vgg ingest` on the source")


def scaled_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) after an isotropic rescale of an image of `size` so that its smallest side is `side`."""
    width, height = size
    if width <= height:  # the long side is truncated, as torchvision's `resize(img, side)`
        return side, int(side * height / width)
    return int(side * width / height), side


def draft_factor(size: tuple[int, int], min_side: int | None) -> int:
    """The DCT reduction (1, 2, 4 or 8) at which `decode_rgb(min_side=...)` decodes a JPEG of `size` (width,
    height): the largest that keeps both sides ≥ `min_side` (PIL's JPEG draft rule)."""
    if min_side is None:
        return 1
    fits = min(size[0] // min_side, size[1] // min_side)
    return next(factor for factor in (8, 4, 2, 1) if fits >= factor or factor == 1)


def decode_rgb(jpeg: bytes, *, min_side: int | None) -> Image.Image:
    """Decode JPEG bytes to an RGB PIL image, in the DCT at 1/2, 1/4 or 1/8 size (draft mode) when that keeps the
    smallest side ≥ `min_side` px (None: full size). Draft decoding is a box-like downscale, close to an
    antialiased resize, and several times cheaper than decoding at full size."""
    try:
        image = Image.open(io.BytesIO(jpeg))
        if min_side is not None:
            image.draft("RGB", (min_side, min_side))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"cannot decode image: {error}; re-run `vgg ingest` on the source") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def rescale(image: Image.Image, side: int) -> Image.Image:
    """Isotropic rescale so that the smallest side is `side` px (§3.1/§3.2), antialiased bicubic (PIL)."""
    size = scaled_size(image.size, side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def decode_chw(jpeg: bytes, *, min_side: int) -> torch.Tensor:
    """Decode JPEG bytes to uint8 [3, H, W] (RGB); in the DCT at a reduced size when the smallest side is ≥ 2 ×
    `min_side` (as `decode_rgb`), else at full size with torchvision (same libjpeg-turbo pixels, less overhead)."""
    width, height = jpeg_size(jpeg)
    if min(width, height) >= 2 * min_side:
        image = decode_rgb(jpeg, min_side=min_side)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return pixels.view(image.height, image.width, 3).permute(2, 0, 1)
    try:
        # The op behind torchvision.io.decode_jpeg (pinned torchvision 0.29), called directly: the wrapper warns
        # on every call that torchvision's decoders are deprecated for TorchCodec, which costs ~80 µs per image.
        data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
        return jpeg_decoder()(data, _READ_RGB, False)
    except RuntimeError as error:
        raise DataError(f"cannot decode JPEG: {error}; re-run `vgg ingest` on the source") from None


_READ_RGB = 3  # torchvision.io.ImageReadMode.RGB.value


@functools.cache
def jpeg_decoder():
    """torchvision's decode_jpeg op, loaded on first use: `import torchvision` (which registers torch.ops.image)
    costs ~2.5 s here, paid by every `vgg` process that imports this module but may never decode at full size."""
    importlib.import_module("torchvision")
    return torch.ops.image.decode_jpeg


def preload_decoder() -> None:
    """Load the decoder that `decode_box` will use in this process. Loaders call it before forking their worker
    processes, which then inherit it rather than each loading it again, once per epoch's workers: libturbojpeg,
    or where it is missing torchvision (whose import costs ~2.5 s here)."""
    if turbojpeg.decoder() is None:
        jpeg_decoder()


def decoded_size(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """(width, height) at which `decode_chw(min_side=...)` decodes a JPEG of `size`: reduced by `draft_factor`,
    rounded up as libjpeg does."""
    factor = draft_factor(size, min_side)
    return -(-size[0] // factor), -(-size[1] // factor)


def decode_box(jpeg: bytes, *, size: tuple[int, int], min_side: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The box (left, top, width, height in px of the decoded image) of `decode_chw(jpeg, min_side=min_side)`, as
    uint8 [3, height, width] with channels-last strides; `size` is the JPEG's (`jpeg_size`). Only the box is
    decoded where libturbojpeg ≥ 3.0 is installed (`vgg.data.turbojpeg`: the same pixels); elsewhere the whole
    image, then sliced."""
    box_decoder = turbojpeg.decoder()
    if box_decoder is not None:
        try:
            return box_decoder.decode(jpeg, size=size, factor=draft_factor(size, min_side), box=box)
        except DataError:  # e.g. CMYK, which libturbojpeg cannot turn into RGB: torchvision can, or says why not
            pass
    left, top, width, height = box
    return decode_chw(jpeg, min_side=min_side)[:, top : top + height, left : left + width]


@dataclass(frozen=True)
class Window:
    """Where a crop × crop window of the image rescaled to smallest side `side` lies in the image itself."""

    box: tuple[int, int, int, int]  # left, top, width, height in source px
    scale: tuple[float, float] | None  # (fy, fx): the full rescale's factors; None: S is the image's own size


def window_of(size: tuple[int, int], *, side: int, left: int, top: int, crop: int, flip: bool) -> Window:
    """The source box of the window at (left, top) of an image of `size` (width, height) rescaled to smallest side
    `side`: the whole source px that the window's resampling reads, ceil(crop / f) of them per axis, the origin
    rounded to a whole source px (within ½ px of the exact window). A flipped window rounds its right edge
    instead, so that its mirror image (`resample`) is within ½ px of the exact window's mirror image too."""
    width, height = size
    scaled_width, scaled_height = scaled_size(size, side)
    if (scaled_width, scaled_height) == size:
        return Window((left, top, crop, crop), None)
    fy, fx = scaled_height / height, scaled_width / width
    span_y, span_x = min(math.ceil(crop / fy), height), min(math.ceil(crop / fx), width)
    y0 = min(int(top / fy + 0.5), height - span_y)
    if flip:
        x0 = max(min(int((left + crop) / fx + 0.5), width), span_x) - span_x
    else:
        x0 = min(int(left / fx + 0.5), width - span_x)
    return Window((x0, y0, span_x, span_y), (fy, fx))


def resample(pixels: torch.Tensor, window: Window, *, crop: int, flip: bool) -> torch.Tensor:
    """The window's pixels (uint8 or float [3, h, w], the source box of `window`) as [3, crop, crop] channels-last,
    mirrored left–right when `flip`.

    Resampling: the kernel of `F.interpolate(mode="bicubic", antialias=True)` through the binding it calls, which
    takes both the output size and the full rescale's factors (F.interpolate cannot), vertical pass first: its
    horizontal pass costs ~2× the vertical one per output px here, and then runs on crop rather than
    ceil(crop / f) rows (~15% less time). The window's one copy (a contiguous channels-last input resamples ~2.5×
    faster than a strided one) also mirrors it.
    """
    pixels_hwc = pixels.permute(1, 2, 0)
    # [1, h, w, 3] viewed as NCHW: strides the resampler takes as channels-last, its fast path.
    source = (pixels_hwc.flip(1) if flip else pixels_hwc.contiguous())[None].permute(0, 3, 1, 2)
    if window.scale is None:
        return source[0]
    fy, fx = window.scale
    upsample = torch._C._nn._upsample_bicubic2d_aa
    rows_done = upsample(source, [crop, source.shape[3]], False, fy, 1.0)
    return upsample(rows_done, [crop, crop], False, 1.0, fx)[0]


def crop_window(image: torch.Tensor, *, side: int, left: int, top: int, crop: int, flip: bool) -> torch.Tensor:
    """The crop × crop window at (left, top) of `image` (uint8 or float [3, h, w]) rescaled to smallest side
    `side`, as [3, crop, crop] channels-last, mirrored left–right when `flip` (`window_of`, then `resample`)."""
    window = window_of((image.shape[2], image.shape[1]), side=side, left=left, top=top, crop=crop, flip=flip)
    x, y, width, height = window.box
    return resample(image[:, y : y + height, x : x + width], window, crop=crop, flip=flip)


def _window_crop(
    jpeg: bytes, *, side: int, crop: int, flip: bool, place: Callable[[int, int], tuple[int, int]]
) -> torch.Tensor:
    """The crop × crop window of `jpeg` rescaled to smallest side `side`, at the (left, top) that `place` gives for
    the rescaled image's (width, height), mirrored when `flip`; decoded no further than the window needs."""
    size = jpeg_size(jpeg)
    decoded = decoded_size(size, side)
    left, top = place(*scaled_size(decoded, side))
    window = window_of(decoded, side=side, left=left, top=top, crop=crop, flip=flip)
    return resample(decode_box(jpeg, size=size, min_side=side, box=window.box), window, crop=crop, flip=flip)


@dataclass(frozen=True)
class TrainCrop:
    """The training augmentation of §3.1 for one image: S ~ U[s_min, s_max] (integers, inclusive; fixed S when
    equal), isotropic rescale to smallest side S, one random crop × crop window, random horizontal flip.

    `transform(jpeg, rng) -> uint8 [3, crop, crop]`; all randomness comes from `rng` (one `rng.random(4)` call),
    so a generator seeded per sample makes the output independent of the worker layout.
    """

    scale: ScaleRange
    crop: int  # px (224, §2.1)

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.scale.s_min:
            raise ConfigError(
                f"crop: must be in 1..s_min={self.scale.s_min} px to fit the rescaled image, got {self.crop}"
            )

    def __call__(self, jpeg: bytes, rng: np.random.Generator) -> torch.Tensor:
        u_side, u_left, u_top, u_flip = rng.random(4).tolist()  # Python floats: cheaper arithmetic than numpy's
        side = self.scale.s_min + int(u_side * (self.scale.s_max - self.scale.s_min + 1))
        crop = self.crop
        return _window_crop(jpeg, side=side, crop=crop, flip=u_flip < 0.5,
                            place=lambda width, height: (int(u_left * (width - crop + 1)),
                                                         int(u_top * (height - crop + 1))))


@dataclass(frozen=True)
class CentreCrop:
    """Validation during training (§3.2, single scale): rescale to smallest side Q, the centre crop × crop window
    (offsets floored, as evaluation's grid), no flip. `transform(jpeg) -> uint8 [3, crop, crop]`."""

    q: int  # px
    crop: int  # px

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.q:
            raise ConfigError(f"crop: must be in 1..Q={self.q} px to fit the rescaled image, got {self.crop}")

    def __call__(self, jpeg: bytes) -> torch.Tensor:
        crop = self.crop
        return _window_crop(jpeg, side=self.q, crop=crop, flip=False,
                            place=lambda width, height: ((width - crop) // 2, (height - crop) // 2))
