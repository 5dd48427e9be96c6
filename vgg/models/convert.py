"""torchvision ↔ ours: A/B/D/E are torchvision's vgg11/13/16/19 (no batch norm) with the same state_dict keys.

The key mapping is the identity because `VGG` keeps torchvision's layout; what this module adds is validation,
so a file of another architecture fails with one clear line instead of a wall of missing/unexpected keys.
torchvision's head always sees a 7×7×512 map (AdaptiveAvgPool2d((7, 7))), i.e. our width 1.0 at crop 224;
num_classes and fc_width are read from the weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vgg.errors import ModelError
from vgg.models import specs
from vgg.models.vgg import VGG

TORCHVISION_CROP = 224  # px: torchvision pools to 7×7 before its classifier, which our head matches at 224


def from_torchvision(state_dict: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """A torchvision vgg11/13/16/19 state_dict as the float32 state_dict of our configuration `name` (A/B/D/E).

    Weights re-saved in float16 or bfloat16 (to halve the file) are cast to float32: exact, as float32 holds every
    value of both, and what evaluation computes in (a half-precision model would fail on float32 input). Integer
    or quantized tensors are refused in one line."""
    _check(state_dict, name, source="torchvision")
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise ModelError(
                f"the torchvision weights hold {key} as {tensor.dtype}, not floating point (quantized?); use the "
                f"float weights of torchvision's {specs.spec(name).torchvision}"
            )
    return {key: tensor.float() for key, tensor in state_dict.items()}


def to_torchvision(state_dict: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Our A/B/D/E state_dict (width 1.0, crop 224) as the state_dict of torchvision's vgg11/13/16/19."""
    _check(state_dict, name, source=f"VGG-{name}")
    return dict(state_dict)


def _check(state_dict: Mapping[str, torch.Tensor], name: str, *, source: str) -> None:
    spec = specs.spec(name)
    if spec.torchvision is None:
        counterparts = ", ".join(f"{s.name}={s.torchvision}" for s in specs.SPECS.values() if s.torchvision)
        raise ModelError(f"VGG-{name} has no torchvision counterpart; only {counterparts} convert")
    if any("running_mean" in key for key in state_dict):
        raise ModelError(
            f"the {source} weights have batch normalisation (torchvision's {spec.torchvision}_bn?); "
            "the paper's nets have none: use the plain vgg11/13/16/19 weights"
        )
    for key in ("classifier.0.weight", "classifier.6.weight"):
        if key not in state_dict or state_dict[key].dim() != 2:
            raise ModelError(f"the {source} weights are not a VGG state_dict: no 2-D {key!r}")
    fc_width, num_classes = state_dict["classifier.0.weight"].shape[0], state_dict["classifier.6.weight"].shape[0]
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = VGG(name, num_classes=num_classes, fc_width=fc_width, crop=TORCHVISION_CROP).state_dict()

    convs = sum(1 for key in state_dict if key.startswith("features.") and key.endswith(".weight"))
    if convs != len(spec.conv_names):
        others = [s for s in specs.SPECS.values() if s.torchvision and len(s.conv_names) == convs]
        hint = f" (that is {others[0].torchvision} = config {others[0].name})" if others else ""
        raise ModelError(
            f"the {source} weights have {convs} conv layers{hint}, but VGG-{name} ({spec.torchvision}) has "
            f"{len(spec.conv_names)}; pass the configuration the weights belong to"
        )
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise ModelError(
            f"the {source} weights do not match VGG-{name} ({spec.torchvision}): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, tensor in expected.items():
        if state_dict[key].shape != tensor.shape:
            raise ModelError(
                f"the {source} weights do not match VGG-{name} ({spec.torchvision}) at width 1.0, crop "
                f"{TORCHVISION_CROP}: {key} has shape {list(state_dict[key].shape)}, expected {list(tensor.shape)}"
            )
