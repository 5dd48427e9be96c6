"""The ConvNets of Table 1: build one by its letter, initialise it (§3.1), convert torchvision weights.

Model files: `checkpoint` (our format: atomic save, weights_only load, header) and `io` (a runnable model from a
checkpoint or a torchvision file)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vgg.config import ModelConfig
from vgg.models.convert import from_torchvision, to_torchvision
from vgg.models.init import INIT_SCHEMES, InitScheme, initialise, warm_start
from vgg.models.specs import CONFIGS, LRN_MODES, SPECS, LrnMode, Spec
from vgg.models.vgg import VGG

__all__ = [
    "CONFIGS",
    "INIT_SCHEMES",
    "LRN_MODES",
    "SPECS",
    "VGG",
    "Spec",
    "architecture",
    "build",
    "count_parameters",
    "from_config",
    "from_torchvision",
    "initialise",
    "to_torchvision",
    "warm_start",
]


def build(
    name: str,
    *,
    num_classes: int = 1000,
    width: float = 1.0,
    fc_width: int = 4096,
    crop: int = 224,
    dropout: float = 0.5,
    lrn: LrnMode = "alexnet",
    init: InitScheme = "normal",
    init_std: float = 0.01,
    generator: torch.Generator | None = None,
) -> VGG:
    """Configuration `name` (A, A-LRN, B, C, D, E) with fresh weights from `initialise`, on the default device.

    At the paper's sizes (width 1.0, fc_width 4096, crop 224, 1000 classes) this is exactly Table 1's net.
    """
    device = torch.get_default_device()
    # Built on "meta" and then allocated: PyTorch's default init of ~140M weights takes seconds and would be
    # overwritten by `initialise` anyway (and it would draw from the global RNG).
    with torch.device("meta"):
        model = VGG(name, num_classes=num_classes, width=width, fc_width=fc_width, crop=crop, dropout=dropout, lrn=lrn)
    model.to_empty(device=device)
    initialise(model, scheme=init, std=init_std, generator=generator)
    return model


def from_config(
    name: str, config: ModelConfig, *, warm: bool = False, generator: torch.Generator | None = None
) -> VGG:
    """`build` with the shape and initialisation options of a profile's `model:` section; `warm`: the model is
    about to be warm-started from A, so its own layers get `config.warm_init`."""
    return build(
        name,
        **architecture(config),
        init=config.warm_init if warm else config.init,
        init_std=config.init_std,
        generator=generator,
    )


def architecture(config: ModelConfig) -> dict[str, Any]:
    """The keywords of `VGG` (and `build`) that a profile's `model:` section sets: the net's shape, dropout, LRN."""
    return {"num_classes": config.num_classes, "width": config.width, "fc_width": config.fc_width,
            "crop": config.crop, "dropout": config.dropout, "lrn": config.lrn}


def count_parameters(model: nn.Module) -> int:
    """All parameters (weights and biases), as the paper counts them in Table 2."""
    return sum(p.numel() for p in model.parameters())
