"""Weight initialisation (§3.1): the paper's normal init, Glorot, Kaiming, and the warm start of B–E from A."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from vgg.errors import ModelError
from vgg.models import specs
from vgg.models.vgg import VGG

INIT_SCHEMES = ("normal", "glorot", "kaiming")
InitScheme = Literal["normal", "glorot", "kaiming"]
WARM_START_CONVS = 4  # §3.1: "the first four convolutional layers and the last three fully-connected layers"
WARM_START_SOURCES = ("A", "A-LRN")


def initialise(model: nn.Module, *, scheme: InitScheme, std: float, generator: torch.Generator | None) -> None:
    """Re-initialise every Conv2d and Linear of `model` in place; all biases become 0 (§3.1).

    - "normal": weights ~ N(0, std²). §3.1 says "zero mean and 10⁻² variance", literally std 0.1; the paper's
      released Caffe models and most reimplementations use std 0.01, hence `std` is a parameter (default 0.01
      in `build`).
    - "glorot": xavier_uniform (Glorot & Bengio, 2010), which §3.1 notes trains without pre-training.
    - "kaiming": torchvision's choice: convs kaiming_normal (fan_out, ReLU gain), Linear ~ N(0, std²)
      (torchvision fixes std 0.01 there).
    `generator` makes the draw reproducible independently of the global RNG.
    """
    if scheme not in INIT_SCHEMES:
        raise ModelError(f"init: unknown initialisation {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    if not std > 0:
        raise ModelError(f"init_std: must be > 0, got {std}")
    for module in model.modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if scheme == "glorot":
            nn.init.xavier_uniform_(module.weight, generator=generator)
        elif scheme == "kaiming" and isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        else:
            nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def warm_start(model: VGG, trained_a: VGG) -> list[str]:
    """Copy the first four convs and fc6–fc8 of a trained A (or A-LRN) into `model` (B–E), in place (§3.1).

    The layers go to the same paper names (for B–E: conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7, fc8); the
    other layers keep their fresh initialisation. Everything is checked before anything is copied, so a
    ModelError leaves `model` untouched. Returns the copied layer names.
    """
    if not isinstance(trained_a, VGG) or trained_a.name not in WARM_START_SOURCES:
        found = trained_a.name if isinstance(trained_a, VGG) else type(trained_a).__name__
        raise ModelError(f"warm start: the source must be a trained {' or '.join(WARM_START_SOURCES)}, got {found}")
    if not isinstance(model, VGG) or model.name in WARM_START_SOURCES:
        found = model.name if isinstance(model, VGG) else type(model).__name__
        raise ModelError(f"warm start: the target must be one of B, C, D, E (initialised from A), got {found}")
    names = [*specs.spec("A").conv_names[:WARM_START_CONVS], "fc6", "fc7", "fc8"]
    source, target = trained_a.named_layers(), model.named_layers()
    for name in names:
        for key, tensor in source[name].state_dict().items():
            want = target[name].state_dict()[key].shape
            if tensor.shape != want:
                raise ModelError(
                    f"warm start: {name}.{key} of the source A has shape {list(tensor.shape)} but VGG-{model.name} "
                    f"needs {list(want)}; train A with the same width, fc_width, crop and num_classes"
                )
    with torch.no_grad():
        for name in names:
            for param, value in zip(target[name].parameters(), source[name].parameters(), strict=True):
                param.copy_(value)
    return names
