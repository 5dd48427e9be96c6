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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
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
from vgg.evaluate.results import Posteriors
from vgg.evaluate.views import at_scale, dense_views, multicrop_views
from vgg.models import VGG, checkpoint

Mode = Literal["dense", "multicrop", "dense+multicrop"]
MODES: tuple[str, ...] = ("dense", "multicrop", "dense+multicrop")
Precision = Literal["auto", "fp32", "bf16"]

# Dense evaluation buffers images of several sizes until a size has a full batch; past this many pending
# views (× batch_size) the fullest size is run anyway, which bounds memory when sizes rarely repeat.
_PENDING_BATCHES = 4


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


def compute_posteriors(
    model: VGG,
    shards_dir: str | os.PathLike[str],
    split: str,
    *,
    mode: Mode,
    scales: Sequence[int],
    crop: int | None = None,
    grid: int = 5,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    precision: Precision = "fp32",
    channels_last: bool = False,
    progress: bool = False,
    workers: int = 0,
    preprocess: nn.Module | None = None,
    meta: Mapping[str, Any] | None = None,
    keep_scales: Sequence[int] = (),
) -> Posteriors:
    """Posteriors of `model` on every image of `split` in the shards at `shards_dir` (§3.2).

    `scales`: the test scales Q, px (one for single-scale, e.g. `ScaleRange.single_q`; three for
    multi-scale, `ScaleRange.multi_q`). `keep_scales`: some of those whose own posteriors are kept too
    (`result.at_scale(q)`, the same as a single-scale pass at q): Table 3's Q is one of Table 4's three, so one
    pass gives both. `crop` (default: the model's) must equal the model's crop.
    `batch_size`: views per forward pass — crops (multi-crop) or same-sized whole images (dense; an image
    and its flip count as two). `precision`: "bf16" autocast, "fp32", or "auto" (bf16 on CUDA only).
    `channels_last`: NHWC activations (the model is converted in place; several times faster for the small
    profile's narrow convs on CPU, see benchmarks/evaluation.py). The model is moved to `device` and run in
    eval mode (its train/eval mode is restored afterwards). `workers`: threads that decode and rescale ahead
    of the model (0 = inline).
    `preprocess`: uint8 → float input transform; default `Preprocess(read_stats(shards_dir))` (the
    training set's mean RGB subtracted, §2.1; no colour shift). torchvision's weights expect their own
    normalisation: pass `vgg.models.io.TorchvisionNormalize()`. `meta`: entries added to the result's meta (e.g.
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
    return score_samples(
        model,
        iter_samples(shards_dir, split),
        mode=mode,
        scales=scales,
        crop=crop,
        grid=grid,
        batch_size=batch_size,
        device=device,
        precision=precision,
        channels_last=channels_last,
        progress=progress,
        workers=workers,
        preprocess=preprocess,
        total=count,
        meta={"split": split, **(meta or {})},
        keep_scales=keep_scales,
    )


def score_samples(
    model: VGG,
    samples: Iterable[_Sample],
    *,
    mode: Mode,
    scales: Sequence[int],
    preprocess: nn.Module,
    crop: int | None = None,
    grid: int = 5,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    precision: Precision = "fp32",
    channels_last: bool = False,
    progress: bool = False,
    workers: int = 0,
    total: int | None = None,
    meta: Mapping[str, Any] | None = None,
    keep_scales: Sequence[int] = (),
) -> Posteriors:
    """`compute_posteriors` on any iterable of samples (`key`, `jpeg`, `label`): the engine behind it."""
    scales = [int(q) for q in scales]
    crop = model.crop if crop is None else crop
    _check_options(model, mode=mode, scales=scales, crop=crop, grid=grid, batch_size=batch_size, workers=workers)
    if not set(keep_scales) <= set(scales):
        raise ConfigError(f"keep_scales: {list(keep_scales)} must be among the test scales {scales}")
    device = torch.device(device)
    bf16 = _resolve_precision(precision, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    keys: list[str] = []
    labels: list[int] = []
    # One accumulator per mode and Q, so every scale's own posteriors exist (`keep_scales`).
    dense = {q: _Accumulator(model.num_classes) for q in scales} if mode != "multicrop" else {}
    crops = {q: _Accumulator(model.num_classes) for q in scales} if mode != "dense" else {}
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    was_training = model.training
    model.to(device, memory_format=memory_format).eval()
    preprocess = preprocess.to(device)

    def probabilities(views: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        views = views.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast:
            scores = score(preprocess(views))
        return torch.softmax(scores.float(), dim=1).cpu()

    def dense_scores(x: torch.Tensor) -> torch.Tensor:
        return model.score_map(x).float().mean(dim=(2, 3))  # spatial average of the class score map (§3.2)

    try:
        with torch.inference_mode(), tqdm(total=total, unit="img", disable=not progress, desc=mode) as bar:
            for index, (sample, images) in enumerate(_decoded(samples, scales=scales, workers=workers)):
                keys.append(sample.key)
                labels.append(int(sample.label))
                for q, image in zip(scales, images):
                    if dense:
                        dense[q].add(index, dense_views(image))
                        dense[q].run_full(batch_size, lambda v: probabilities(v, dense_scores))
                    if crops:
                        crops[q].add(index, multicrop_views(image, crop=crop, grid=grid))
                        crops[q].run_full(batch_size, lambda v: probabilities(v, model))
                bar.update(1)
            for accumulator in dense.values():
                accumulator.run_all(batch_size, lambda v: probabilities(v, dense_scores))
            for accumulator in crops.values():
                accumulator.run_all(batch_size, lambda v: probabilities(v, model))
    finally:
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
        "mode": mode,
        "scales": scales,
        "crop": crop,
        "grid": grid,
        "precision": "bf16" if bf16 else "fp32",
        "num_classes": model.num_classes,
    }
    return Posteriors(keys=keys, labels=np.asarray(labels), probs=probs.float().numpy(), meta={**info, **(meta or {})},
                      by_scale={q: per_scale[q].float().numpy() for q in keep_scales})


def _check_options(
    model: VGG, *, mode: str, scales: Sequence[int], crop: int, grid: int, batch_size: int, workers: int
) -> None:
    if mode not in MODES:
        raise ConfigError(f"mode: unknown evaluation mode {mode!r}; choose one of {', '.join(MODES)}")
    if not scales:
        raise ConfigError("scales: give at least one test scale Q")
    if crop != model.crop:
        raise ConfigError(f"crop: {crop} px, but VGG-{model.name} was built for {model.crop} px crops; use its crop")
    if min(scales) < crop:
        raise ConfigError(f"scales: test scale Q={min(scales)} px is smaller than the crop ({crop} px); use Q >= crop")
    if grid < 1 or batch_size < 1 or workers < 0:
        raise ConfigError(f"grid, batch_size must be >= 1 and workers >= 0; got {grid}, {batch_size}, {workers}")


def _resolve_precision(precision: str, device: torch.device) -> bool:
    """True for bf16 autocast. `auto`: bf16 on CUDA; fp32 on CPU, where bf16 shifts the posteriors for
    little gain at evaluation batch sizes (measure with benchmarks/evaluation.py)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision: must be auto, fp32 or bf16, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _decoded(
    samples: Iterable[_Sample], *, scales: Sequence[int], workers: int
) -> Iterator[tuple[_Sample, list[torch.Tensor]]]:
    """Each sample with its image at every Q, as a single-scale pass at that Q decodes it (in the DCT at the
    reduction that keeps the smallest side ≥ Q), decoding once per distinct reduction (usually once)."""

    def prepare(sample: _Sample) -> tuple[_Sample, list[torch.Tensor]]:
        size = jpeg_size(sample.jpeg)
        decoded: dict[int, Image.Image] = {}  # DCT reduction → image decoded at it
        images = []
        for q in scales:
            factor = draft_factor(size, q)
            if factor not in decoded:
                decoded[factor] = decode_rgb(sample.jpeg, min_side=q)
            images.append(at_scale(decoded[factor], q=q))
        return sample, images

    if workers == 0:
        yield from map(prepare, samples)
        return
    # Decode and resize release the GIL (PIL), so threads overlap them with the model; keep a bounded
    # window of futures in flight so memory does not grow with the split.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[tuple[_Sample, list[torch.Tensor]]]] = deque()
        for sample in samples:
            pending.append(pool.submit(prepare, sample))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _Accumulator:
    """Views waiting for a forward pass, grouped by size, and the per-image sums of their posteriors."""

    def __init__(self, classes: int) -> None:
        self.sums = torch.zeros(0, classes, dtype=torch.float64)
        self.views = torch.zeros(0, dtype=torch.long)  # views counted per image
        self.pending: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = defaultdict(list)
        self.waiting = 0  # views in `pending`

    def add(self, index: int, views: torch.Tensor) -> None:
        self.pending[(views.shape[-2], views.shape[-1])].append((index, views))
        self.waiting += views.shape[0]

    def run_full(self, batch_size: int, probabilities: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Run every size with a full batch; if too much is waiting, also the size with the most views."""
        for size in list(self.pending):
            if sum(v.shape[0] for _, v in self.pending[size]) >= batch_size:
                self._run(size, batch_size, probabilities)
        if self.waiting > _PENDING_BATCHES * batch_size:
            fullest = max(self.pending, key=lambda s: sum(v.shape[0] for _, v in self.pending[s]))
            self._run(fullest, batch_size, probabilities)

    def run_all(self, batch_size: int, probabilities: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for size in list(self.pending):
            self._run(size, batch_size, probabilities)

    def mean(self, count: int) -> torch.Tensor:
        return self.sums[:count] / self.views[:count, None]

    def _run(
        self, size: tuple[int, int], batch_size: int, probabilities: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        entries = self.pending.pop(size)
        owners = torch.cat([torch.full((v.shape[0],), i, dtype=torch.long) for i, v in entries])
        views = torch.cat([v for _, v in entries])
        self.waiting -= views.shape[0]
        self._grow(int(owners.max()) + 1)
        for start in range(0, views.shape[0], batch_size):
            probs = probabilities(views[start : start + batch_size])
            who = owners[start : start + batch_size]
            self.sums.index_add_(0, who, probs.double())
            self.views.index_add_(0, who, torch.ones_like(who))

    def _grow(self, count: int) -> None:
        if count > self.sums.shape[0]:
            extra = max(count, 2 * self.sums.shape[0]) - self.sums.shape[0]
            self.sums = torch.cat([self.sums, self.sums.new_zeros(extra, self.sums.shape[1])])
            self.views = torch.cat([self.views, self.views.new_zeros(extra)])
