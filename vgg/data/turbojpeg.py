"""Decode only a box of a JPEG: libjpeg-turbo's TurboJPEG 3 API (`tj3SetCroppingRegion`), through ctypes.

Training uses one crop window of each image, and at S = 256 that window is ~60% of a 500×375 image, at S = 512
~15%: libjpeg-turbo then skips the inverse DCT, upsampling and colour conversion of the rows above and below the
box and of the columns (whole iMCUs, 8–32 px) left and right of it (only the entropy decoding of the skipped rows
remains), which saves ~15% of a full decode's time at S = 256 and ~45% at S = 512 here. PIL and torchvision
expose no cropped decode.

The library comes from the pinned `turbojpeg` wheel (Linux x86_64: it bundles libturbojpeg 3.0; its Python module,
which has no cropped decode, is not used) or the system's libturbojpeg ≥ 3.0. Where neither exists `decoder()` is
None and callers decode the whole image (`vgg.data.transforms.decode_box`).

Pixels: a box decodes to exactly the pixels of a full decode (same libjpeg-turbo, same scaled IDCT as PIL's
draft mode for 1/2, 1/4, 1/8), once the box's left and right edges are not the decoded region's: there libjpeg-
turbo's chroma upsampling lacks its neighbour column, so the region extends ≥ 1 px past the box where the image
does, and is ≥ 16 px wide (tested against PIL's full decode).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import threading
from pathlib import Path
from typing import NoReturn

import torch

from vgg.errors import DataError

_DECOMPRESS = 1  # TJINIT_DECOMPRESS
_SUBSAMP, _JPEG_WIDTH, _JPEG_HEIGHT = 4, 5, 6  # TJPARAM_*
_PF_RGB = 0  # TJPF_RGB
_FATAL = 1  # TJERR_FATAL; TJERR_WARNING (0) is a recoverable problem (e.g. extraneous bytes), decoded as PIL does
# iMCU width in px per TJSAMP_444, 422, 420, GRAY, 440, 411, 441 (turbojpeg.h: tjMCUWidth).
_MCU_WIDTH = (8, 16, 16, 8, 8, 32, 8)


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _Scaling(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


def _library_path() -> str | None:
    spec = importlib.util.find_spec("turbojpeg")
    if spec is not None and spec.origin is not None:
        bundled = sorted((Path(spec.origin).parent / "turbojpeg.libs").glob("libturbojpeg*.so*"))
        if bundled:
            return str(bundled[0])
    return ctypes.util.find_library("turbojpeg")


@functools.cache
def _library() -> ctypes.CDLL | None:
    path = _library_path()
    try:
        library = ctypes.CDLL(path) if path else None
    except OSError:
        return None
    if library is None or not hasattr(library, "tj3SetCroppingRegion"):  # TurboJPEG 2 has no tj3 API
        return None
    handle, buffer, size = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t
    library.tj3Init.restype, library.tj3Init.argtypes = handle, [ctypes.c_int]
    library.tj3Destroy.restype, library.tj3Destroy.argtypes = None, [handle]
    library.tj3DecompressHeader.argtypes = [handle, buffer, size]
    library.tj3Get.argtypes = [handle, ctypes.c_int]
    library.tj3SetScalingFactor.argtypes = [handle, _Scaling]
    library.tj3SetCroppingRegion.argtypes = [handle, _Region]
    library.tj3Decompress8.argtypes = [handle, buffer, size, buffer, ctypes.c_int, ctypes.c_int]
    library.tj3GetErrorStr.restype, library.tj3GetErrorStr.argtypes = ctypes.c_char_p, [handle]
    library.tj3GetErrorCode.argtypes = [handle]
    return library


class _Handle:
    """A TurboJPEG decompressor, destroyed with its owner (a thread's local data)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library
        self.handle = library.tj3Init(_DECOMPRESS)
        if not self.handle:
            raise MemoryError("TurboJPEG could not allocate a decompressor")

    def __del__(self) -> None:
        self._library.tj3Destroy(self.handle)


class BoxDecoder:
    """`decode(jpeg, size=(w, h), factor=f, box=(left, top, width, height))` → uint8 [3, height, width] (channels-
    last strides): that box of the image decoded at 1/f size (f = 1, 2, 4 or 8; the box in the reduced image's
    px). `size` is the JPEG's own, from its frame header (`vgg.data.transforms.jpeg_size`): libturbojpeg 3.0 can
    return success on a header it could not parse and report the previous image's size, so the two must agree.
    One TurboJPEG handle per thread (a handle is not thread-safe), replaced after any failure."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library
        self._local = threading.local()

    def _handle(self) -> int:
        owner = getattr(self._local, "handle", None)
        if owner is None:
            owner = self._local.handle = _Handle(self._library)
        return owner.handle

    def decode(
        self, jpeg: bytes, *, size: tuple[int, int], factor: int, box: tuple[int, int, int, int]
    ) -> torch.Tensor:
        library, handle = self._library, self._handle()
        if library.tj3DecompressHeader(handle, jpeg, len(jpeg)) != 0:
            self._fail(handle)
        if (library.tj3Get(handle, _JPEG_WIDTH), library.tj3Get(handle, _JPEG_HEIGHT)) != size:
            self._fail(handle, "libturbojpeg could not read its frame header")
        subsampling = library.tj3Get(handle, _SUBSAMP)
        width, height = -(-size[0] // factor), -(-size[1] // factor)  # libjpeg rounds scaled sizes up
        left, top, box_width, box_height = box
        if not (0 <= left and 0 <= top and 0 < box_width <= width - left and 0 < box_height <= height - top):
            raise ValueError(f"box {box} is not inside the {width}×{height} image decoded at 1/{factor}")
        if library.tj3SetScalingFactor(handle, _Scaling(1, factor)) != 0:
            self._fail(handle)
        # The region starts on an iMCU boundary (a TurboJPEG requirement) ≥ 1 px left of the box and ends ≥ 1 px
        # right of it, where the image extends that far (see the module doc), and is ≥ 16 px wide: libjpeg-turbo
        # upsamples chroma less than 3 samples wide without interpolation. An unknown subsampling decodes whole rows.
        mcu = -(-_MCU_WIDTH[subsampling] // factor) if 0 <= subsampling < len(_MCU_WIDTH) else width
        x = max(left - 1, 0) // mcu * mcu
        region = _Region(x, top, min(max(left + box_width + 1, x + 16), width) - x, box_height)
        if library.tj3SetCroppingRegion(handle, region) != 0:
            self._fail(handle)
        pixels = torch.empty((region.h, region.w, 3), dtype=torch.uint8)
        if library.tj3Decompress8(handle, jpeg, len(jpeg), pixels.data_ptr(), region.w * 3, _PF_RGB) != 0:
            if library.tj3GetErrorCode(handle) == _FATAL:
                self._fail(handle)
            self._local.handle = None  # a warning: the image is decoded, the handle's state is not to be trusted
        return pixels[:, left - x : left - x + box_width].permute(2, 0, 1)

    def _fail(self, handle: int, reason: str | None = None) -> NoReturn:
        reason = reason or self._library.tj3GetErrorStr(handle).decode(errors="replace")
        self._local.handle = None  # a fresh handle for the next image
        raise DataError(f"cannot decode JPEG: {reason}; re-run `vgg ingest` on the source")


@functools.cache
def decoder() -> BoxDecoder | None:
    """The box decoder, or None where no libturbojpeg ≥ 3.0 is installed."""
    library = _library()
    return BoxDecoder(library) if library is not None else None
