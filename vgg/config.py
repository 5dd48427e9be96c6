"""Typed, frozen configuration with strict construction from plain mappings (parsed YAML or JSON).

Every key is required and typed; an unknown, missing or ill-typed key, or an impossible value, raises
`ConfigError` naming the dotted key (`train.lr: must be > 0, got -0.1`). Profiles (`small`, `paper`) are data
in `params.yaml`, never branches in code.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping, TypeVar, Union

from vgg.errors import ConfigError

T = TypeVar("T")
ScaleKind = Literal["low", "high", "jitter"]  # a training scale by its name in params.yaml `scales` (§3.1)
SCALE_KINDS: tuple[ScaleKind, ...] = typing.get_args(ScaleKind)
MAX_SIDE = 4096  # px: a bound on every image side and scale (8x the paper's largest, S = 512)


@dataclass(frozen=True)
class ScaleRange:
    """Training scale S: the smallest image side after isotropic rescaling, in px (§3.1).

    Fixed S when `s_min == s_max`; otherwise S ~ U[s_min, s_max] per image (scale jittering).
    """

    s_min: int
    s_max: int

    def __post_init__(self) -> None:
        if self.s_min <= 0:
            raise ConfigError(f"s_min: must be > 0 px, got {self.s_min}")
        if self.s_min > self.s_max:
            raise ConfigError(f"s_min: must be <= s_max, got s_min={self.s_min} > s_max={self.s_max}")
        _at_most(self, MAX_SIDE, "px; the paper's largest S is 512", "s_max")

    @property
    def fixed(self) -> bool:
        return self.s_min == self.s_max

    @property
    def single_q(self) -> int:
        """Single-scale test scale Q (§3.2): Q = S for fixed S, Q = ½(Smin + Smax) for jittered S."""
        return (self.s_min + self.s_max) // 2

    def multi_q(self, offset: int) -> tuple[int, int, int]:
        """Multi-scale test scales (§3.2): {S−off, S, S+off} for fixed S, {Smin, ½(Smin+Smax), Smax} jittered."""
        if self.fixed:
            return (self.s_min - offset, self.s_min, self.s_min + offset)
        return (self.s_min, self.single_q, self.s_max)

    def label(self) -> str:
        """How the paper writes it: `256` for fixed, `256-512` for jittered (file-name safe)."""
        return str(self.s_min) if self.fixed else f"{self.s_min}-{self.s_max}"


@dataclass(frozen=True)
class SynthConfig:
    """The generated default dataset, written in the raw ILSVRC-2012 archive layout."""

    classes: int  # number of leaf synsets (real WNIDs, the first `classes` in sorted order)
    train_per_class: int
    val_per_class: int
    min_side: int  # px, smallest side of generated images is drawn from [min_side, max_side]
    max_side: int
    seed: int
    # How the files are sized and encoded: "small" = sides from [min_side, max_side], JPEG quality 70–95, 4:2:0
    # chroma; "imagenet" = ILSVRC-2012's sizes, qualities and chroma subsampling, so files weigh ~110 KB and decode
    # at ImageNet's cost (min_side/max_side unused; the statistics and their sources: vgg.data.synthetic).
    jpeg: Literal["small", "imagenet"] = "small"

    def __post_init__(self) -> None:
        _positive(self, "classes", "train_per_class", "val_per_class", "min_side")
        if self.classes > 1000:
            raise ConfigError(f"classes: ILSVRC-2012 has 1000 classes, got {self.classes}")
        if self.min_side > self.max_side:
            raise ConfigError(f"min_side: must be <= max_side, got {self.min_side} > {self.max_side}")
        _at_most(self, MAX_SIDE, "px", "max_side")
        _at_most(self, 100_000, "images per class; ImageNet has at most 1,300", "train_per_class", "val_per_class")
        _seed(self.seed)


@dataclass(frozen=True)
class DataConfig:
    """Where the raw data is and how it is sharded."""

    raw: str  # raw ILSVRC-2012 directory (the three archives, or extracted train/ val/); "" = the generated default
    shard_size: int  # samples per WebDataset shard
    max_side: int  # px: ingest downscales once any image whose smallest side exceeds this
    loader_workers: int  # DataLoader worker processes per training process
    decode: Literal["cpu", "device"]  # training JPEG decode + crop: in the loader workers, or on the training device

    def __post_init__(self) -> None:
        _positive(self, "shard_size", "max_side")
        if self.loader_workers < 0:
            raise ConfigError(f"loader_workers: must be >= 0, got {self.loader_workers}")
        _at_most(self, MAX_SIDE, "px", "max_side")
        _at_most(self, 256, "processes per training process", "loader_workers")


@dataclass(frozen=True)
class ModelConfig:
    """Shape options shared by all configurations A..E; the paper's sizes at width 1, fc_width 4096, crop 224."""

    num_classes: int
    width: float  # multiplier on the conv widths 64-128-256-512-512 (Table 1)
    fc_width: int  # width of FC6 and FC7 (4096 in the paper)
    crop: int  # training crop, px (224, §2.1); must be a multiple of 32 (five 2×2 pools)
    dropout: float  # on FC6 and FC7 (0.5, §3.1)
    lrn: Literal["alexnet", "pytorch"]  # how A-LRN's α is read; see vgg.models.specs
    init: Literal["normal", "glorot", "kaiming"]
    warm_init: Literal["normal", "glorot", "kaiming"]  # B–E's layers that a warm start does not copy from A
    init_std: float  # std of the paper's normal init (§3.1 "zero mean and 10⁻² variance"; read as std, see README)

    def __post_init__(self) -> None:
        _positive(self, "num_classes", "width", "fc_width", "crop", "init_std")
        _at_most(self, 4, "x the paper's conv widths", "width")
        _at_most(self, 16384, "4x the paper's 4096", "fc_width")
        _at_most(self, 1000, "ILSVRC-2012's classes", "num_classes")
        _at_most(self, 1024, "px; the paper's is 224", "crop")
        if self.crop % 32:
            raise ConfigError(f"crop: must be a multiple of 32 px (five 2x2 max-pools), got {self.crop}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe of §3.1."""

    batch_size: int  # global batch, images per optimizer step (256, §3.1)
    micro_batch: int  # images per forward pass per worker; batch_size = micro_batch × accumulation × workers
    lr: float  # initial learning rate (1e-2, §3.1)
    fine_tune_lr: float  # lr when initialised from a model of the same configuration (1e-3, §3.1 for S=384)
    momentum: float
    weight_decay: float
    lr_decay: float  # factor on plateau (0.1, §3.1)
    patience: int  # epochs without a better val top-1 before the lr decays
    max_decays: int  # stop after this many decays (3, §3.1)
    # Fixed decays instead of the plateau rule: fractions of a run's epoch cap after which the lr is divided by
    # lr_decay, e.g. (0.6, 0.9). Empty = the paper's plateau rule (§3.1); see vgg.train.schedule.
    decay_at: tuple[float, ...]
    max_epochs: int  # cap (74, §3.1)
    # Cap when fine-tuning a model of the same configuration (the higher and the jittered S, §3.1); the paper gives
    # no separate figure, so the paper profile sets it to max_epochs. A run's cap is the smaller of the two.
    fine_tune_epochs: int
    seed: int
    precision: Literal["auto", "fp32", "bf16"]  # auto: bf16 on CUDA and CPUs with AVX512-BF16 or AMX-BF16
    channels_last: bool
    compile: bool  # torch.compile the model (CUDA; slower on CPU)
    workers: int  # Ray Train workers (processes), each with micro_batch images per step
    use_gpu: bool
    checkpoint_every: int  # optimizer steps between mid-epoch checkpoints (0 = only at epoch ends)
    # Mass moved from the true class to a uniform target in the training loss (Inception-v3, Szegedy et al. 2016,
    # §7: 0.1); the VGG paper uses none (0). Validation and evaluation errors are unaffected.
    label_smoothing: float

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "micro_batch", "lr", "fine_tune_lr", "lr_decay", "max_epochs", "fine_tune_epochs",
                  "workers")
        if self.batch_size % (self.micro_batch * self.workers):
            raise ConfigError(
                f"batch_size: {self.batch_size} is not divisible by micro_batch × workers "
                f"= {self.micro_batch} × {self.workers}; pick values whose product divides it"
            )
        for name in ("momentum", "weight_decay", "patience", "max_decays", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.lr_decay < 1.0:
            raise ConfigError(f"lr_decay: must be in (0, 1), got {self.lr_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:  # 1 would be a uniform target: nothing left to learn
            raise ConfigError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        _at_most(self, 10.0, "an SGD lr above 10 only diverges", "lr", "fine_tune_lr")
        _at_most(self, 1.0, "", "momentum", "weight_decay")
        _at_most(self, 1024, "Ray Train workers", "workers")
        _at_most(self, 10_000, "epochs", "max_epochs", "fine_tune_epochs")
        if any(not 0.0 < fraction < 1.0 for fraction in self.decay_at):
            raise ConfigError(f"decay_at: every entry must be a fraction of the run in (0, 1), "
                              f"got {list(self.decay_at)}")
        if list(self.decay_at) != sorted(set(self.decay_at)):
            raise ConfigError(f"decay_at: must increase strictly, got {list(self.decay_at)}")
        _seed(self.seed)

    def fine_tuning(self) -> TrainConfig:
        """This recipe for a run that fine-tunes a model of the same configuration: at most `fine_tune_epochs`."""
        return dataclasses.replace(self, max_epochs=min(self.max_epochs, self.fine_tune_epochs))

    @property
    def accumulation(self) -> int:
        """Micro-batches summed per optimizer step on each worker, so the global batch stays `batch_size`."""
        return self.batch_size // (self.micro_batch * self.workers)


@dataclass(frozen=True)
class EvalConfig:
    """Testing (§3.2)."""

    q_offset: int  # px, multi-scale Q = {S−off, S, S+off} for fixed S (32, §3.2)
    batch_size: int  # crops (multi-crop) or same-sized images (dense) per forward pass
    grid: int  # multi-crop grid per side (5 → 5×5 crops × 2 flips = 50 per scale, §3.2)
    # Where `vgg evaluate` runs: auto = CUDA where this machine has it, else the CPU; ray = as one Ray task on the
    # cluster in RAY_ADDRESS (or a local Ray), on one GPU when train.use_gpu (a cluster's head has none).
    device: Literal["auto", "cpu", "cuda", "ray"]

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "grid")
        if self.q_offset < 0:
            raise ConfigError(f"q_offset: must be >= 0, got {self.q_offset}")
        _at_most(self, MAX_SIDE, "px", "q_offset")
        _at_most(self, 25, "crops per side; the paper's grid is 5", "grid")


@dataclass(frozen=True)
class Scales:
    """The three training scales of §3.1/Table 3: fixed low S, fixed high S, jittered [Smin, Smax]. Their names
    (`SCALE_KINDS`) are the scale's kind: the report lines a result up with the paper's row by it."""

    low: ScaleRange
    high: ScaleRange
    jitter: ScaleRange


@dataclass(frozen=True)
class Profile:
    """One complete, consistent set of settings: `small` (the generated default) or `paper`."""

    name: str
    synth: SynthConfig | None  # None for real ImageNet (data.raw set)
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    eval: EvalConfig
    scales: Scales

    def __post_init__(self) -> None:
        crop, offset = self.model.crop, self.eval.q_offset
        for key in ("low", "high", "jitter"):
            scale: ScaleRange = getattr(self.scales, key)
            if crop > scale.s_min:
                raise ConfigError(
                    f"scales.{key}.s_min: the crop ({crop} px) must fit in the rescaled image, got S={scale.s_min}"
                )
            smallest_q = min(scale.multi_q(offset))
            if smallest_q < crop:
                raise ConfigError(
                    f"eval.q_offset: multi-scale Q={smallest_q} for scales.{key} is smaller than the crop ({crop} px)"
                )
            if max(scale.multi_q(offset)) > self.data.max_side:
                raise ConfigError(
                    f"data.max_side: {self.data.max_side} px is below the largest scale used "
                    f"({max(scale.multi_q(offset))} px for scales.{key}); raise it"
                )

    def require_raw_source(self) -> None:
        """Fail early when there is neither real data nor a generator (checked by the data stages, not at load,
        so a profile can be inspected before its ImageNet path is set)."""
        if not self.data.raw and self.synth is None:
            raise ConfigError(
                f"profiles.{self.name}.data.raw: set it to the directory holding ILSVRC2012_img_train.tar, "
                "ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz "
                f"(e.g. dvc exp run -S profiles.{self.name}.data.raw=/data/imagenet)"
            )

    def scale(self, key: str) -> ScaleRange:
        """A training scale by its name in `params.yaml` (`low`, `high`, `jitter`)."""
        if key not in SCALE_KINDS:
            raise ConfigError(f"scale: unknown training scale {key!r}; choose one of {', '.join(SCALE_KINDS)}")
        return getattr(self.scales, key)

    def to_dict(self) -> dict[str, Any]:
        """Plain data as params.yaml writes it (lists, not tuples), so what `vgg profile` prints and MLflow shows can
        be pasted back into params.yaml."""
        return _plain(dataclasses.asdict(self))


def _positive(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise ConfigError(f"{name}: must be > 0, got {value}")


def from_mapping(cls: type[T], mapping: Any, *, path: str = "") -> T:
    """Build dataclass `cls` from a mapping, strictly: every field required, no unknown keys, types checked.

    Errors name the dotted key from the root (`train.lr`), so a user can find it in `params.yaml`.
    """
    where = path or cls.__name__
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ConfigError(f"{_join(path, unknown[0])}: unknown key; valid keys here are {', '.join(names)}")
    missing = [name for name in names if name not in mapping]
    if missing:
        raise ConfigError(f"{_join(path, missing[0])}: missing key")
    values = {name: _coerce(hints[name], mapping[name], _join(path, name)) for name in names}
    try:
        return cls(**values)
    except ConfigError as error:
        # Validators name keys relative to their own dataclass; qualify them from the root.
        raise ConfigError(_join(path, str(error))) from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, path=key)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        return _coerce(next(o for o in options if o is not type(None)), value, key)
    if origin is tuple:  # tuple[X, ...] from a YAML list
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        return tuple(_coerce(item, element, f"{key}[{index}]") for index, element in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            value = float(value)  # `1e-3`: YAML 1.1 (PyYAML) reads an exponent without a dot as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module, not user input


_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _at_most(config: object, limit: float, why: str, *names: str) -> None:
    """Upper bounds, so that an absurd value is one line rather than exhausted memory or a day of work."""
    for name in names:
        value = getattr(config, name)
        if value > limit:
            raise ConfigError(f"{name}: must be <= {limit:g}{f' ({why})' if why else ''}, got {value}")


def _seed(value: int) -> None:
    if not 0 <= value < 2**32:
        raise ConfigError(f"seed: must be in [0, 2^32) (numpy's and torch's seeds), got {value}")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
