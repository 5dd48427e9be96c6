"""Decoding only a crop's box (libturbojpeg through ctypes) against PIL's decode of the whole image as the oracle:
the same pixels for every box, DCT reduction and chroma subsampling; the crops it feeds equal those of the
whole-image decode; bad input is one clear line."""

from __future__ import annotations

import io
import platform

import numpy as np
import pytest
import torch
from PIL import Image

from vgg.config import ScaleRange
from vgg.data import transforms, turbojpeg
from vgg.data.transforms import (CentreCrop, TrainCrop, decode_box, decode_rgb, decoded_size, draft_factor,
                                 jpeg_size)
from vgg.errors import DataError


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Colour blobs plus noise: chroma varies between neighbouring px, so a wrong edge or offset shows."""
    rng = np.random.default_rng(seed)
    blobs = Image.fromarray(rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8))
    pixels = np.asarray(blobs.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    return Image.fromarray((pixels + rng.integers(-12, 13, pixels.shape)).clip(0, 255).astype(np.uint8))


def encode(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def decoder() -> turbojpeg.BoxDecoder:
    box_decoder = turbojpeg.decoder()
    if box_decoder is None:
        assert platform.machine() not in ("x86_64", "AMD64"), "the pinned turbojpeg wheel should provide libturbojpeg"
        pytest.skip("no libturbojpeg >= 3.0 on this platform: the loader decodes whole images")
    return box_decoder


@pytest.mark.parametrize("options", [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2},
                                     {"subsampling": 2, "progressive": True}, {"grey": True}],
                         ids=["444", "422", "420", "420-progressive", "grey"])
def test_every_box_is_the_same_pixels_as_the_whole_decode(decoder, options):
    rng = np.random.default_rng(0)
    for trial in range(40):
        width, height = int(rng.integers(9, 420)), int(rng.integers(9, 420))
        image = photo(width, height, trial)
        data = encode(image.convert("L")) if options.get("grey") else encode(image, **options)
        min_side = int(rng.integers(4, 200))
        whole = torch.from_numpy(np.array(decode_rgb(data, min_side=min_side))).permute(2, 0, 1)  # PIL, drafted
        assert (whole.shape[2], whole.shape[1]) == decoded_size((width, height), min_side)
        boxes = [(0, 0, whole.shape[2], whole.shape[1])]  # the whole image, then random boxes and 1 px slivers
        for _ in range(6):
            box_width, box_height = int(rng.integers(1, whole.shape[2] + 1)), int(rng.integers(1, whole.shape[1] + 1))
            boxes.append((int(rng.integers(0, whole.shape[2] - box_width + 1)),
                          int(rng.integers(0, whole.shape[1] - box_height + 1)), box_width, box_height))
        boxes.append((whole.shape[2] - 1, whole.shape[1] - 1, 1, 1))
        factor = draft_factor((width, height), min_side)
        for left, top, box_width, box_height in boxes:
            pixels = decoder.decode(data, size=(width, height), factor=factor, box=(left, top, box_width, box_height))
            expected = whole[:, top : top + box_height, left : left + box_width]
            assert torch.equal(pixels, expected), (width, height, factor, (left, top, box_width, box_height))


def test_crops_equal_those_of_the_whole_image_decode(decoder, monkeypatch):
    jpegs = [encode(photo(*size, seed)) for seed, size in enumerate([(500, 375), (375, 500), (130, 97), (600, 241)])]
    jpegs.append(encode(photo(300, 200, 9).convert("CMYK")))
    with pytest.raises(DataError):  # libturbojpeg cannot make RGB of CMYK: decode_box falls back to torchvision
        decoder.decode(jpegs[-1], size=(300, 200), factor=1, box=(0, 0, 300, 200))
    crops = [(TrainCrop(scale=ScaleRange(96, 256), crop=96), seed) for seed in range(12)]

    def run() -> list[torch.Tensor]:
        out = [transform(data, np.random.default_rng(seed)) for data in jpegs for transform, seed in crops]
        return out + [CentreCrop(q=128, crop=96)(data) for data in jpegs]

    boxed = run()
    monkeypatch.setattr(transforms.turbojpeg, "decoder", lambda: None)  # the platforms without libturbojpeg
    whole = run()
    assert all(torch.equal(a, b) for a, b in zip(boxed, whole))
    assert not all(torch.equal(boxed[0], other) for other in boxed[1:12])  # the crops differ: the check can fail


def test_a_box_outside_the_image_is_refused(decoder):
    data = encode(photo(64, 48, 0))
    with pytest.raises(ValueError, match="not inside the 64×48 image"):
        decoder.decode(data, size=(64, 48), factor=1, box=(10, 0, 60, 10))
    with pytest.raises(ValueError, match="not inside the 32×24 image decoded at 1/2"):
        decoder.decode(data, size=(64, 48), factor=2, box=(0, 0, 33, 10))


def test_bad_jpegs_are_one_line(decoder):
    data = encode(photo(64, 48, 0))
    for bad, reason in ((b"\xff\xd8" + b"\x00" * 200, "corrupt JPEG: no frame header"),
                        (data[: data.index(b"\xff\xc0") + 20], "cannot decode JPEG")):  # ends after the frame header
        with pytest.raises(DataError, match=reason) as error:
            decode_box(bad, size=jpeg_size(bad), min_side=32, box=(0, 0, 32, 32))
        assert "\n" not in str(error.value) and "re-run `vgg ingest`" in str(error.value)


def test_a_failed_decode_leaves_the_next_image_intact(decoder):
    # libturbojpeg 3.0 keeps state from a failed decode: the next header could report the failed image's size.
    small, big = encode(photo(64, 48, 0)), encode(photo(500, 375, 1))
    whole = torch.from_numpy(np.array(decode_rgb(big, min_side=None))).permute(2, 0, 1)
    for bad in (small[: small.index(b"\xff\xc0") + 20], b"\xff\xd8" + b"\x00" * 200):
        with pytest.raises(DataError, match="cannot decode JPEG"):
            decoder.decode(bad, size=(64, 48), factor=1, box=(0, 0, 64, 48))
        assert torch.equal(decoder.decode(big, size=(500, 375), factor=1, box=(0, 0, 500, 375)), whole)
