"""The VGG network of §2.1, built from a Table 1 spec, with the fully-convolutional view of §3.2.

Layout: `features` is torchvision's `make_layers` layout (Conv, ReLU, ..., MaxPool; A-LRN adds its LRN after
conv1_1's ReLU), `classifier` is torchvision's (Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear at indices
0/3/6). So A, B, D, E have exactly the state_dict keys of torchvision's vgg11/13/16/19. There is no adaptive
pooling: the head is sized for the training crop, and larger images go through `score_map` (dense evaluation).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from vgg.errors import ModelError
from vgg.models import specs


class LocalResponseNorm(nn.LocalResponseNorm):
    """torch's `LocalResponseNorm` (same parameters, same formula, same module type) with the window's sum of squares
    as a 1×1 convolution by a banded 0/1 matrix: one matmul per position, where torch pads and average-pools a 5-D
    view (~2× slower on a CPU: benchmarks/lrn.py). Channel c's window is c − ⌊n/2⌋ … c + ⌊(n−1)/2⌋, as torch's.

    Under autocast it computes in float32 (torch's squares in bf16, then averages in float32, its average pool
    being on the CPU autocast's float32 list): in bf16 throughout, its three roundings cost up to ~1% per element."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        # (the meta device, where FLOPs are counted, has no autocast: torch.autocast refuses it)
        device = x.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            channels = torch.arange(x.shape[1], device=x.device)
            offset = channels[None, :] - channels[:, None]  # [out, in]: input channel minus output channel
            band = ((offset >= -(self.size // 2)) & (offset <= (self.size - 1) // 2)).to(x.dtype)
            sums = F.conv2d(x * x, band[:, :, None, None])
            return x * (sums * (self.alpha / self.size) + self.k).pow(-self.beta)


class VGG(nn.Module):
    """One of Table 1's configurations; `forward` classifies crops, `score_map` scores whole images."""

    def __init__(
        self,
        name: str,
        *,
        num_classes: int = 1000,
        width: float = 1.0,
        fc_width: int = 4096,
        crop: int = 224,
        dropout: float = 0.5,
        lrn: specs.LrnMode = "alexnet",
    ) -> None:
        super().__init__()
        spec = specs.spec(name)
        if crop < specs.POOL_STRIDE or crop % specs.POOL_STRIDE:
            raise ModelError(f"crop: must be a positive multiple of 32 px (five 2x2 max-pools), got {crop}")
        if num_classes < 1 or fc_width < 1:
            raise ModelError(f"num_classes and fc_width: must be >= 1, got {num_classes} and {fc_width}")
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"dropout: must be in [0, 1), got {dropout}")
        alpha = specs.lrn_alpha(lrn)

        layers: list[nn.Module] = []
        in_channels = 3  # RGB
        for block, (kernels, out_channels) in enumerate(zip(spec.blocks, specs.channels(width)), 1):
            for position, kernel in enumerate(kernels, 1):
                # padding k//2 keeps the resolution: 1 px for 3×3 (§2.1), 0 for 1×1.
                layers += [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2), nn.ReLU(inplace=True)]
                if f"conv{block}_{position}" in spec.lrn_after:
                    layers.append(LocalResponseNorm(specs.LRN_SIZE, alpha=alpha, beta=specs.LRN_BETA, k=specs.LRN_K))
                in_channels = out_channels
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)

        self.head_kernel = crop // specs.POOL_STRIDE  # k: side of the last feature map at the crop (7 at 224 px)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * self.head_kernel**2, fc_width),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),  # §3.1: dropout 0.5 on the first two FC layers
            nn.Linear(fc_width, fc_width),  # fc7
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(fc_width, num_classes),  # fc8; the softmax is in the loss / evaluation
        )
        self.name = spec.name
        self.spec = spec
        self.crop = crop
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for crops x [N, 3, crop, crop] (mean-subtracted RGB)."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.crop or x.shape[3] != self.crop:
            raise ModelError(
                f"VGG-{self.name} expects input [N, 3, {self.crop}, {self.crop}] (its crop), got {list(x.shape)}; "
                "use score_map() for larger images"
            )
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores [N, C, H//32 − k + 1, W//32 − k + 1] for images x [N, 3, H, W], H, W ≥ crop (§3.2).

        The FC layers become convolutions: fc6 a k×k conv, fc7 and fc8 1×1 convs, as views of the same
        Parameters (no copies, so they cannot drift from the trained head). On a crop-sized input this equals
        `forward`. The classifier's ReLU and Dropout modules are applied too, so train mode behaves as `forward`
        does; in eval mode (how dense evaluation runs) dropout is the identity.
        """
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] < self.crop or x.shape[3] < self.crop:
            raise ModelError(
                f"VGG-{self.name}.score_map expects input [N, 3, H, W] with H, W >= {self.crop} (its crop), "
                f"got {list(x.shape)}"
            )
        x = self.features(x)
        fc6, relu6, drop6, fc7, relu7, drop7, fc8 = self.classifier
        k = self.head_kernel
        # Linear weight [out, C·k·k] flattens (C, k, k) row-major, as torch.flatten does in forward.
        x = drop6(relu6(F.conv2d(x, fc6.weight.view(fc6.out_features, -1, k, k), fc6.bias)))
        x = drop7(relu7(F.conv2d(x, fc7.weight.view(fc7.out_features, -1, 1, 1), fc7.bias)))
        return F.conv2d(x, fc8.weight.view(fc8.out_features, -1, 1, 1), fc8.bias)

    def named_layers(self) -> dict[str, nn.Module]:
        """The weight layers by their paper names: conv{block}_{position} (from 1), then fc6, fc7, fc8."""
        layers: dict[str, nn.Module] = {}
        convs = iter(m for m in self.features if isinstance(m, nn.Conv2d))
        for name in self.spec.conv_names:
            layers[name] = next(convs)
        layers.update(fc6=self.classifier[0], fc7=self.classifier[3], fc8=self.classifier[6])
        return layers
