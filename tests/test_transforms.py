"""Transforms on real JPEGs, against PIL and torchvision as oracles: the JPEG header size, draft decoding, the
isotropic rescale, and the §3.1 training crop (scale range, crop position, flip) read back from images whose
pixels encode their own coordinates."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from vgg.config import ScaleRange
from vgg.data.transforms import (
    CentreCrop,
    TrainCrop,
    crop_window,
    decode_chw,
    draft_factor,
    decode_rgb,
    jpeg_size,
    rescale,
    scaled_size,
)
from vgg.errors import ConfigError, DataError


def encode(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def smooth(width: int, height: int, seed: int = 0) -> Image.Image:
    """Blobs of colour ~width/5 px across, bicubically blended: texture a misplaced window cannot match."""
    cells = np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC)


def coordinates(width: int, height: int) -> bytes:
    """R = 255·x/(w−1), G = 255·y/(h−1), B = 128: every pixel says where it came from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 128)], axis=-1).round().astype(np.uint8)
    return encode(Image.fromarray(rgb), quality=98, subsampling=0)


def read_back(crop: torch.Tensor, *, width: int, height: int) -> tuple[float, float, float, bool]:
    """(S, left, top, flipped) of a training crop of `coordinates(width, height)`, from least-squares fits of the
    R and G ramps (a landscape image: the smallest side is the height, so S = scale_y · height)."""
    pixels = crop.double()
    steps = torch.arange(crop.shape[-1], dtype=torch.float64)
    slope_x, start_x = np.polyfit(steps, pixels[0].mean(0), 1)
    slope_y, start_y = np.polyfit(steps, pixels[1].mean(1), 1)
    scale_y = 255 / (height - 1) / slope_y  # output px per source px
    scale_x = 255 / (width - 1) / abs(slope_x)
    flipped = slope_x < 0
    first_x = start_x + slope_x * (crop.shape[-1] - 1) if flipped else start_x  # R at the window's left column
    left = (first_x * (width - 1) / 255 + 0.5) * scale_x - 0.5
    top = (start_y * (height - 1) / 255 + 0.5) * scale_y - 0.5
    return scale_y * height, left, top, flipped


def test_jpeg_size_reads_the_frame_header():
    image = smooth(123, 77)
    exif = Image.Exif()
    exif[0x010F] = "camera"
    for data in (encode(image), encode(image, progressive=True), encode(image, exif=exif.tobytes()),
                 encode(image.convert("L")), encode(image.convert("CMYK"))):
        assert jpeg_size(data) == (123, 77) == Image.open(io.BytesIO(data)).size
    png = io.BytesIO()
    image.save(png, "PNG")
    with pytest.raises(DataError, match="not a JPEG"):
        jpeg_size(png.getvalue())


def test_decode_rgb_drafts_to_at_least_min_side_and_matches_a_full_decode():
    image = smooth(800, 600)
    data = encode(image, quality=95)
    full = decode_rgb(data, min_side=None)
    assert full.size == (800, 600) and full.mode == "RGB"
    for min_side, size in ((100, (200, 150)), (150, (200, 150)), (160, (400, 300)), (301, (800, 600))):
        drafted = decode_rgb(data, min_side=min_side)
        assert drafted.size == size and min(drafted.size) >= min_side
        a = np.asarray(rescale(drafted, min_side), dtype=np.int16)
        b = np.asarray(rescale(full, min_side), dtype=np.int16)
        assert a.shape == b.shape and np.abs(a - b).mean() < 1.0
    assert decode_rgb(encode(image.convert("L")), min_side=None).mode == "RGB"
    cmyk = decode_rgb(encode(image.convert("CMYK")), min_side=None)
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk, dtype=np.int16) - np.asarray(full, dtype=np.int16)).mean() < 3
    with pytest.raises(DataError, match="cannot decode"):
        decode_rgb(data[:200], min_side=None)


def chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_decode_chw_is_the_pil_decode():
    data = encode(smooth(90, 70))
    assert torch.equal(decode_chw(data, min_side=40), chw(decode_rgb(data, min_side=None)))
    big = encode(smooth(400, 300))  # ≥ 2 × min_side: decoded in the DCT at 1/2
    assert torch.equal(decode_chw(big, min_side=100), chw(decode_rgb(big, min_side=100)))
    assert decode_chw(big, min_side=100).shape == (3, 150, 200)


@pytest.mark.parametrize("size", [(400, 300), (300, 400), (130, 97), (64, 64), (63, 200), (1000, 999)])
def test_draft_factor_is_the_reduction_pil_decodes_at(size):
    data = encode(smooth(*size))
    for min_side in (None, 16, 32, 40, 48, 100, 150, 256):
        factor = draft_factor(size, min_side)
        decoded = decode_rgb(data, min_side=min_side).size
        assert decoded == (-(-size[0] // factor), -(-size[1] // factor)), (min_side, factor, decoded)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (96, 72), (50, 50), (61, 200)])
def test_rescale_is_torchvision_bicubic_resize(size):
    image = smooth(*size)
    for side in (32, 48, 256):
        ours = rescale(image, side)
        reference = TF.resize(image, side, interpolation=InterpolationMode.BICUBIC)
        assert ours.size == reference.size == scaled_size(size, side) and min(ours.size) == side
        assert np.array_equal(np.asarray(ours), np.asarray(reference))
        # The training path's resampler (torch's antialiased bicubic) over a whole square window agrees within
        # 2 levels (it resamples rows first, PIL columns first: each rounds to uint8 between its passes); the
        # last 3 px of a window that stops inside the image see no neighbours beyond it.
        chw = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        side_px = min(ours.size)
        whole = crop_window(chw, side=side, left=0, top=0, crop=side_px, flip=False).int()
        expected = torch.from_numpy(np.asarray(ours).copy()).permute(2, 0, 1)[:, :side_px, :side_px].int()
        error = (whole - expected).abs()[:, :-3, :-3]
        assert error.max() <= 2 and error.float().mean() < 0.15


@pytest.mark.parametrize("size,scale,crop", [((500, 375), (256, 256), 224), ((96, 72), (40, 72), 32),
                                             ((60, 40), (48, 64), 32), ((640, 480), (40, 56), 32)])
def test_train_crop_shapes_and_determinism(size, scale, crop):
    data = encode(smooth(*size))
    transform = TrainCrop(scale=ScaleRange(*scale), crop=crop)
    out = transform(data, np.random.default_rng(3))
    assert out.shape == (3, crop, crop) and out.dtype == torch.uint8
    assert torch.equal(out, transform(data, np.random.default_rng(3)))


def test_fixed_scale_is_exact_and_the_crop_lies_inside_the_rescaled_image():
    width, height, crop = 120, 80, 32
    data = coordinates(width, height)
    for side in (40, 56, 72, 100):
        transform = TrainCrop(scale=ScaleRange(side, side), crop=crop)
        scaled_width, scaled_height = scaled_size((width, height), side)
        reads = [read_back(transform(data, np.random.default_rng(seed)), width=width, height=height)
                 for seed in range(40)]
        assert all(abs(s - side) < 0.5 for s, *_ in reads)
        lefts, tops = [r[1] for r in reads], [r[2] for r in reads]
        assert min(lefts) > -0.7 and max(lefts) < scaled_width - crop + 0.7
        assert min(tops) > -0.7 and max(tops) < scaled_height - crop + 0.7
        assert min(lefts) < 0.25 * (scaled_width - crop) and max(lefts) > 0.75 * (scaled_width - crop)


def test_jittered_scale_is_uniform_over_the_range_and_flips_half_the_time():
    width, height, crop = 150, 100, 32
    data = coordinates(width, height)
    transform = TrainCrop(scale=ScaleRange(40, 72), crop=crop)
    reads = [read_back(transform(data, np.random.default_rng(seed)), width=width, height=height) for seed in range(300)]
    sides = np.array([r[0] for r in reads])
    assert np.abs(sides - sides.round()).max() < 0.3  # integer S
    assert set(sides.round().astype(int)) == set(range(40, 73))  # every S of U[40, 72], both ends included
    # ±4.5σ and ±2.5σ of 300 draws
    assert abs(sides.mean() - 56) < 2.5 and abs(sides.std() - np.sqrt((33**2 - 1) / 12)) < 1.0
    flips = sum(r[3] for r in reads)
    assert 120 < flips < 180


def test_flip_is_a_mirror_image():
    # S = crop on a square image: the crop is the whole rescaled image, so only the flip varies.
    data = encode(smooth(64, 64))
    transform = TrainCrop(scale=ScaleRange(32, 32), crop=32)
    outs = [transform(data, np.random.default_rng(seed)) for seed in range(30)]
    plain = torch.from_numpy(np.asarray(rescale(decode_rgb(data, min_side=32), 32)).copy()).permute(2, 0, 1)
    kinds = [torch.equal(out, plain) - torch.equal(out, plain.flip(-1)) for out in outs]
    assert set(kinds) == {1, -1}  # every crop is the image or its mirror image, and both occur


def test_train_crop_is_a_window_of_the_rescaled_image():
    # Oracle: PIL's rescale of the same (draft) decode, all windows of it and of its mirror image.
    def windows_of(data: bytes, side: int, crop: int) -> torch.Tensor:
        image = rescale(decode_rgb(data, min_side=side), side)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()
        return pixels.unfold(1, crop, 1).unfold(2, crop, 1)  # [3, rows, cols, crop, crop]

    def errors(out: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        views = (out.float(), out.flip(-1).float())
        return torch.stack([(windows - view[:, None, None]).abs().mean((0, 3, 4)) for view in views])

    # 128×96 at S = 48: decoded at 1/2 in the DCT, no resampling: exactly a window.
    data, crop = encode(smooth(128, 96, seed=5), quality=95), 32
    windows = windows_of(data, 48, crop)
    transform = TrainCrop(scale=ScaleRange(48, 48), crop=crop)
    origins = set()
    for seed in range(12):
        error = errors(transform(data, np.random.default_rng(seed)), windows)
        assert error.min() == 0
        origins.add(np.unravel_index(error.argmin().item(), error.shape))
    assert len(origins) >= 10 and {flip for flip, _, _ in origins} == {0, 1}
    # 150×100 at S = 64: resampled; the window's origin is rounded to a source pixel, so it sits between the
    # rescaled image's integer windows: close to one, far from all but its neighbours.
    data = encode(smooth(150, 100, seed=6), quality=95)
    windows = windows_of(data, 64, crop)
    transform = TrainCrop(scale=ScaleRange(64, 64), crop=crop)
    for seed in range(8):
        error = torch.sort(errors(transform(data, np.random.default_rng(seed)), windows).flatten()).values
        assert error[0] < 3 and error[20] > 4 * error[0]


def test_centre_crop_is_the_centre_of_the_rescaled_image():
    data = encode(smooth(100, 60))
    crop = CentreCrop(q=60, crop=32)(data)  # no resampling at Q = smallest side: exact
    full = torch.from_numpy(np.asarray(decode_rgb(data, min_side=None)).copy()).permute(2, 0, 1)
    assert torch.equal(crop, full[:, 14:46, 34:66])
    resized = CentreCrop(q=48, crop=32)(data).int()
    reference = torch.from_numpy(np.asarray(rescale(decode_rgb(data, min_side=None), 48)).copy()).permute(2, 0, 1).int()
    assert (resized - reference[:, 8:40, 24:56]).abs().float().mean() < 1.5


def test_crop_larger_than_the_scale_is_a_config_error():
    with pytest.raises(ConfigError, match="crop"):
        TrainCrop(scale=ScaleRange(32, 64), crop=48)
    with pytest.raises(ConfigError, match="crop"):
        CentreCrop(q=40, crop=48)
