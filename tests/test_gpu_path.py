"""The GPU path on the CPU: the device-side JPEG decode + crop against TrainCrop, the bf16 + channels_last training
step, and benchmarks/gpu.py end to end in its CPU smoke mode."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.params import load_profile
from vgg.config import ScaleRange, SynthConfig
from vgg.data.gpu_decode import DeviceTrainCrop, decode_jpegs
from vgg.data.preprocessing import Preprocess
from vgg.data.shard_format import ColourStats
from vgg.data.synthetic import render
from vgg.data.transforms import TrainCrop, decode_chw
from vgg.errors import ConfigError, DataError
from vgg.models import build
from vgg.train import precision
from vgg.train.loop import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def ramps(width: int, height: int) -> bytes:
    """Red rises left to right, green top to bottom (0–255 over the image): a window shifted by one rescaled px
    changes them by ≥ 4 grey levels at the sizes below, while any smooth resampling filter keeps them."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), np.full((height, width), 128.0)], axis=-1)
    return jpeg(Image.fromarray(pixels.round().astype(np.uint8)), quality=95)


def both(jpegs: list[bytes], scale: ScaleRange, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TrainCrop's crops and DeviceTrainCrop's (device = CPU) for the same per-image generators (seeds 0..N-1)."""
    reference = TrainCrop(scale=scale, crop=crop)
    expected = torch.stack([reference(data, np.random.default_rng(i)) for i, data in enumerate(jpegs)])
    draws = [np.random.default_rng(i).random(4) for i in range(len(jpegs))]
    return expected, DeviceTrainCrop(scale=scale, crop=crop)(jpegs, draws, device=CPU)


def test_device_crop_is_train_crop_when_decoded_at_full_size():
    # Generated photos (texture, edges, noise) whose smallest side is < 2 S: TrainCrop decodes them at full size.
    config = SynthConfig(classes=10, train_per_class=1, val_per_class=1, min_side=48, max_side=90, seed=0)
    jpegs = [jpeg(render(config, split=0, label=i % 10, index=i)) for i in range(12)]
    scale = ScaleRange(48, 64)
    assert all(min(decode_chw(data, min_side=scale.s_max).shape[1:]) < 2 * scale.s_min for data in jpegs)
    expected, crops = both(jpegs, scale, 32)
    assert crops.shape == (12, 3, 32, 32) and crops.dtype == torch.uint8
    assert crops.is_contiguous(memory_format=torch.channels_last)  # the layout of batch.Batch.images
    error = (crops.int() - expected.int()).abs().float()
    # Same window and flip; float32 vs uint8 resampling rounds differently (module doc: ~0.15 mean, ≤ ~5 max).
    assert error.mean() < 0.5 and error.max() <= 8
    assert (error.mean(dim=(1, 2, 3)) < 1.0).all()
    # A different draw gives a different crop: the comparison above can fail.
    other = DeviceTrainCrop(scale=scale, crop=32)(jpegs, [np.random.default_rng(i + 100).random(4) for i in range(12)],
                                                  device=CPU)
    assert (other.int() - expected.int()).abs().float().mean() > 5


@pytest.mark.parametrize("size", [(243, 161), (161, 243), (517, 389), (90, 70)])
def test_device_crop_geometry_is_train_crops_also_where_train_crop_uses_draft_decoding(size):
    # 243×161 at S = 40: TrainCrop decodes at 1/4 in the DCT to 61×41 (rounded up), whose rescale is 59×40, not
    # the full image's 60×40; the device crop must follow the draft's sizes to land on the same window.
    data = ramps(*size)
    for scale in (ScaleRange(40, 40), ScaleRange(40, 56), ScaleRange(64, 100)):
        expected, crops = both([data] * 16, scale, 32)
        error = (crops.int() - expected.int()).abs().float()
        assert error.mean(dim=(1, 2, 3)).max() < 1.0, scale  # a 1 px shift costs ≥ 1.2 here (measured)
        assert error.max() <= 3


def test_device_crop_of_draft_sized_photos_is_within_a_couple_of_grey_levels():
    config = SynthConfig(classes=10, train_per_class=1, val_per_class=1, min_side=100, max_side=300, seed=1)
    jpegs = [jpeg(render(config, split=0, label=i % 10, index=i)) for i in range(10)]
    expected, crops = both(jpegs, ScaleRange(40, 48), 32)  # every image ≥ 2 S: all draft-decoded by TrainCrop
    error = (crops.int() - expected.int()).abs().float()
    assert error.mean() < 1.5 and error.mean(dim=(1, 2, 3)).max() < 4


def test_decode_jpegs_is_libjpeg_turbo_on_the_cpu_and_rejects_bad_input():
    data = ramps(90, 70)
    (image,) = decode_jpegs([data], device=CPU)
    assert torch.equal(image, decode_chw(data, min_side=10_000))  # full-size decode, same decoder
    with pytest.raises(DataError, match="cannot decode a JPEG") as error:
        decode_jpegs([data, data[:300]], device=CPU)
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="no JPEGs"):
        decode_jpegs([], device=CPU)
    with pytest.raises(DataError, match="draws"):
        DeviceTrainCrop(scale=ScaleRange(40, 40), crop=32)([data, data], [[0.5] * 4], device=CPU)
    with pytest.raises(ConfigError, match="crop"):
        DeviceTrainCrop(scale=ScaleRange(32, 64), crop=48)


def test_bf16_channels_last_training_step_on_the_cpu():
    """What fit's CUDA step does, on the CPU: uint8 NHWC batch → Preprocess (PCA shift, mean) → bf16 autocast
    forward in channels_last → fp32 loss → backward → fused SGD."""
    torch.manual_seed(0)
    model = build("D", num_classes=4, width=0.125, fc_width=32, crop=32, init="kaiming",
                  generator=torch.Generator().manual_seed(0)).to(memory_format=torch.channels_last)
    stats = ColourStats(mean_rgb=torch.tensor([124.0, 116.0, 104.0]), eigval=torch.tensor([55.0, 5.0, 1.0]) * 255,
                        eigvec=torch.eye(3))
    preprocess = Preprocess(stats)
    generator = torch.Generator().manual_seed(1)
    smooth = F.interpolate(torch.rand(8, 3, 4, 4, generator=generator) * 255, size=(32, 32), mode="bilinear")
    images = smooth.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # as Batch
    labels, colour = torch.arange(8) % 4, 0.1 * torch.randn(8, 3, generator=generator)

    x = preprocess(images, colour)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(x, preprocess(images))  # the colour shift is applied
    dtype = precision.resolve("bf16", CPU)
    model.eval()
    with torch.no_grad():
        reference = model(x.contiguous()).float()
        with precision.autocast(CPU, dtype):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).norm() / reference.norm() < 0.05

    model.train()
    optimizer = make_optimizer(model, config=load_profile(ROOT / "params.yaml", profile="small").train, lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    with precision.autocast(CPU, dtype):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Every weight moves (gradient + weight decay); a zero bias of a unit that never fired may stay.
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before) if p.ndim > 1)


def test_gpu_benchmark_smoke_mode_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), str(out), "--cpu-smoke",
         "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu-smoke" and result["performance_figure"] is False and result["errors"] == {}
    for key in ("matmul_tflops", "flops", "bf16_check", "decode_check", "step", "pipeline", "evaluation", "goal",
                "data", "device", "date"):
        assert result[key] is not None, key
    assert result["bf16_check"]["passed"] and result["bf16_check"]["relative_error"] < 0.05
    assert result["decode_check"]["passed"]
    assert result["flops"]["vgg16_matches_paper"] and abs(result["flops"]["vgg16_224_forward_gflop"] - 30.94) < 0.01
    assert result["flops"]["train_gflop_per_image"] == pytest.approx(3 * result["flops"]["forward_gflop"])
    assert [row["arm"] for row in result["pipeline"]] == ["cpu-decode alone", "cpu-decode fit",
                                                          "device-decode alone", "device-decode fit"]
    rows = result["step"] + result["pipeline"]
    assert rows and all(row["images_per_s"] > 0 and row["steady_images_per_s"] > 0 for row in rows)
    assert all(row["tflops"] > 0 for row in rows if "tflops" in row)
    assert [row["mode"] for row in result["evaluation"]] == ["dense", "multicrop"]
    assert result["goal"]["met"] is None  # a smoke run is no performance figure
    assert "not a performance figure" in done.stdout
