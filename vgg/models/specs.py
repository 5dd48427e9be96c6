"""Table 1 of the paper as data: the six ConvNet configurations A, A-LRN, B, C, D, E.

A configuration is five blocks of convolutions, each block followed by a 2×2/2 max-pool (§2.1). A block is the
tuple of its conv kernel sizes: 3 (3×3, pad 1) or 1 (1×1, pad 0; C's "conv1" layers, a linear projection followed
by ReLU, §2.3). Widths are per block (Table 1: 64-128-256-512-512), scaled by the model's width multiplier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vgg.errors import ModelError

WIDTHS = (64, 128, 256, 512, 512)  # conv channels per block at width 1.0 (Table 1)
POOL_STRIDE = 32  # px: five 2×2/2 max-pools, so a crop of c px leaves a c/32 × c/32 feature map (§2.1)

# Local Response Normalisation of A-LRN (Table 1), the one of AlexNet (Krizhevsky et al., 2012, §3.3):
#   b_i = a_i / (k + α · Σ_{j=i−n/2}^{i+n/2} a_j²)^β  with n=5, α=1e-4, β=0.75, k=2.
# torch.nn.LocalResponseNorm computes a_i / (k + α/n · Σ a_j²)^β: it divides α by n (as Caffe does).
#   lrn="alexnet" passes alpha = n · 1e-4, so the layer computes AlexNet's formula exactly;
#   lrn="pytorch" passes alpha = 1e-4 as printed (what most reimplementations do; a 5× weaker normalisation).
LRN_SIZE = 5  # n, channels in the window
LRN_ALPHA = 1e-4  # α as printed in AlexNet
LRN_BETA = 0.75  # β
LRN_K = 2.0  # k
LRN_MODES = ("alexnet", "pytorch")
LrnMode = Literal["alexnet", "pytorch"]


def lrn_alpha(mode: str) -> float:
    """The `alpha` to give torch.nn.LocalResponseNorm for `mode` (see the comment above)."""
    if mode == "alexnet":
        return LRN_SIZE * LRN_ALPHA
    if mode == "pytorch":
        return LRN_ALPHA
    raise ModelError(f"lrn: unknown LRN mode {mode!r}; choose one of {', '.join(LRN_MODES)}")


@dataclass(frozen=True)
class Spec:
    """One column of Table 1."""

    name: str  # the paper's letter: "A", "A-LRN", "B", "C", "D", "E"
    blocks: tuple[tuple[int, ...], ...]  # conv kernel sizes (3 or 1) per block, five blocks
    lrn_after: tuple[str, ...]  # paper names of the convs followed (after their ReLU) by LRN
    torchvision: str | None  # the identical torchvision model (same layer layout), if any

    @property
    def conv_names(self) -> tuple[str, ...]:
        """Paper names of the convs in order: conv{block}_{position}, both from 1 (Table 1's conv3-64 = conv1_1)."""
        return tuple(f"conv{b}_{i}" for b, block in enumerate(self.blocks, 1) for i in range(1, len(block) + 1))

    @property
    def depth(self) -> int:
        """Weight layers: convs + the three FC layers (Table 1's header: 11, 11, 13, 16, 16, 19)."""
        return sum(len(block) for block in self.blocks) + 3


SPECS: dict[str, Spec] = {
    spec.name: spec
    for spec in (
        Spec("A", ((3,), (3,), (3, 3), (3, 3), (3, 3)), (), "vgg11"),
        # LRN after the first layer (§2.1, Table 1), after its ReLU as in AlexNet; no torchvision counterpart.
        Spec("A-LRN", ((3,), (3,), (3, 3), (3, 3), (3, 3)), ("conv1_1",), None),
        Spec("B", ((3, 3), (3, 3), (3, 3), (3, 3), (3, 3)), (), "vgg13"),
        Spec("C", ((3, 3), (3, 3), (3, 3, 1), (3, 3, 1), (3, 3, 1)), (), None),  # a conv1 ends blocks 3-5
        Spec("D", ((3, 3), (3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)), (), "vgg16"),
        Spec("E", ((3, 3), (3, 3), (3, 3, 3, 3), (3, 3, 3, 3), (3, 3, 3, 3)), (), "vgg19"),
    )
}
CONFIGS: tuple[str, ...] = tuple(SPECS)


def spec(name: str) -> Spec:
    """The configuration called `name`, or a ModelError listing the valid names."""
    if name not in SPECS:
        raise ModelError(f"unknown VGG configuration {name!r}; choose one of {', '.join(CONFIGS)} (Table 1)")
    return SPECS[name]


def channels(width: float) -> tuple[int, ...]:
    """Conv channels per block for a width multiplier (rounded, at least 1)."""
    if not width > 0:
        raise ModelError(f"width: must be > 0, got {width}")
    return tuple(max(1, round(c * width)) for c in WIDTHS)
