"""The test scales Q of an evaluation (§3.2), chosen from the training scale S a checkpoint records."""

from __future__ import annotations

import os
from typing import NamedTuple

from vgg.config import ScaleRange
from vgg.errors import ConfigError
from vgg.models import checkpoint


class EvalScales(NamedTuple):
    scales: tuple[int, ...]  # the test scales Q, px
    single: int | None  # the single-scale Q of the training S (one of `scales` for "multi"); None for a px list


def choose_scales(spec: str, *, model: str | os.PathLike[str] | None, q_offset: int) -> EvalScales:
    """Q for `spec`: "single" (Q = S for fixed S, ½(Smin + Smax) for jittered S), "multi" ({S − q_offset, S,
    S + q_offset} fixed, {Smin, ½(Smin + Smax), Smax} jittered), both from the S recorded in the checkpoint at
    `model`; or an explicit px list such as "256,384,512". `model` None: weights that record no S (torchvision's),
    which take only an explicit list."""
    if spec in ("single", "multi"):
        if model is None:
            raise ConfigError(
                "--scales: torchvision weights carry no training scale; give the Q list, e.g. 256,384,512")
        scale = ScaleRange(**checkpoint.read_header(model)["scale"])
        scales = (scale.single_q,) if spec == "single" else scale.multi_q(q_offset)
        return EvalScales(scales=tuple(scales), single=scale.single_q)
    try:
        return EvalScales(scales=tuple(int(value) for value in spec.split(",")), single=None)
    except ValueError:
        raise ConfigError(f"--scales: expected single, multi or a list of px like 256,384,512, got {spec!r}") from None
