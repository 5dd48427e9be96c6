"""Model files in, models out: a `vgg train` checkpoint (`vgg.models.checkpoint`) or torchvision's VGG weights
(vgg11/13/16/19 state_dicts, read with `weights_only=True`) as a `VGG` ready to run, and the input normalisation
torchvision's weights were trained with. Training loads its `--init` here, evaluation the model it scores."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vgg.config import ModelConfig, from_mapping
from vgg.errors import CheckpointError, ConfigError
from vgg.models import architecture, checkpoint
from vgg.models.convert import TORCHVISION_CROP, from_torchvision
from vgg.models.vgg import VGG


def load_model(
    path: str | os.PathLike[str], *, name: str | None = None, model_config: ModelConfig | None = None
) -> VGG:
    """A model to run (to evaluate, or to start a training from), on the CPU, in eval mode: our checkpoint, or
    torchvision's VGG weights.

    - Our checkpoint (`vgg train` output, `name` None): built from its own `model_config`.
    - A torchvision vgg11/13/16/19 state_dict `.pth` (e.g. vgg16-397923af.pth): `name` is its configuration
      A/B/D/E; classes and FC width from the weights (1000, 4096), crop 224. Its input normalisation is
      torchvision's: evaluate it with `preprocess=TorchvisionNormalize()`.
    A given `model_config` (e.g. the profile's) must agree with the weights on the shape (classes, widths, crop).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found; pass a `vgg train` checkpoint or torchvision weights")
    if name is None:
        try:
            payload = checkpoint.load(path)
        except CheckpointError:
            if _is_torchvision_file(path):
                raise CheckpointError(
                    f"{path}: looks like torchvision VGG weights; say which configuration they are (name A/B/D/E)"
                ) from None
            raise
        try:
            config = from_mapping(ModelConfig, payload["model_config"], path="model_config")
        except ConfigError as error:
            raise CheckpointError(f"{path}: invalid checkpoint: {error}") from None
        name, state = payload["config"], payload["model"]
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a foreign or truncated file
            reason = type(error).__name__
            raise CheckpointError(f"{path}: cannot read torchvision weights ({reason}); re-download it") from None
        if not isinstance(state, Mapping) or "classifier.6.weight" not in state:
            raise CheckpointError(f"{path}: not a torchvision VGG state_dict (no 'classifier.6.weight')")
        state = from_torchvision(state, name)
        config = ModelConfig(
            num_classes=state["classifier.6.weight"].shape[0],
            width=1.0,
            fc_width=state["classifier.0.weight"].shape[0],
            crop=TORCHVISION_CROP,  # torchvision's head sees 7×7×512, i.e. a 224 px input
            dropout=0.5,
            lrn="alexnet",
            init="normal",
            warm_init="normal",
            init_std=0.01,
        )
    if model_config is not None:
        for key in ("num_classes", "width", "fc_width", "crop"):
            if getattr(model_config, key) != getattr(config, key):
                raise CheckpointError(
                    f"{path}: the weights have model.{key}={getattr(config, key)} but the profile says "
                    f"{getattr(model_config, key)}; use the profile they were trained with"
                )
    model = _assemble(name, state, config=config)
    return model.eval()


class TorchvisionNormalize(nn.Module):
    """torchvision's ImageNet input normalisation for its pretrained weights: (x/255 − mean) / std per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


def _assemble(name: str, state: Mapping[str, torch.Tensor], *, config: ModelConfig) -> VGG:
    with torch.device("meta"):  # no init: every weight comes from the file
        model = VGG(name, **architecture(config))
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1].strip()
        raise CheckpointError(f"weights do not fit VGG-{name} with {config}: {first}") from None
    return model


def _is_torchvision_file(path: Path) -> bool:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file at all: the checkpoint error stands
        return False
    return isinstance(state, Mapping) and "features.0.weight" in state and "format" not in state
