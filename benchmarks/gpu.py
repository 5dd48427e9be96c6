"""VGG-16 (config D) training and evaluation on one GPU: images/s, TFLOP/s and the fraction of the chip's bf16
peak, for the model step alone and with the real input pipeline, all in one run (≈ 2 min on an H200 with 16 CPU
cores, of which ≈ 30 s generate ≈ 4,000 paper-sized images on the first run).

What it measures, in order:
1. ceiling: a large bf16 `torch.matmul` (the chip's practical dense bf16 rate; fp32 in a CPU smoke run without
   AMX-BF16), and the nominal datasheet peak where the card is known;
2. FLOPs: VGG-16's forward at the crop, counted by torch's FlopCounterMode on a meta-device model (30.94 GFLOP
   = 2 × 15.47 GMACs at 224, checked); training counts 3 × forward (≈ 93 GFLOP per image);
3. correctness: bf16-autocast + channels_last logits against fp32 (IEEE fp32: TF32 off) on real crops —
   relative error and top-1 agreement — and the device-decoded crops (vgg.data.gpu_decode) against TrainCrop's;
4. model step: `vgg.train.loop.fit` on device-resident synthetic uint8 batches (bf16 autocast, channels_last,
   cuDNN autotuning, fused SGD, Preprocess with the PCA colour shift, dropout), epoch 2 of 2 timed; eager per
   batch size, then compiled (`TrainConfig.compile`, as the paper profile trains on CUDA); then one 8-step epoch
   under CUDA's sync debug mode counts fit's host synchronisations;
5. input pipeline: the loader alone with each decode (`train_batches`: CPU decode in the workers, or
   `decode_device` = the GPU: nvJPEG + `DeviceTrainCrop`, the profile's `data.decode: device`), then `fit` fed by
   each, compiled as in the paper profile. "steady" leaves out the first wave of batches (worker start-up), which
   an ImageNet epoch of 5,000 batches amortises;
6. evaluation: `score_samples` dense vs multi-crop (§3.2, 50 views) at Q = 256, bf16, channels_last.

The training arms start from the paper's N(0, 0.01) init (§3.1) at its lr, so the loss stays finite; the bf16
check uses a Kaiming-initialised copy, whose activations keep a trained net's scale through the 16 layers.

The JSON is rewritten after every section, so a run stopped at a time limit keeps what it finished.

Data: `--shards DIR` (any `vgg ingest` output, e.g. real ImageNet), else a generated set with ImageNet-like
sizes (vgg.data.synthetic, smallest side 256–400 px, + vgg.data.ingest.ingest) kept in `--data-dir` for reruns.
The training split is listed several times in a view (symlinks + index.json) so an epoch is long enough to
reach the loader's steady state; replicas have the same keys and so the same crops, which costs the same.

    python benchmarks/gpu.py benchmarks/out/gpu.json                 # on a CUDA machine
    python benchmarks/gpu.py benchmarks/out/gpu.json --eager         # no torch.compile anywhere
    python benchmarks/gpu.py out.json --cpu-smoke                    # tiny sizes, a few steps: the code path only

`--cpu-smoke` (automatic without CUDA) runs every section with a width-×0.125 VGG-16 on 32 px crops on the CPU
in ~20 s, eager unless `--compile`: its numbers are not performance figures. Exit status 1 when a section failed
(its error is in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vgg.config import ScaleRange, SynthConfig, TrainConfig
from vgg.data.gpu_decode import DeviceTrainCrop
from vgg.data.batch import Batch
from vgg.data.ingest import ingest
from vgg.data.loader import batches_per_epoch, train_batches
from vgg.data.preprocessing import ALPHA_STD, Preprocess
from vgg.data.samples import iter_samples
from vgg.data.shard_format import read_index, read_stats
from vgg.data.synthetic import synthesize
from vgg.data.transforms import TrainCrop, jpeg_size
from vgg.evaluate.posteriors import EvalOptions, score_samples
from vgg.files import write_atomic
from vgg.models import build, checkpoint
from vgg.train import precision
from vgg.train.loop import Hooks, fit

ROOT = Path(__file__).resolve().parents[1]
PAPER_FORWARD_GFLOP = 30.94  # VGG-16 at 224: 15.47 GMACs × 2 FLOP (timm/fvcore count)
TRAIN_FLOP_FACTOR = 3  # forward + backward ≈ 3 × forward
TARGET_IMAGES_PER_S = 4300  # ≈ 50% of ~800 TFLOP/s at ≈ 93 GFLOP per image: the goal with data loading, one H100
BF16_TOLERANCE = 0.05  # relative logits error; measured ≈ 0.01 for VGG-16 (CPU, kaiming init)
DECODE_TOLERANCE = 3.0  # grey levels, mean |device crop − TrainCrop|: nvJPEG's IDCT/upsampling ≠ libjpeg-turbo's
# Training and evaluation precision: bf16 autocast on CUDA and on AMX-BF16 CPUs, fp32 elsewhere (vgg.train.precision;
# on an AVX2-only CPU a bf16 conv costs 10-35x fp32, which would make the smoke run minutes). bf16_check always
# runs the bf16 forward.
PRECISION = "auto"
# Nominal dense bf16 tensor-core peaks, TFLOP/s (NVIDIA datasheets), by a substring of the device name; first match.
NOMINAL_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                       ("A100", 312.0))


@dataclass(frozen=True)
class Setup:
    """Sizes of one run: the paper's on a GPU, or tiny ones for the CPU smoke test."""

    name: str
    num_classes: int
    width: float  # conv width multiplier (1.0 = Table 1)
    fc_width: int
    crop: int  # px
    batches: tuple[int, ...]  # step batch sizes; the first also feeds the pipeline arms
    steps: int  # optimizer steps per epoch in the synthetic arms
    scale: ScaleRange  # training S (§3.1)
    synth: SynthConfig  # the generated shards
    max_side: int  # ingest's max_side, px
    shard_size: int
    epoch_images: int  # images per pipeline epoch (the train split is replicated up to this)
    matmul: int  # n of the n × n × n bf16 ceiling matmul
    correctness_images: int
    eval_images: int
    eval_q: int  # px, test scale Q (§3.2)
    eval_batch: int  # views per forward pass


GPU = Setup(
    name="gpu", num_classes=1000, width=1.0, fc_width=4096, crop=224, batches=(256, 128), steps=20,
    scale=ScaleRange(256, 256),
    # 100 classes × 40: ≥ 256 images per synth worker, so all 16 cores draw; smallest side 256–400 px, long side
    # up to 1.5× (ImageNet's typical 500×375 lies inside); ingest at the paper's max_side.
    synth=SynthConfig(classes=100, train_per_class=40, val_per_class=1, min_side=256, max_side=400, seed=0),
    max_side=512, shard_size=250, epoch_images=128 * 256, matmul=8192, correctness_images=16, eval_images=32,
    eval_q=256, eval_batch=128,
)
SMOKE = Setup(
    name="cpu-smoke", num_classes=4, width=0.125, fc_width=32, crop=32, batches=(8,), steps=2,
    scale=ScaleRange(40, 40),
    synth=SynthConfig(classes=4, train_per_class=8, val_per_class=2, min_side=48, max_side=96, seed=0),
    max_side=72, shard_size=16, epoch_images=32, matmul=512, correctness_images=4, eval_images=3,
    eval_q=40, eval_batch=64,
)


# ---------------------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_for(setup: Setup, device: torch.device, init: str) -> nn.Module:
    """VGG-16 at the setup's sizes. Kaiming init keeps activations at a trained net's scale through 16 layers:
    realistic numerics for the bf16 check. Training from it at the paper's lr (0.01, inputs in grey levels)
    diverges to NaN within steps; the paper's N(0, 0.01) (§3.1) trains, its signal fading with depth."""
    with torch.device(device):
        return build("D", num_classes=setup.num_classes, width=setup.width, fc_width=setup.fc_width,
                     crop=setup.crop, init=init, generator=torch.Generator(device).manual_seed(0))


def matmul_ceiling(n: int, device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of an n × n × n matmul in `dtype` (best of 3 timings of 10 products)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = math.inf
    for _ in range(3):
        sync(device)
        started = time.perf_counter()
        for _ in range(10):
            torch.matmul(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - started) / 10)
    return 2 * n**3 / best / 1e12


def forward_gflop(*, width: float, fc_width: int, num_classes: int, crop: int, config: str = "D") -> float:
    """GFLOP of one image's forward pass of `config` (VGG-16 = D), counted on a meta-device model (no memory, no
    compute)."""
    with torch.device("meta"):
        model = build(config, num_classes=num_classes, width=width, fc_width=fc_width, crop=crop)
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, crop, crop))
    return counter.get_total_flops() / 1e9


def nominal_peak(device_name: str) -> float | None:
    return next((peak for key, peak in NOMINAL_BF16_TFLOPS if key in device_name), None)


# ---------------------------------------------------------------------------------------------------- data


def prepare_shards(setup: Setup, data_dir: Path, *, workers: int) -> Path:
    """Generated raw archives + their `vgg ingest` output under data_dir, made once (reused when complete)."""
    shards = data_dir / "shards"
    if not (shards / "index.json").is_file():
        synthesize(data_dir / "raw", setup.synth, workers=workers)
        ingest(data_dir / "raw", shards, max_side=setup.max_side, shard_size=setup.shard_size, workers=workers)
    return shards


def replicated_view(source: Path, view: Path, *, min_train: int) -> tuple[Path, int]:
    """A shards directory at `view` whose train split lists the source's train shards R times (symlinks), with
    R the least for ≥ `min_train` samples; val and stats.json as the source's. Returns (view, R)."""
    index = json.loads((source / "index.json").read_text())
    train = index["splits"]["train"]
    copies = max(1, math.ceil(min_train / train["count"]))
    view.mkdir(parents=True, exist_ok=True)
    shards = []
    for copy in range(copies):
        for entry in train["shards"]:
            name = f"train-r{copy:03d}-{entry['file']}"
            link = view / name
            if not link.is_symlink():
                link.symlink_to((source / entry["file"]).resolve())
            shards.append({**entry, "file": name})
    for entry in index["splits"].get("val", {}).get("shards", []):
        link = view / entry["file"]
        if not link.is_symlink():
            link.symlink_to((source / entry["file"]).resolve())
    stats = view / "stats.json"
    if not stats.is_symlink():
        stats.symlink_to((source / "stats.json").resolve())
    index["splits"]["train"] = {"count": train["count"] * copies, "shards": shards}
    _write_json(view / "index.json", index)
    return view, copies


def data_summary(shards: Path, *, samples: int = 256) -> dict[str, Any]:
    """Mean JPEG size and pixel size of the first train samples (decode cost grows with both)."""
    kb, widths, heights = [], [], []
    for sample in islice(iter_samples(shards, "train"), samples):
        width, height = jpeg_size(sample.jpeg)
        kb.append(len(sample.jpeg) / 1e3)
        widths.append(width)
        heights.append(height)
    index = read_index(shards)
    return {"train_images": index.split("train").count, "mean_jpeg_kb": round(float(np.mean(kb)), 1),
            "mean_size": [round(float(np.mean(widths))), round(float(np.mean(heights)))]}


# ---------------------------------------------------------------------------------------------------- sections


def check_bf16(model: nn.Module, images: torch.Tensor, preprocess: nn.Module, device: torch.device) -> dict:
    """fp32 (IEEE: TF32 off) vs bf16 autocast + channels_last logits on the same preprocessed crops, eval mode."""
    conv, matmul = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    was_training = model.training
    model.eval()
    try:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = "ieee", "ieee"
        # Layout changes outside inference mode: there they would turn the parameters into inference tensors.
        model.to(memory_format=torch.contiguous_format)
        with torch.inference_mode():
            x = preprocess(images.to(device))
            reference = model(x.contiguous()).float()
        model.to(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            low = model(x.contiguous(memory_format=torch.channels_last)).float()
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = conv, matmul
        model.train(was_training)
    relative = float((low - reference).norm() / reference.norm())
    agreement = float((low.argmax(1) == reference.argmax(1)).float().mean())
    return {"images": len(images), "relative_error": relative, "top1_agreement": agreement,
            "tolerance": BF16_TOLERANCE, "passed": bool(relative < BF16_TOLERANCE)}


def check_device_decode(jpegs: list[bytes], setup: Setup, device: torch.device) -> dict:
    """DeviceTrainCrop on `device` vs TrainCrop (CPU) for the same per-image draws."""
    reference = TrainCrop(scale=setup.scale, crop=setup.crop)
    rngs = [np.random.default_rng(i) for i in range(len(jpegs))]
    expected = torch.stack([reference(jpeg, np.random.default_rng(i)) for i, jpeg in enumerate(jpegs)])
    draws = [rng.random(4) for rng in rngs]
    crops = DeviceTrainCrop(scale=setup.scale, crop=setup.crop)(jpegs, draws, device=device).cpu()
    error = (crops.int() - expected.int()).abs().float()
    mean = float(error.mean())
    return {"images": len(jpegs), "mean_abs_diff": mean, "max_abs_diff": float(error.max()),
            "tolerance": DECODE_TOLERANCE, "passed": bool(mean <= DECODE_TOLERANCE)}


class Clock(Hooks):
    """When fit pulls each batch, and when each epoch ends (after fit's end-of-epoch host sync)."""

    def __init__(self) -> None:
        self.pulls: list[float] = []
        self.ends: list[float] = []

    def wrap(self, batches: Iterable[Any]) -> Iterator[Any]:
        for batch in batches:
            self.pulls.append(time.perf_counter())
            yield batch

    def on_epoch_end(self, metrics: dict[str, float], checkpoint: Callable[[], dict[str, Any]]) -> None:
        self.ends.append(time.perf_counter())


def fit_arm(*, model: nn.Module, train: TrainConfig, header: dict, preprocess: nn.Module, device: torch.device,
            batch: int, epochs: int, steps: int, batches: Callable[[int, int], Iterable[Any]], compile_model: bool,
            skip: int) -> dict:
    """`fit` for `epochs` epochs of `steps` steps; images/s of the last epoch as fit reports it, and "steady":
    the last epoch's batches from #`skip` on (after the first wave of loader workers) over their wall time."""
    config = dataclasses.replace(train, batch_size=batch, micro_batch=batch, workers=1, use_gpu=device.type == "cuda",
                                 max_epochs=epochs, checkpoint_every=0, precision=PRECISION, channels_last=True,
                                 compile=compile_model)
    clock = Clock()
    result = fit(model=model, config=config, lr=config.lr,
                 batches=lambda epoch, start: clock.wrap(batches(epoch, start)), steps_per_epoch=steps,
                 validate=lambda core: (100.0, 100.0), preprocess=preprocess, device=device, header=header, hooks=clock)
    last = clock.pulls[-steps:]
    steady = (steps - skip) * batch / (clock.ends[-1] - last[skip])
    return {"batch": batch, "steps": steps, "epochs": epochs, "images_per_s": result.history[-1]["train/images_per_s"],
            "steady_images_per_s": steady, "loss": result.history[-1]["train/loss"]}


def drain(batches: Iterable[Batch], *, device: torch.device, skip: int) -> dict:
    """Images/s of an input pipeline alone: over the whole pass, and from batch #`skip` on."""
    started, pulls, images = time.perf_counter(), [], 0
    for batch in batches:
        images += len(batch.labels)
        pulls.append(time.perf_counter())
    sync(device)
    end = time.perf_counter()
    size = images / len(pulls)
    return {"batch": round(size), "steps": len(pulls), "images_per_s": images / (end - started),
            "steady_images_per_s": (len(pulls) - 1 - skip) * size / (pulls[-1] - pulls[skip])}


def sync_audit(run: Callable[[], Any], *, steps: int) -> dict:
    """Host synchronisations (D2H copies, .item(), stream syncs) while `run` trains `steps` steps of one epoch,
    counted by CUDA's sync debug mode; fit should have only its epoch-end ones (loss sum, DDP totals)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"steps": steps, "syncs": len(syncs), "syncs_per_step": len(syncs) / steps, "kinds": sorted(set(syncs))}


def evaluation(model: nn.Module, samples: list, setup: Setup, preprocess: nn.Module, device: torch.device,
               threads: int) -> list[dict]:
    """Dense vs multi-crop (§3.2) at one Q, end to end through score_samples (decode and rescale in threads).
    Each mode passes over the samples twice: the first meets every image's shape anew (generated images have
    random aspect ratios, so each is a new input size for dense), the second has every shape's kernels ready
    (ImageNet's photos, mostly 4:3 or 3:4, come in few sizes)."""
    rows = []
    for mode in ("dense", "multicrop"):
        options = EvalOptions(mode=mode, scales=[setup.eval_q], batch_size=setup.eval_batch, device=device,
                              precision=PRECISION, channels_last=True, workers=threads)
        score_samples(model, samples[:2], options, preprocess=preprocess)  # warm-up: the thread pool, the first kernels
        rates = []
        for _ in range(2):
            sync(device)
            started = time.perf_counter()
            score_samples(model, samples, options, preprocess=preprocess)
            sync(device)
            rates.append(len(samples) / (time.perf_counter() - started))
        views = 2 if mode == "dense" else 2 * 5 * 5
        rows.append({"mode": mode, "q": setup.eval_q, "images": len(samples), "images_per_s": rates[0],
                     "views_per_s": views * rates[0], "seen_shapes_images_per_s": rates[1]})
    return rows


# ---------------------------------------------------------------------------------------------------- main


def run_section(result: dict[str, Any], name: str, run: Callable[[], Any], *, save: Callable[[], None],
                label: str) -> Any:
    """run(), or None with its error in result["errors"]: one failed arm must not cost the rest of a device run.
    Its seconds go to result["seconds"], and `save` runs after each section, so what finished so far survives a run
    stopped at its time limit."""
    print(f"[{label}] {name} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        return run()
    except Exception as error:
        traceback.print_exc()
        result["errors"][name] = f"{type(error).__name__}: {error}"
        return None
    finally:
        result["seconds"][name] = round(time.perf_counter() - started, 2)
        save()


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSON results file")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    parser.add_argument("--eager", action="store_true", help="no torch.compile on CUDA (the paper profile compiles)")
    parser.add_argument("--compile", action="store_true", help="torch.compile in the CPU smoke run too")
    parser.add_argument("--shards", type=Path, help="an existing `vgg ingest` output instead of generated data")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "out" / "gpu-data",
                        help="where generated data and the replicated view live (reused across runs)")
    parser.add_argument("--workers", type=int, help="loader worker processes (default: CPUs − 2)")
    parser.add_argument("--batches", type=int, nargs="+", help="step batch sizes (default: 256 128)")
    parser.add_argument("--steps", type=int, help="steps per timed synthetic epoch (default: 20)")
    args = parser.parse_args()

    smoke = args.cpu_smoke or not torch.cuda.is_available()
    setup = SMOKE if smoke else GPU
    setup = dataclasses.replace(setup, batches=tuple(args.batches or setup.batches), steps=args.steps or setup.steps)
    device = torch.device("cpu" if smoke else "cuda")
    cpus = os.cpu_count() or 1
    workers = args.workers or (1 if smoke else max(1, cpus - 2))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result: dict[str, Any] = {
        "benchmark": "gpu", "mode": setup.name, "performance_figure": not smoke,
        "date": time.strftime("%Y-%m-%d"), "device": device_name, "torch": torch.__version__,
        "cuda": torch.version.cuda, "cpus": cpus, "loader_workers": workers, "setup": dataclasses.asdict(setup),
        "precision": str(precision.resolve(PRECISION, device)).removeprefix("torch."), "errors": {}, "seconds": {},
    }

    def section(name: str, run: Callable[[], Any]) -> Any:
        return run_section(result, name, run, save=lambda: _write_json(args.out, result), label="gpu.py")

    from pipelines.params import load_profile

    profile = load_profile(ROOT / "params.yaml", profile="paper")
    header = checkpoint.header(config="D", profile=profile, scale=setup.scale)
    peak = nominal_peak(device_name) if not smoke else None
    # In the step's compute dtype: bf16 on CUDA; fp32 on a CPU without AMX-BF16 (PRECISION).
    dtype = precision.resolve(PRECISION, device)
    ceiling = result["matmul_tflops"] = section("matmul_tflops", lambda: matmul_ceiling(setup.matmul, device, dtype))
    result["nominal_peak_tflops"] = peak
    gflop = forward_gflop(width=setup.width, fc_width=setup.fc_width, num_classes=setup.num_classes, crop=setup.crop)
    paper = forward_gflop(width=1.0, fc_width=4096, num_classes=1000, crop=224)
    result["flops"] = {"forward_gflop": gflop, "train_gflop_per_image": TRAIN_FLOP_FACTOR * gflop,
                       "vgg16_224_forward_gflop": paper,
                       "vgg16_matches_paper": abs(paper - PAPER_FORWARD_GFLOP) < 0.01 * PAPER_FORWARD_GFLOP}

    # One process for the smoke: a spawned pool costs more (re-imports) than its few images.
    source = args.shards or prepare_shards(setup, args.data_dir / setup.name, workers=1 if smoke else cpus)
    view, copies = replicated_view(source, args.data_dir / setup.name / "view", min_train=setup.epoch_images)
    result["data"] = {"shards": str(source), "replicas": copies, **data_summary(source)}
    preprocess = Preprocess(read_stats(source)).to(device)
    compile_fit = profile.train.compile if device.type == "cuda" and not args.eager else args.compile
    result["compile"] = compile_fit

    jpegs = [sample.jpeg for sample in islice(iter_samples(source, "train"), setup.correctness_images)]
    crops = torch.stack([TrainCrop(scale=setup.scale, crop=setup.crop)(jpeg, np.random.default_rng(i))
                         for i, jpeg in enumerate(jpegs)])
    result["bf16_check"] = section(
        "bf16_check", lambda: check_bf16(model_for(setup, device, "kaiming"), crops, preprocess, device))
    result["decode_check"] = section("decode_check", lambda: check_device_decode(jpegs, setup, device))

    def tflops(images_per_s: float) -> dict:
        achieved = images_per_s * TRAIN_FLOP_FACTOR * gflop / 1e3
        return {"tflops": achieved, "mfu_of_matmul": achieved / ceiling if ceiling else None,
                "mfu_of_nominal": achieved / peak if peak else None}

    # 4. Model step on synthetic device-resident batches.
    generator = torch.Generator().manual_seed(0)
    steps_rows = result["step"] = []

    def synthetic_batch(batch: int) -> Batch:
        images = torch.randint(0, 256, (batch, setup.crop, setup.crop, 3), dtype=torch.uint8, generator=generator)
        return Batch(images.permute(0, 3, 1, 2).to(device), torch.randint(setup.num_classes, (batch,)).to(device),
                     (ALPHA_STD * torch.randn(batch, 3, generator=generator)).to(device))

    model = model_for(setup, device, profile.model.init)  # trained on by every arm below, in turn

    def step_arm(batch: int, compile_model: bool) -> None:
        synthetic = synthetic_batch(batch)
        name = f"step b{batch}" + (" compile" if compile_model else "")
        row = section(name, lambda: fit_arm(model=model, train=profile.train, header=header, preprocess=preprocess,
                                            device=device, batch=batch, epochs=2, steps=setup.steps,
                                            batches=lambda epoch, start: [synthetic] * (setup.steps - start),
                                            compile_model=compile_model, skip=0))
        if row is not None:
            steps_rows.append({"arm": name, "compile": compile_model, **row, **tflops(row["images_per_s"])})

    for batch in setup.batches:
        step_arm(batch, compile_model=False)
    if compile_fit:
        step_arm(setup.batches[0], compile_model=True)
    if device.type == "cuda":  # CUDA's sync debug mode: does fit's step wait for the GPU anywhere?
        audit_batch = synthetic_batch(setup.batches[-1])

        def audited() -> dict:
            return fit_arm(model=model, train=profile.train, header=header, preprocess=preprocess, device=device,
                           batch=len(audit_batch.labels), epochs=1, steps=8, compile_model=False, skip=0,
                           batches=lambda epoch, start: [audit_batch] * (8 - start))

        result["sync_audit"] = section("sync_audit", lambda: sync_audit(audited, steps=8))

    # 5. Input pipelines, alone and feeding fit, at the first batch size.
    batch = setup.batches[0]
    steps = min(batches_per_epoch(read_index(view), batch_size=batch, world_size=1), setup.epoch_images // batch)

    def loader(epoch: int, start: int = 0, decode_device: torch.device | None = None) -> Iterable[Batch]:
        return islice(train_batches(view, scale=setup.scale, crop=setup.crop, batch_size=batch, rank=0, world_size=1,
                                    workers=workers, epoch=epoch, seed=0, start_batch=start,
                                    decode_device=decode_device), steps - start)

    def on_device(epoch: int, start: int = 0) -> Iterable[Batch]:
        return loader(epoch, start, decode_device=device)

    wave = min(workers, steps // 2)  # the loader's first batches arrive together, after its workers start up
    pipeline_rows = result["pipeline"] = []
    for name, make, skip in (("cpu-decode", loader, wave), ("device-decode", on_device, min(2, steps // 2))):
        alone = section(f"{name}_alone", lambda: drain(make(0), device=device, skip=skip))
        fed = section(f"{name}_fit", lambda: fit_arm(model=model, train=profile.train, header=header,
                                                     preprocess=preprocess, device=device, batch=batch, epochs=1,
                                                     steps=steps, batches=make, compile_model=compile_fit,
                                                     skip=skip))
        for kind, row in (("alone", alone), ("fit", fed)):
            if row is not None:
                extra = tflops(row["steady_images_per_s"]) if kind == "fit" else {}
                pipeline_rows.append({"arm": f"{name} {kind}", **row, **extra})

    # 6. Evaluation with cuDNN's heuristics, as `vgg evaluate` runs (fit turned autotuning on): dense sees a new
    # input size per image, and autotuning each is slow.
    torch.backends.cudnn.benchmark = False
    samples = list(islice(iter_samples(source, "val"), setup.eval_images))
    result["evaluation"] = section(
        "evaluation", lambda: evaluation(model, samples, setup, preprocess, device, threads=min(8, cpus)))

    best = max((row["steady_images_per_s"] for row in pipeline_rows if row["arm"].endswith("fit")), default=None)
    result["goal"] = {"target_images_per_s": TARGET_IMAGES_PER_S, "best_with_data_images_per_s": best,
                      "met": None if smoke or best is None else best >= TARGET_IMAGES_PER_S}
    _write_json(args.out, result)
    print_table(result)
    return 1 if result["errors"] else 0


def print_table(result: dict) -> None:
    setup = result["setup"]
    print(f"\nVGG-16 (D) at {setup['crop']} px on {result['device']} ({result['mode']}; torch {result['torch']}, "
          f"CUDA {result['cuda']}), {result['precision']}, {result['loader_workers']} loader workers")
    if not result["performance_figure"]:
        print("CPU smoke: tiny sizes, code path only — not a performance figure")
    ceiling, peak = result.get("matmul_tflops"), result.get("nominal_peak_tflops")
    print(f"{result['precision']} matmul ceiling {ceiling or float('nan'):.3g} TFLOP/s; nominal peak "
          f"{peak or 'unknown'}; forward {result['flops']['forward_gflop']:.3f} GFLOP/image (VGG-16 @224 counted "
          f"{result['flops']['vgg16_224_forward_gflop']:.2f})")
    for key in ("bf16_check", "decode_check"):
        check = result.get(key)
        if check:
            detail = (f"relative error {check['relative_error']:.4f}, top-1 agreement {check['top1_agreement']:.2f}"
                      if key == "bf16_check" else
                      f"mean |Δ| {check['mean_abs_diff']:.2f}, max {check['max_abs_diff']:.0f} grey levels")
            print(f"{key}: {'PASS' if check['passed'] else 'FAIL'} ({detail}; tolerance {check['tolerance']})")
    audit = result.get("sync_audit")
    if audit:
        print(f"host syncs in fit: {audit['syncs']} over {audit['steps']} steps (one epoch); {audit['kinds']}")
    print(f"\n{'arm':<44} {'batch':>5} {'img/s':>9} {'steady':>9} {'TFLOP/s':>8} {'MFU mm':>7} {'MFU nom':>7}")
    for row in result["step"] + result["pipeline"]:
        def pct(value: float | None) -> str:
            return f"{100 * value:6.1f}%" if value is not None else f"{'-':>7}"
        tflops = f"{row['tflops']:8.3g}" if "tflops" in row else f"{'-':>8}"
        print(f"{row['arm']:<44} {row['batch']:>5} {row['images_per_s']:>9.1f} {row['steady_images_per_s']:>9.1f} "
              f"{tflops} {pct(row.get('mfu_of_matmul'))} {pct(row.get('mfu_of_nominal'))}")
    for row in result.get("evaluation") or []:
        print(f"{'eval ' + row['mode'] + ' Q=' + str(row['q']):<44} {'':>5} {row['images_per_s']:>9.1f} "
              f"{row['seen_shapes_images_per_s']:>9.1f} {row['views_per_s']:>8.0f} views/s")
    if result.get("evaluation"):
        print("(eval rows: img/s on first meeting each image's shape; 'steady' = a second pass, shapes seen)")
    goal = result["goal"]
    best = goal["best_with_data_images_per_s"]
    print(f"\ngoal ≥ {goal['target_images_per_s']} img/s with data: best {best if best is None else round(best)} "
          f"(met: {goal['met']})")
    for name, error in result["errors"].items():
        print(f"ERROR in {name}: {error}")


if __name__ == "__main__":
    sys.exit(main())
