"""benchmarks/architectures.py: its counts against oracles (torchvision's published metadata, the hand formula for
one layer, our VGG-16 against torchvision's), its saved-activation measure against a net small enough to count by
hand, and the script end to end on two rows. No speed is asserted."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from benchmarks.architectures import (ARCHS, BY_KEY, build_model, forward_flops, input_size, main, parameter_split,
                                      saved_activation_bytes, vgg_stages, weights_meta)
from vgg.models import build

AVAILABLE = [arch for arch in ARCHS if arch.torchvision is not None]


@pytest.mark.parametrize("arch", AVAILABLE, ids=[arch.key for arch in AVAILABLE])
def test_parameter_counts_are_torchvisions_published_ones(arch):
    model = build_model(arch, meta=True)
    split = parameter_split(model)
    assert split["total"] == sum(p.numel() for p in model.parameters()) == weights_meta(arch)["num_params"]
    assert split["conv"] + split["fc"] + split["other"] == split["total"]


@pytest.mark.parametrize("arch", AVAILABLE, ids=[arch.key for arch in AVAILABLE])
def test_forward_flops_are_twice_torchvisions_published_gmacs(arch):
    """torchvision's `_ops` is GMACs at the weights' crop (rounded to 3 decimals); one MAC is 2 FLOPs."""
    flops = forward_flops(build_model(arch, meta=True), input_size(arch))
    assert flops["total"] / 2e9 == pytest.approx(weights_meta(arch)["_ops"], abs=1e-3)
    assert flops["conv"] + flops["fc"] == flops["total"]


def test_inception_v3_runs_at_its_own_299_px_and_se_resnet_50_is_reported_missing():
    assert input_size(BY_KEY["inception_v3"]) == 299 and input_size(BY_KEY["resnet50"]) == 224
    se = BY_KEY["se_resnet50"]
    assert se.torchvision is None and "no builder in the pinned stack" in se.note
    with pytest.raises(ValueError, match="no builder"):
        build_model(se)


def test_our_vgg16_is_torchvisions_and_its_fc_layers_hold_89_percent_of_the_parameters():
    ours, theirs = build_model(BY_KEY["vgg16"], meta=True), build_model(BY_KEY["tv_vgg16"], meta=True)
    assert parameter_split(ours) == parameter_split(theirs)
    assert forward_flops(ours, 224) == forward_flops(theirs, 224)
    split = parameter_split(ours)
    # fc6 7·7·512 → 4096, fc7 4096 → 4096, fc8 4096 → 1000, weights and biases
    assert split["fc"] == (25088 + 1) * 4096 + (4096 + 1) * 4096 + (4096 + 1) * 1000 == 123_642_856
    assert split["total"] == 138_357_544 and split["fc"] / split["total"] == pytest.approx(0.894, abs=5e-4)
    assert forward_flops(ours, 224)["total"] == 30_940_528_640  # 2 × 15.47 GMACs


@pytest.mark.parametrize(
    ("layer", "side", "expected"),
    [
        (nn.Conv2d(64, 128, 3, padding=1), 56, 2 * 128 * 56 * 56 * 64 * 3 * 3),  # 2 · Cout · H · W · Cin · k²
        (nn.Conv2d(3, 64, 7, stride=2, padding=3), 224, 2 * 64 * 112 * 112 * 3 * 7 * 7),  # ResNet's stem
        (nn.Conv2d(32, 32, 3, padding=1, groups=32), 112, 2 * 32 * 112 * 112 * 1 * 3 * 3),  # depthwise
    ],
)
def test_the_flops_of_one_conv_are_the_hand_formula(layer, side, expected):
    flops = forward_flops(layer, side, channels=layer.in_channels)
    assert flops["total"] == flops["conv"] == expected


def test_saved_activations_of_a_small_net_are_counted_by_hand():
    """conv (saves its input) → in-place ReLU (saves its output, the conv's storage) → max-pool (saves that same
    input, and int64 indices) → linear (saves its flattened input); weights are not activations."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 10))
    floats = 3 * 8 * 8 + 8 * 8 * 8 + 8 * 4 * 4  # image, conv output, pooled output
    indices = 8 * 4 * 4
    assert saved_activation_bytes(net, 8, batch=2) == 4 * floats + 8 * indices


def test_vgg_stages_add_up_to_the_whole_net():
    model = build("D", num_classes=10, width=0.125, fc_width=64, crop=32, init="kaiming",
                  generator=torch.Generator().manual_seed(0))
    stages = vgg_stages(model, batch=2)
    assert [stage["stage"] for stage in stages] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6-8"]
    assert [stage["input_px"] for stage in stages] == [32, 16, 8, 4, 2, 1]
    assert sum(stage["params"] for stage in stages) == parameter_split(model)["total"]
    assert sum(stage["flops"] for stage in stages) == forward_flops(model, 32)["total"]
    assert sum(stage["activation_bytes_per_image"] for stage in stages) == saved_activation_bytes(model, 32, batch=2)


def test_the_benchmark_writes_its_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "architectures.json"
    assert main([str(out), "--models", "alexnet", "resnet18", "se_resnet50", "--repeats", "1"]) == 0
    result = json.loads(out.read_text())
    rows = {row["key"]: row for row in result["rows"]}
    assert list(rows) == ["alexnet", "resnet18", "se_resnet50"] and not rows["se_resnet50"]["available"]
    alexnet = rows["alexnet"]
    assert alexnet["baseline"] and alexnet["cpu"]["train"]["vs_baseline"]["median"] == 1.0
    assert alexnet["cpu"]["forward"]["cpu_vs_baseline"]["median"] == 1.0
    assert alexnet["top1"] == 56.522 and alexnet["top1_per_gflop"] == pytest.approx(56.522 / alexnet["forward_gflops"])
    for row in (alexnet, rows["resnet18"]):
        assert row["cpu_activation_bytes_per_image"] > 0
        for mode in ("forward", "train"):
            rate = row["cpu"][mode]["images_per_s"]
            assert rate["n"] == 1 and rate["min"] <= rate["median"] <= rate["max"] and rate["min"] > 0
            assert row["cpu"][mode]["cpu_s_per_image"]["median"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| AlexNet | 2012 | 224 | 61.10 |" in table and "not measured (no GPU lent)" in table
    assert "| SE-ResNet-50 | 2017 | not measured: no builder in the pinned stack" in table
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert table in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--models: unknown 'vgg99'"):
        main([str(out), "--models", "vgg99"])
