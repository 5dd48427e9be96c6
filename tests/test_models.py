"""vgg.models against real oracles: the paper's parameter counts, torchvision's VGGs, AlexNet's LRN formula."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from vgg.config import ModelConfig
from vgg.errors import ModelError
from vgg.models import (
    CONFIGS,
    VGG,
    build,
    count_parameters,
    from_config,
    from_torchvision,
    initialise,
    to_torchvision,
    warm_start,
)

SMALL = dict(num_classes=10, width=0.125, fc_width=64, crop=32)  # 1×1 head: the small profile's shape


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# Exact counts at 1000 classes (Table 2 rounds them to 133, 133, 133, 134, 138, 144 M).
PAPER_COUNTS = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
}
DEPTHS = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}  # weight layers, Table 1's header


def test_configs_are_table_1() -> None:
    assert CONFIGS == ("A", "A-LRN", "B", "C", "D", "E")


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_count_matches_paper(name: str) -> None:
    with torch.device("meta"):  # shapes only: ~140M parameters cost no memory here
        model = build(name)
    assert count_parameters(model) == PAPER_COUNTS[name]
    assert len(model.named_layers()) == model.spec.depth == DEPTHS[name]


def _random_torchvision(torchvision_name: str, seed: int) -> nn.Module:
    """torchvision's VGG with random weights: He-scaled so activations neither vanish nor explode through 19
    layers, and non-zero biases so a misplaced bias shows. Allocated without torchvision's own (slow) init."""
    with torch.device("meta"):
        model = getattr(torchvision.models, torchvision_name)(weights=None)
    model.to_empty(device="cpu")
    generator = seeded(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, math.sqrt(2 / fan_in), generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
    return model.eval()


def _ours_from(reference: nn.Module, name: str) -> VGG:
    with torch.device("meta"):
        ours = VGG(name)
    ours.load_state_dict(from_torchvision(reference.state_dict(), name), strict=True, assign=True)
    return ours.eval()


@pytest.mark.parametrize(("name", "torchvision_name"), [("A", "vgg11"), ("B", "vgg13"), ("D", "vgg16"), ("E", "vgg19")])
def test_torchvision_weights_give_torchvision_outputs(name: str, torchvision_name: str) -> None:
    reference = _random_torchvision(torchvision_name, seed=0)
    weights = reference.state_dict()
    ours = _ours_from(reference, name)
    x = torch.randn(2, 3, 224, 224, generator=seeded(1))
    with torch.no_grad():
        assert relative_error(ours(x), reference(x)) <= 1e-5

    back = to_torchvision(ours.state_dict(), name)
    assert back.keys() == weights.keys()
    assert all(torch.equal(back[key], weights[key]) for key in weights)
    with torch.device("meta"):
        restored = getattr(torchvision.models, torchvision_name)(weights=None)
    restored.load_state_dict(back, strict=True, assign=True)


def test_full_size_score_map_is_the_head_slid_over_the_features() -> None:
    model = _ours_from(_random_torchvision("vgg11", seed=2), "A")
    x = torch.randn(1, 3, 256, 320, generator=seeded(3))
    with torch.no_grad():
        scores = model.score_map(x)
        features = model.features(x)
    assert scores.shape == (1, 1000, 256 // 32 - 7 + 1, 320 // 32 - 7 + 1)  # (2, 4)
    _assert_sliding_head(model, features, scores)


@pytest.mark.parametrize(("crop", "size"), [(32, (32, 32)), (32, (64, 96)), (64, (64, 64)), (64, (100, 160))])
def test_small_score_map(crop: int, size: tuple[int, int]) -> None:
    model = build("C", num_classes=10, width=0.125, fc_width=64, crop=crop, init="kaiming", generator=seeded(3))
    with torch.no_grad():
        for module in model.modules():  # non-zero biases, so the conv views must carry them
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.normal_(0.0, 0.1, generator=seeded(4))
    model.eval()
    x = torch.randn(3, 3, *size, generator=seeded(5))
    k = crop // 32
    with torch.no_grad():
        scores = model.score_map(x)
        features = model.features(x)
        assert scores.shape == (3, 10, size[0] // 32 - k + 1, size[1] // 32 - k + 1)
        _assert_sliding_head(model, features, scores)
        if size == (crop, crop):
            assert relative_error(scores.flatten(1), model(x)) <= 1e-5


def _assert_sliding_head(model: VGG, features: torch.Tensor, scores: torch.Tensor) -> None:
    """Oracle: the Linear head applied to every k×k window of the feature map, one window at a time."""
    k = model.crop // 32
    with torch.no_grad():
        for i in range(scores.shape[2]):
            for j in range(scores.shape[3]):
                window = features[:, :, i : i + k, j : j + k].flatten(1)
                assert relative_error(scores[:, :, i, j], model.classifier(window)) <= 1e-5


def test_score_map_applies_dropout_like_forward_in_train_mode() -> None:
    model = build("A", **SMALL, init="kaiming", generator=seeded(6)).train()
    x = torch.randn(4, 3, 32, 32, generator=seeded(7))
    torch.manual_seed(8)
    dense = model.score_map(x).flatten(1)
    torch.manual_seed(8)
    crop = model(x)
    model.eval()
    assert relative_error(dense, crop) <= 1e-5
    assert relative_error(model(x), crop) > 1e-2  # dropout was really active


def test_inputs_of_the_wrong_size_are_refused() -> None:
    model = build("A", **SMALL)
    with pytest.raises(ModelError, match=r"\[N, 3, 32, 32\].*score_map"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ModelError, match="H, W >= 32"):
        model.score_map(torch.zeros(1, 3, 32, 31))


def test_a_lrn_has_one_lrn_after_conv1_1_with_alexnets_formula() -> None:
    model = build("A-LRN", **SMALL)
    lrns = [i for i, m in enumerate(model.features) if isinstance(m, nn.LocalResponseNorm)]
    assert lrns == [2]  # conv1_1, its ReLU, then LRN (Table 1; AlexNet normalises after the ReLU)
    assert model.features[0] is model.named_layers()["conv1_1"]
    assert isinstance(model.features[1], nn.ReLU)
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in build("A", **SMALL).modules())

    # AlexNet (§3.3): b_i = a_i / (2 + 1e-4 · Σ_{j=max(0,i-2)}^{min(N-1,i+2)} a_j²)^0.75
    a = torch.rand(2, 8, 5, 5, generator=seeded(9)) * 30
    sums = torch.stack([(a[:, max(0, i - 2) : i + 3] ** 2).sum(1) for i in range(a.shape[1])], dim=1)
    expected = a / (2 + 1e-4 * sums) ** 0.75
    assert relative_error(model.features[2](a), expected) <= 1e-6
    pytorch_style = build("A-LRN", **SMALL, lrn="pytorch").features[2]
    assert pytorch_style.alpha == 1e-4
    assert relative_error(pytorch_style(a), a / (2 + 1e-4 / 5 * sums) ** 0.75) <= 1e-6


@pytest.mark.parametrize("size", [1, 2, 4, 5, 7])
def test_our_lrn_is_torchs_in_float64_values_and_gradients(size: int) -> None:
    """vgg's LocalResponseNorm (a banded 1×1 convolution, for speed) against torch.nn.LocalResponseNorm as the
    oracle: the same windows (odd and even n, at the channel edges), values and input gradients, NCHW and
    channels-last."""
    from vgg.models.vgg import LocalResponseNorm

    for channels in (3, 8, 64):
        a = (torch.rand(2, channels, 6, 7, generator=seeded(channels), dtype=torch.float64) * 30).requires_grad_()
        arguments = {"size": size, "alpha": 5e-3, "beta": 0.75, "k": 2.0}
        expected = nn.LocalResponseNorm(**arguments)(a)
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), a)
        for x in (a, a.to(memory_format=torch.channels_last)):
            ours = LocalResponseNorm(**arguments)(x)
            (grad,) = torch.autograd.grad(ours.square().sum(), a)
            assert relative_error(ours, expected) <= 1e-12 and relative_error(grad, expected_grad) <= 1e-12


def test_our_lrn_computes_in_float32_under_bf16_autocast() -> None:
    """In bf16 throughout, its three roundings would cost up to ~1% per element; in float32 it is as exact as
    torch's module (which squares in bf16) or more."""
    from vgg.models.vgg import LocalResponseNorm

    x = (torch.rand(4, 8, 9, 9, generator=seeded(3)) * 30).bfloat16()
    arguments = {"size": 5, "alpha": 5e-4, "beta": 0.75, "k": 2.0}
    exact = nn.LocalResponseNorm(**arguments)(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, torchs = LocalResponseNorm(**arguments)(x), nn.LocalResponseNorm(**arguments)(x)
    assert ours.dtype == torch.float32
    assert relative_error(ours.double(), exact) <= max(relative_error(torchs.double(), exact), 1e-6)


def test_a_lrn_runs_on_the_meta_device_where_flops_are_counted() -> None:
    with torch.device("meta"):
        model = build("A-LRN", **SMALL)
        assert model(torch.empty(2, 3, 32, 32)).shape == (2, SMALL["num_classes"])


def test_a_lrn_forward_applies_its_lrn_and_differs_from_a_with_the_same_weights() -> None:
    a, a_lrn = build("A", **SMALL, generator=seeded(4)), build("A-LRN", **SMALL, generator=seeded(5))
    with torch.no_grad():
        a.named_layers()["conv1_1"].weight.mul_(40)  # a trained-looking first layer: large activations
    for name, layer in a.named_layers().items():  # the same weights, layer by paper name (LRN has none)
        a_lrn.named_layers()[name].load_state_dict(layer.state_dict())
    a.eval(), a_lrn.eval()
    x = torch.randn(4, 3, 32, 32, generator=seeded(6))
    lrn = nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0)  # AlexNet's, as in the test above
    with torch.no_grad():
        out_a, out_lrn = a(x), a_lrn(x)
        by_hand = a.features[2:](lrn(a.features[:2](x)))  # A's layers after conv1_1's ReLU, on LRN's output
        assert relative_error(a_lrn.features(x), by_hand) <= 1e-5
        assert relative_error(a_lrn.classifier(torch.flatten(by_hand, 1)), out_lrn) <= 1e-5
    assert relative_error(out_lrn, out_a) > 0.05  # the LRN is in the forward pass: the logits move


def test_a_lrn_at_initialisation_predicts_as_a_does() -> None:
    """Why A and A-LRN once came out identical to the tenth of a percent: with small activations LRN is a constant
    scale, (k + ...)^-β ≈ 2^-0.75, and a ReLU network with zero biases scales its logits by it, so an untrained or
    barely trained A-LRN ranks the classes exactly as the A drawn from the same seed (LRN has no parameters, so the
    draws are the same). Only once the first layer's activations grow does LRN change the ranking."""
    a, a_lrn = build("A", **SMALL, generator=seeded(4)), build("A-LRN", **SMALL, generator=seeded(4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), a_lrn.parameters(), strict=True))
    a.eval(), a_lrn.eval()
    x = torch.randn(64, 3, 32, 32, generator=seeded(6))
    with torch.no_grad():
        out_a, out_lrn = a(x), a_lrn(x)
    assert torch.equal(out_a.argmax(1), out_lrn.argmax(1))
    assert relative_error(out_lrn, out_a * 2**-0.75) <= 1e-2


def test_c_ends_blocks_3_to_5_with_1x1_convs() -> None:
    layers = build("C", **SMALL).named_layers()
    convs = {name: m for name, m in layers.items() if name.startswith("conv")}
    ones = {name for name, m in convs.items() if m.kernel_size == (1, 1)}
    assert ones == {"conv3_3", "conv4_3", "conv5_3"}
    assert all(m.padding == ((0, 0) if name in ones else (1, 1)) for name, m in convs.items())
    assert all(m.kernel_size == (3, 3) for name, m in convs.items() if name not in ones)


def test_named_layers_follow_the_paper() -> None:
    model = build("D", **SMALL)
    layers = model.named_layers()
    assert list(layers) == [
        *(f"conv1_{i}" for i in (1, 2)),
        *(f"conv2_{i}" for i in (1, 2)),
        *(f"conv{b}_{i}" for b in (3, 4, 5) for i in (1, 2, 3)),
        "fc6",
        "fc7",
        "fc8",
    ]
    assert layers["conv2_1"] is model.features[5]  # after conv1_1, relu, conv1_2, relu, pool
    assert layers["fc8"] is model.classifier[6]
    assert (model.name, model.crop, model.num_classes) == ("D", 32, 10)


def test_build_refuses_bad_options() -> None:
    with pytest.raises(ModelError, match="A, A-LRN, B, C, D, E"):
        build("F")
    with pytest.raises(ModelError, match="init"):
        build("A", **SMALL, init="uniform")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="lrn"):
        build("A-LRN", **SMALL, lrn="caffe")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="multiple of 32"):
        build("A", num_classes=10, width=0.125, fc_width=64, crop=48)


def test_from_config_is_build_with_the_config() -> None:
    config = ModelConfig(num_classes=7, width=0.25, fc_width=32, crop=64, dropout=0.3, lrn="pytorch", init="glorot",
                         warm_init="kaiming", init_std=0.01)
    model = from_config("A-LRN", config, generator=seeded(10))
    same = build(
        "A-LRN", num_classes=7, width=0.25, fc_width=32, crop=64, dropout=0.3, lrn="pytorch", init="glorot",
        generator=seeded(10),
    )
    warm = build("A-LRN", num_classes=7, width=0.25, fc_width=32, crop=64, dropout=0.3, lrn="pytorch",
                 init="kaiming", generator=seeded(10))
    assert all(torch.equal(a, b) for a, b in zip(from_config("A-LRN", config, warm=True, generator=seeded(10))
                                                 .state_dict().values(), warm.state_dict().values()))
    assert (model.name, model.crop, model.num_classes, model.classifier[2].p) == ("A-LRN", 64, 7, 0.3)
    assert model.features[0].out_channels == 16 and model.classifier[0].in_features == 128 * 2 * 2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))


def test_normal_init_has_the_requested_std_and_zero_biases() -> None:
    model = build("A", num_classes=10, width=1.0, fc_width=64, crop=32, init="normal", init_std=0.02)
    big = model.named_layers()["conv5_1"].weight  # 512·512·9 ≈ 2.4M draws: std estimate within ~0.1%
    assert abs(big.std().item() - 0.02) < 0.02 * 0.01
    assert abs(big.mean().item()) < 1e-4
    assert all(not m.bias.any() for m in model.named_layers().values())


def test_glorot_and_kaiming_init() -> None:
    glorot = build("A", num_classes=10, width=1.0, fc_width=64, crop=32, init="glorot").named_layers()["conv5_1"]
    bound = math.sqrt(6 / (512 * 9 + 512 * 9))  # xavier_uniform: U(-b, b), b = sqrt(6 / (fan_in + fan_out))
    assert bound * 0.999 < glorot.weight.abs().max().item() <= bound
    assert not glorot.bias.any()

    layers = build("A", num_classes=10, width=1.0, fc_width=64, crop=32, init="kaiming", init_std=0.03).named_layers()
    assert abs(layers["conv5_1"].weight.std().item() - math.sqrt(2 / (512 * 9))) < 0.01 * math.sqrt(2 / (512 * 9))
    assert abs(layers["fc6"].weight.std().item() - 0.03) < 0.03 * 0.02  # 512·64 draws


def test_init_is_reproducible_from_the_generator() -> None:
    first, second, other = (build("B", **SMALL, generator=seeded(s)).state_dict() for s in (11, 11, 12))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["features.0.weight"], other["features.0.weight"])


def test_initialise_refuses_an_unknown_scheme() -> None:
    with pytest.raises(ModelError, match="normal, glorot, kaiming"):
        initialise(build("A", **SMALL), scheme="orthogonal", std=0.01, generator=None)  # type: ignore[arg-type]


WARM = dict(num_classes=10, width=0.25, fc_width=32, crop=32)
COPIED = ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8"]


@pytest.mark.parametrize("source_name", ["A", "A-LRN"])
@pytest.mark.parametrize("target_name", ["B", "C", "D", "E"])
def test_warm_start_copies_four_convs_and_the_head_of_a(source_name: str, target_name: str) -> None:
    source = build(source_name, **WARM, generator=seeded(13))
    target = build(target_name, **WARM, generator=seeded(14))
    before = {name: layer.weight.clone() for name, layer in target.named_layers().items()}
    a_layers, layers = source.named_layers(), target.named_layers()

    assert warm_start(target, source) == COPIED
    for name, layer in layers.items():
        if name in COPIED:
            assert torch.equal(layer.weight, a_layers[name].weight) and torch.equal(layer.bias, a_layers[name].bias)
        else:
            assert torch.equal(layer.weight, before[name])  # still its own fresh initialisation
            if name in a_layers and a_layers[name].weight.shape == layer.weight.shape:
                assert not torch.equal(layer.weight, a_layers[name].weight)


def test_warm_start_refuses_a_mismatched_source_and_leaves_the_target_untouched() -> None:
    target = build("D", **WARM, generator=seeded(15))
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(ModelError, match="source must be a trained A"):
        warm_start(target, build("B", **WARM))
    with pytest.raises(ModelError, match=r"fc8\.weight.*\[5, 32\]"):
        warm_start(target, build("A", **{**WARM, "num_classes": 5}))
    with pytest.raises(ModelError, match="conv1_1"):
        warm_start(target, build("A", **{**WARM, "width": 0.5}))
    with pytest.raises(ModelError, match="target must be one of B, C, D, E"):
        warm_start(build("A", **WARM), build("A", **WARM))
    assert all(torch.equal(before[key], value) for key, value in target.state_dict().items())


def _torchvision_weights(torchvision_name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return getattr(torchvision.models, torchvision_name)(weights=None).state_dict()


def test_conversion_refuses_weights_of_another_architecture() -> None:
    with pytest.raises(ModelError, match=r"13 conv layers \(that is vgg16 = config D\)"):
        from_torchvision(_torchvision_weights("vgg16"), "E")
    with pytest.raises(ModelError, match="batch normalisation"):
        from_torchvision(_torchvision_weights("vgg16_bn"), "D")
    with pytest.raises(ModelError, match="no torchvision counterpart"):
        from_torchvision(_torchvision_weights("vgg11"), "C")
    with pytest.raises(ModelError, match="no torchvision counterpart"):
        to_torchvision(build("A-LRN", **SMALL).state_dict(), "A-LRN")
    with pytest.raises(ModelError, match="not a VGG state_dict"):
        from_torchvision({"weight": torch.zeros(3)}, "A")
    with torch.device("meta"):
        narrow = build("A", width=0.5).state_dict()
    with pytest.raises(ModelError, match=r"width 1\.0, crop 224: features\.0\.weight"):
        to_torchvision(narrow, "A")
    with torch.device("meta"):
        ten_classes = build("A", num_classes=10).state_dict()
    assert to_torchvision(ten_classes, "A").keys() == ten_classes.keys()  # torchvision's vgg11(num_classes=10)
