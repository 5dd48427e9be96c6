"""Testing (§3.2): run a model over a split and keep every image's softmax class posterior.

Per image and per test scale Q (smallest side after an isotropic rescale):
- dense: the whole image goes through the fully-convolutional net (`VGG.score_map`), the class score map
  is averaged spatially, softmax; the same for the horizontally flipped image, and the two posteriors averaged;
- multi-crop: softmax of each of the grid² crops and their flips (50 for the paper's 5 × 5 grid), averaged;
- dense+multi-crop: the average of the two posteriors.
Multi-scale testing averages the posteriors over the Q set; fusion (`fuse`) averages several models'.

The result is a `vgg.evaluate.results.Posteriors` (saved as `.npz`; fused there too).
"""

from __future__ import annotations

import os
from collections import defaultdict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from vgg.config import ScaleKind, ScaleRange
from vgg.data.preprocessing import Preprocess
from vgg.data.samples import iter_samples
from vgg.data.shard_format import read_index, read_stats
from vgg.data.transforms import decode_rgb, draft_factor, jpeg_size
from vgg.errors import ConfigError, DataError
from vgg.evaluate.dense import dense_scores, pad_to, padded_shape, rescaled_shape
from vgg.evaluate.results import Posteriors
from vgg.evaluate.views import at_scale, dense_views, multicrop_views
from vgg.models import VGG, checkpoint

Mode = Literal["dense", "multicrop", "dense+multicrop"]
MODES: tuple[str, ...] = ("dense", "multicrop", "dense+multicrop")
Precision = Literal["auto", "fp32", "bf16"]

# Decoded views of several shapes wait until a shape has a full batch; past this many pending views
# (× batch_size) the fullest shape is run anyway, which bounds memory when shapes rarely repeat.
_PENDING_BATCHES = 4
# On CUDA, dense images are padded to their long side rounded up to a multiple of this (px): the net's total
# stride, one cell of the last feature map (see EvalOptions.pad_multiple).
_CUDA_PAD_MULTIPLE = 32

# A batch of uint8 views [N, 3, H, W] and, when padded, each view's own (height, width) [N, 2] → a result [N, ...].
_Batch = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def scale_meta(scale: ScaleRange, *, kind: ScaleKind) -> dict[str, Any]:
    """The `train_scale` entry of the meta `vgg.report` reads: the training S and its kind, the profile's name for
    it (`low`, `high`, `jitter`): the report lines our rows up with the paper's by kind, so the small profile's S=40
    sits beside the paper's S=256."""
    return {"label": scale.label(), "s_min": scale.s_min, "s_max": scale.s_max, "kind": kind}


def checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The meta entries a checkpoint determines: `config` and `train_scale` (with the kind it records). Pass as
    `meta=` to `compute_posteriors`, so the report can place the result."""
    payload = checkpoint.read_header(path)
    return {"config": payload["config"],
            "train_scale": scale_meta(ScaleRange(**payload["scale"]), kind=payload["scale_kind"])}


class _Sample(Protocol):
    """What evaluation needs of `vgg.data.samples.Sample`."""

    key: str
    jpeg: bytes
    label: int


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate (§3.2), checked here once: what `compute_posteriors` and `score_samples` run.

    `mode`: dense, multicrop or dense+multicrop. `scales`: the test scales Q, px (one for single-scale, e.g.
    `ScaleRange.single_q`; three for multi-scale, `ScaleRange.multi_q`). `keep_scales`: some of those whose own
    posteriors are kept too (`result.at_scale(q)`, the same as a single-scale pass at q): Table 3's Q is one of
    Table 4's three, so one pass gives both. `crop` (default: the model's) must equal the model's crop.
    `grid`: multi-crop crops per side (5 × 5 × 2 flips = 50 views per scale).
    `batch_size`: views per forward pass — crops (multi-crop) or whole images padded to one shape (dense; an
    image and its flip count as two). `device`: where the model runs. `precision`: "bf16" autocast, "fp32", or
    "auto" (bf16 on CUDA only). `channels_last`: NHWC activations (the model is converted in place; several times
    faster for the small profile's narrow convs on CPU, see benchmarks/evaluation.py). `workers`: threads that
    decode and rescale ahead of the model (0 = inline).
    `pad_multiple`: dense images at one Q are padded (masked, so their posteriors do not change:
    `vgg.evaluate.dense`) to their long side rounded up to a multiple of this many px, so that batches come in a
    few shapes; 1 = batches of exactly equal sizes only, no padding. None: 32 (one cell of the last feature map)
    on CUDA, 1 elsewhere. `fixed_batches`: every batch is padded to `batch_size` views, so that with the shapes
    the batch size is fixed too and cuDNN, told to choose once per shape (`cudnn.benchmark`), keeps its choice
    between batches; None: on CUDA. `buffer_images`: at most this many images wait, still JPEG-compressed, for
    others of their shape to fill a batch.
    """

    mode: Mode
    scales: tuple[int, ...]
    keep_scales: tuple[int, ...] = ()
    crop: int | None = None
    grid: int = 5
    batch_size: int = 64
    device: str | torch.device = "cpu"
    precision: Precision = "fp32"
    channels_last: bool = False
    workers: int = 0
    pad_multiple: int | None = None
    fixed_batches: bool | None = None
    buffer_images: int = 2048

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(int(q) for q in self.scales))
        object.__setattr__(self, "keep_scales", tuple(int(q) for q in self.keep_scales))
        if self.mode not in MODES:
            raise ConfigError(f"mode: unknown evaluation mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not self.scales:
            raise ConfigError("scales: give at least one test scale Q")
        if not set(self.keep_scales) <= set(self.scales):
            raise ConfigError(
                f"keep_scales: {list(self.keep_scales)} must be among the test scales {list(self.scales)}"
            )
        if self.grid < 1 or self.batch_size < 1 or self.workers < 0:
            raise ConfigError(
                f"grid, batch_size must be >= 1 and workers >= 0; got {self.grid}, {self.batch_size}, {self.workers}"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision: must be auto, fp32 or bf16, got {self.precision!r}")
        if (self.pad_multiple is not None and self.pad_multiple < 1) or self.buffer_images < 1:
            raise ConfigError(
                f"pad_multiple, buffer_images: must be >= 1; got {self.pad_multiple}, {self.buffer_images}"
            )
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"device: not a torch device: {self.device!r}") from None

    def crop_for(self, model: VGG) -> int:
        """The crop, px, checked against `model` and the test scales."""
        crop = model.crop if self.crop is None else self.crop
        if crop != model.crop:
            raise ConfigError(
                f"crop: {crop} px, but VGG-{model.name} was built for {model.crop} px crops; use its crop"
            )
        if min(self.scales) < crop:
            raise ConfigError(
                f"scales: test scale Q={min(self.scales)} px is smaller than the crop ({crop} px); use Q >= crop"
            )
        return crop

    @property
    def bf16(self) -> bool:
        """bf16 autocast. `auto`: bf16 on CUDA; fp32 on CPU, where bf16 shifts the posteriors for little gain at
        evaluation batch sizes (measure with benchmarks/evaluation.py)."""
        cuda = torch.device(self.device).type == "cuda"
        return self.precision == "bf16" or (self.precision == "auto" and cuda)

    @property
    def padding(self) -> int:
        """`pad_multiple` resolved for the device."""
        if self.pad_multiple is not None:
            return self.pad_multiple
        return _CUDA_PAD_MULTIPLE if torch.device(self.device).type == "cuda" else 1

    @property
    def fixed(self) -> bool:
        """`fixed_batches` resolved for the device."""
        return torch.device(self.device).type == "cuda" if self.fixed_batches is None else self.fixed_batches


def compute_posteriors(
    model: VGG,
    shards_dir: str | os.PathLike[str],
    split: str,
    options: EvalOptions,
    *,
    preprocess: nn.Module | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Posteriors:
    """Posteriors of `model` on every image of `split` in the shards at `shards_dir` (§3.2), as `options` say.

    The model is moved to `options.device` and run in eval mode (its train/eval mode is restored afterwards).
    `preprocess`: uint8 → float input transform; default `Preprocess(read_stats(shards_dir))` (the training
    set's mean RGB subtracted, §2.1; no colour shift). torchvision's weights expect their own normalisation: pass
    `vgg.models.io.TorchvisionNormalize()`. `meta`: entries added to the result's meta (e.g.
    `train_scale=scale_meta(...)`, which the report needs).
    """
    index = read_index(shards_dir)
    count = index.split(split).count
    if count == 0:
        raise DataError(f"{shards_dir}: split {split!r} has no images; re-run `vgg ingest` with data for it")
    if model.num_classes != len(index.classes):
        raise DataError(
            f"{shards_dir}: the model has {model.num_classes} classes but the shards have {len(index.classes)}; "
            "evaluate a checkpoint trained on these shards' classes"
        )
    if preprocess is None:
        preprocess = Preprocess(read_stats(shards_dir))
    return score_samples(model, iter_samples(shards_dir, split), options, preprocess=preprocess, total=count,
                         meta={"split": split, **(meta or {})}, progress=progress)  # fmt: skip


def score_samples(
    model: VGG,
    samples: Iterable[_Sample],
    options: EvalOptions,
    *,
    preprocess: nn.Module,
    total: int | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Posteriors:
    """`compute_posteriors` on any iterable of samples (`key`, `jpeg`, `label`): the engine behind it.

    Samples are grouped by the shapes of their dense views before they are decoded, so a forward pass sees
    `batch_size` views of one shape; the result is in the samples' order.
    """
    scales = list(options.scales)
    crop = options.crop_for(model)
    batch_size = options.batch_size
    device = torch.device(options.device)
    bf16 = options.bf16
    multiple = options.padding
    fixed = options.fixed
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    keys: list[str] = []
    labels: list[int] = []
    # One accumulator per mode and Q, so every scale's own posteriors exist (`keep_scales`).
    classes = model.num_classes
    dense = {q: _Accumulator(classes, device, multiple) for q in scales} if options.mode != "multicrop" else {}
    crops = {q: _Accumulator(classes, device, 1) for q in scales} if options.mode != "dense" else {}
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    was_training = model.training
    model.to(device, memory_format=memory_format).eval()
    preprocess = preprocess.to(device)

    def probabilities(views: torch.Tensor, sizes: torch.Tensor | None, score: _Batch) -> torch.Tensor:
        count = views.shape[0]
        if fixed and count < batch_size:
            views = torch.cat([views, views.new_zeros(batch_size - count, *views.shape[1:])])
            if sizes is not None:
                sizes = torch.cat([sizes, sizes.new_tensor(views.shape[-2:]).expand(batch_size - count, 2)])
        if device.type == "cuda":  # an asynchronous copy: the next batch is prepared while this one runs
            views = views.pin_memory()
        views = views.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast:
            scores = score(preprocess(views), sizes)
        return torch.softmax(scores.float(), dim=1)[:count]

    def dense_probabilities(views: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
        return probabilities(views, sizes, lambda x, s: dense_scores(model, x, s))  # the score map's mean (§3.2)

    def crop_probabilities(views: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
        return probabilities(views, sizes, lambda x, _: model(x))

    def recorded() -> Iterator[tuple[int, _Sample]]:
        for sample in samples:
            keys.append(sample.key)
            labels.append(int(sample.label))
            yield len(keys) - 1, sample

    def shapes(sample: _Sample) -> tuple[tuple[int, int], ...]:  # its dense views' padded shape at each Q
        if not dense:
            return ()
        size = jpeg_size(sample.jpeg)
        return tuple(padded_shape(rescaled_shape(size, q), multiple) for q in scales)

    groups = _grouped(recorded(), shapes, size=max(1, batch_size // 2), limit=options.buffer_images)
    benchmark = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = benchmark or (device.type == "cuda" and fixed)  # one choice per shape
        with torch.inference_mode(), tqdm(total=total, unit="img", disable=not progress, desc=options.mode) as bar:
            for group in _decoded(groups, scales=scales, workers=options.workers):
                for index, images in group:
                    for q, image in zip(scales, images):
                        if dense:
                            dense[q].add(index, dense_views(image))
                            dense[q].run_full(batch_size, dense_probabilities)
                        if crops:
                            crops[q].add(index, multicrop_views(image, crop=crop, grid=options.grid))
                            crops[q].run_full(batch_size, crop_probabilities)
                bar.update(len(group))
            for accumulator in dense.values():
                accumulator.run_all(batch_size, dense_probabilities)
            for accumulator in crops.values():
                accumulator.run_all(batch_size, crop_probabilities)
    finally:
        torch.backends.cudnn.benchmark = benchmark
        model.train(was_training)

    if not keys:
        raise DataError("evaluation: no images to evaluate (the split is empty)")

    def at(q: int) -> torch.Tensor:  # float64 [N, C]; dense+multi-crop: the average of the two (§3.2)
        parts = [accumulators[q].mean(len(keys)) for accumulators in (dense, crops) if accumulators]
        return sum(parts[1:], parts[0]) / len(parts)

    per_scale = {q: at(q) for q in dict.fromkeys(scales)}
    probs = torch.stack([per_scale[q] for q in scales]).mean(dim=0)  # multi-scale: averaged over Q (§3.2)
    info: dict[str, Any] = {
        "config": model.name,
        "models": [model.name],
        "mode": options.mode,
        "scales": scales,
        "crop": crop,
        "grid": options.grid,
        "precision": "bf16" if bf16 else "fp32",
        "num_classes": model.num_classes,
    }
    return Posteriors(keys=keys, labels=np.asarray(labels), probs=probs.float().numpy(), meta={**info, **(meta or {})},
                      by_scale={q: per_scale[q].float().numpy() for q in options.keep_scales})



def _grouped(
    samples: Iterable[tuple[int, _Sample]], key: Callable[[_Sample], Hashable], *, size: int, limit: int
) -> Iterator[list[tuple[int, _Sample]]]:
    """The samples in groups of `size` with equal `key`, each as soon as it is complete; past `limit` samples
    waiting, the largest group goes anyway (this bounds the JPEG bytes held); the rest at the end."""
    buckets: dict[Hashable, list[tuple[int, _Sample]]] = {}
    waiting = 0
    for item in samples:
        shape = key(item[1])
        bucket = buckets.setdefault(shape, [])
        bucket.append(item)
        waiting += 1
        if len(bucket) >= size:
            waiting -= len(bucket)
            yield buckets.pop(shape)
        elif waiting > limit:
            largest = buckets.pop(max(buckets, key=lambda k: len(buckets[k])))
            waiting -= len(largest)
            yield largest
    yield from buckets.values()


def _decoded(
    groups: Iterable[list[tuple[int, _Sample]]], *, scales: Sequence[int], workers: int
) -> Iterator[list[tuple[int, list[torch.Tensor]]]]:
    """Each group with each sample's image at every Q, as a single-scale pass at that Q decodes it (in the DCT at
    the reduction that keeps the smallest side ≥ Q), decoding once per distinct reduction (usually once)."""

    def prepare(item: tuple[int, _Sample]) -> tuple[int, list[torch.Tensor]]:
        index, sample = item
        size = jpeg_size(sample.jpeg)
        decoded: dict[int, Image.Image] = {}  # DCT reduction → image decoded at it
        images = []
        for q in scales:
            factor = draft_factor(size, q)
            if factor not in decoded:
                decoded[factor] = decode_rgb(sample.jpeg, min_side=q)
            images.append(at_scale(decoded[factor], q=q))
        return index, images

    if workers == 0:
        for group in groups:
            yield [prepare(item) for item in group]
        return
    # Decode and resize release the GIL (PIL), so threads overlap them with the model; keep a bounded
    # window of samples in flight so memory does not grow with the split.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[list[Future[tuple[int, list[torch.Tensor]]]]] = deque()
        in_flight = 0
        for group in groups:
            pending.append([pool.submit(prepare, item) for item in group])
            in_flight += len(group)
            while in_flight >= 4 * workers:
                futures = pending.popleft()
                in_flight -= len(futures)
                yield [future.result() for future in futures]
        while pending:
            yield [future.result() for future in pending.popleft()]


class _Accumulator:
    """Views waiting for a forward pass, grouped by the shape they are padded to (`vgg.evaluate.dense`), and the
    per-image sums of their posteriors (on the model's device, so no batch waits for the previous one)."""

    def __init__(self, classes: int, device: torch.device, multiple: int) -> None:
        self.sums = torch.zeros(0, classes, dtype=torch.float64, device=device)
        self.views = torch.zeros(0, dtype=torch.long, device=device)  # views counted per image
        self.multiple = multiple
        self.pending: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = defaultdict(list)
        self.waiting = 0  # views in `pending`

    def add(self, index: int, views: torch.Tensor) -> None:
        self.pending[padded_shape((views.shape[-2], views.shape[-1]), self.multiple)].append((index, views))
        self.waiting += views.shape[0]

    def run_full(self, batch_size: int, probabilities: _Batch) -> None:
        """Run every shape with a full batch; if too much is waiting, also the shape with the most views."""
        for shape in list(self.pending):
            if sum(v.shape[0] for _, v in self.pending[shape]) >= batch_size:
                self._run(shape, batch_size, probabilities)
        if self.waiting > _PENDING_BATCHES * batch_size:
            fullest = max(self.pending, key=lambda s: sum(v.shape[0] for _, v in self.pending[s]))
            self._run(fullest, batch_size, probabilities)

    def run_all(self, batch_size: int, probabilities: _Batch) -> None:
        for shape in list(self.pending):
            self._run(shape, batch_size, probabilities)

    def mean(self, count: int) -> torch.Tensor:
        return (self.sums[:count] / self.views[:count, None]).cpu()

    def _run(self, shape: tuple[int, int], batch_size: int, probabilities: _Batch) -> None:
        entries = self.pending.pop(shape)
        owners = torch.cat([torch.full((v.shape[0],), i, dtype=torch.long) for i, v in entries])
        sizes = torch.tensor([v.shape[-2:] for _, v in entries for _ in range(v.shape[0])], dtype=torch.long)
        views = torch.cat([pad_to(v, shape) for _, v in entries])
        padded = bool((sizes != torch.tensor(shape)).any())
        self.waiting -= views.shape[0]
        self._grow(int(owners.max()) + 1)
        owners = owners.to(self.sums.device)
        for start in range(0, views.shape[0], batch_size):
            part = slice(start, start + batch_size)
            probs = probabilities(views[part], sizes[part] if padded else None)
            who = owners[part]
            self.sums.index_add_(0, who, probs.double())
            self.views.index_add_(0, who, torch.ones_like(who))

    def _grow(self, count: int) -> None:
        if count > self.sums.shape[0]:
            extra = max(count, 2 * self.sums.shape[0]) - self.sums.shape[0]
            self.sums = torch.cat([self.sums, self.sums.new_zeros(extra, self.sums.shape[1])])
            self.views = torch.cat([self.views, self.views.new_zeros(extra)])

