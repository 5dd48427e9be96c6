"""Training throughput of VGG-A at 224 px: our step (vgg.train.loop.fit) vs torchvision's vgg11 in a plain loop.

Both train the same architecture (Table 1, A = torchvision's vgg11) on the same batch size, in the same run:

- baseline: `torchvision.models.vgg11()`, float input, fp32, NCHW, `SGD(momentum, weight_decay)`, cross-entropy —
  the loop torchvision's reference train.py runs.
- ours: `vgg.models.build("A")` trained by `fit()` exactly as a stage does — `Preprocess` (uint8 → float, PCA
  colour shift, mean RGB), the precision policy (`--precision auto`: bf16 autocast on CUDA or an AMX-BF16 CPU,
  fp32 elsewhere; channels-last where it pays, vgg.train.precision), fused SGD, dropout, per-step dropout
  reseeding. images/s is fit's own
  `train/images_per_s` of its second epoch (the first warms up oneDNN/cuDNN).

End to end (`--e2e`, after the step table): `vgg train` exactly as a DVC stage runs it (local Ray started by the
command, the input pipeline from shards, validation, checkpoints, MLflow tracking and registration) against a
torchvision reference `train.py`-style script (ImageFolder over the extracted JPEGs, RandomResizedCrop + flip,
vgg11 fp32, one validation pass), both for one epoch of the same generated images at 224 px (`vgg synth` with
ImageNet-like sizes; for `vgg train`, `vgg ingest`d shards). Reported: the wall time of each command and its
images/s over the whole command, and the training rate over the epoch inside it (first batch included).

Every step arm runs in a fresh process, once with glibc's default malloc and once with the Makefile's tuning
(`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`: keep freed memory instead of page-faulting it back on
every step). Those variables only act when set before the process starts, so the launcher (Makefile, Ray
`runtime_env`) must set them; this script does so for its child processes.

    python benchmarks/train_step.py --out results/bench_train_step.json
    python benchmarks/train_step.py --batch 16 --steps 4 --precision bf16
    python benchmarks/train_step.py --e2e --out benchmarks/out/train_step.json     # + end to end, ~6 more min

Defaults (batch 8, 2 timed steps) take about 2-3 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vgg.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
MALLOC_TUNED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
GFLOP_PER_IMAGE = 3 * 7.61 * 2  # VGG-A at 224: forward 7.61 GMACs; backward ≈ 2× forward; 2 FLOP per MAC
CROP = 224  # px, §2.1
E2E_CLASSES, E2E_TRAIN_PER_CLASS, E2E_VAL_PER_CLASS = 4, 12, 4  # 48 training images: 6 steps of batch 8
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's reference transforms


def baseline(*, batch: int, steps: int, device: torch.device) -> dict[str, float]:
    """torchvision vgg11, fp32 NCHW, plain loop; images/s over `steps` steps after one warm-up step."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vgg11().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(batch, 3, CROP, CROP, device=device)
    labels = torch.randint(1000, (batch,), device=device)
    started, cpu = 0.0, 0.0
    for step in range(steps + 1):
        if step == 1:
            _sync(device)
            started, cpu = time.perf_counter(), time.process_time()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _sync(device)
    return {
        "images_per_s": batch * steps / (time.perf_counter() - started),
        "cpu_s_per_image": (time.process_time() - cpu) / (batch * steps),
    }


def ours(*, batch: int, steps: int, device: torch.device, precision: str, compile_model: bool) -> dict[str, float]:
    """vgg.models.build("A") through fit(): two epochs of `steps` steps; images/s of the second."""
    from pipelines.params import load_profile
    from vgg.data.preprocessing import Preprocess
    from vgg.data.shard_format import ColourStats
    from vgg.models import build, checkpoint
    from vgg.train.loop import Hooks, fit

    profile = load_profile(ROOT / "params.yaml", profile="paper")
    config = dataclasses.replace(
        profile.train, batch_size=batch, micro_batch=batch, workers=1, use_gpu=device.type == "cuda",
        max_epochs=2, checkpoint_every=0, precision=precision, compile=compile_model,
    )
    torch.manual_seed(0)
    model = build("A").to(device)
    # AlexNet's ImageNet lighting PCA (0-1 scale; the values do not affect speed).
    stats = ColourStats(
        mean_rgb=torch.tensor([123.7, 116.3, 103.5]),
        eigval=torch.tensor([0.2175, 0.0188, 0.0045]) * 255,
        eigvec=torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]),
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, CROP, CROP), dtype=torch.uint8, generator=generator)
    labels = torch.randint(1000, (batch,), generator=generator)
    colour = 0.1 * torch.randn(batch, 3, generator=generator)
    if device.type == "cuda":
        images, labels, colour = images.pin_memory(), labels.pin_memory(), colour.pin_memory()
    cpu_at_epoch_end: list[float] = []

    class ClockCpu(Hooks):
        def on_epoch_end(self, metrics: dict[str, float], checkpoint: Callable[[], dict[str, Any]]) -> None:
            cpu_at_epoch_end.append(time.process_time())

    result = fit(
        model=model, config=config, lr=config.lr,
        batches=lambda epoch, start: ((images, labels, colour) for _ in range(start, steps)),
        steps_per_epoch=steps, validate=lambda m: (100.0, 100.0), preprocess=Preprocess(stats), device=device,
        header=checkpoint.header(config="A", profile=profile, scale=profile.scales.low), hooks=ClockCpu(),
    )
    return {
        "images_per_s": result.history[1]["train/images_per_s"],
        "cpu_s_per_image": (cpu_at_epoch_end[1] - cpu_at_epoch_end[0]) / (batch * steps),
    }


def reference_e2e(folder: Path, *, batch: int, workers: int) -> dict[str, float]:
    """torchvision's reference train.py loop for one epoch: ImageFolder + RandomResizedCrop(224) + flip +
    normalise, vgg11 fp32, SGD; then one validation pass (Resize(256) + CenterCrop(224)), as train.py does."""
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2

    torch.manual_seed(0)
    normalise = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = torchvision.datasets.ImageFolder(
        folder / "train", v2.Compose([v2.RandomResizedCrop(CROP), v2.RandomHorizontalFlip(), *normalise]))
    val = torchvision.datasets.ImageFolder(folder / "val",
                                           v2.Compose([v2.Resize(256), v2.CenterCrop(CROP), *normalise]))
    model = torchvision.models.vgg11(num_classes=len(train.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(train, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    images = 0
    model.train()
    started = time.perf_counter()  # the whole epoch, first batch included, as fit's train/images_per_s
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        images += len(y)
    rate = images / (time.perf_counter() - started)
    model.eval()
    with torch.inference_mode():
        for x, _ in DataLoader(val, batch_size=batch, num_workers=workers):
            model(x)
    return {"epoch_images_per_s": rate}


def end_to_end(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Both commands on the same generated images; returns one row per command."""
    from vgg.config import SynthConfig
    from vgg.data.ingest import ingest
    from vgg.data.synthetic import synthesize

    config = SynthConfig(classes=E2E_CLASSES, train_per_class=E2E_TRAIN_PER_CLASS, val_per_class=E2E_VAL_PER_CLASS,
                         min_side=256, max_side=400, seed=0)  # ImageNet-like: smallest side 256–400 px
    synthesize(work / "raw", config)
    ingest(work / "raw", work / "shards", max_side=512, shard_size=8, workers=1)
    _extract_image_folder(work / "raw", work / "folder")
    train_images = E2E_CLASSES * E2E_TRAIN_PER_CLASS // args.batch * args.batch
    env = {**os.environ, "PYTHONPATH": str(ROOT), **MALLOC_TUNED, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # a local Ray, started by the command, as a user's first `vgg train`
    vgg = [str(Path(sys.executable).with_name("vgg")), "train", "--params", str(ROOT / "params.yaml"),
           "--profile", "paper", "--config", "A", "--scale", "low", "--shards", str(work / "shards"),
           "--out", str(work / "A-low.pt"), "--storage", str(work / "ray_results"), "--workers", "1"]
    for key, value in {"model.num_classes": E2E_CLASSES, "train.batch_size": args.batch,
                       "train.micro_batch": args.batch, "train.use_gpu": False, "train.max_epochs": 1,
                       "train.compile": False, "train.checkpoint_every": 0,
                       # Decoding in the training process: at 224 px the step (~0.5 s/image here) dwarfs the decode
                       # (~5 ms), and torch keeps both cores (vgg train gives a loader worker a core of its own).
                       "data.loader_workers": 0}.items():
        vgg += ["--set", f"{key}={value}"]
    reference = [sys.executable, __file__, "--arm", "reference-e2e", "--batch", str(args.batch),
                 "--folder", str(work / "folder")]
    rows = []
    for label, command in [("torchvision reference train.py loop", reference), ("vgg train (Ray, MLflow)", vgg)]:
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"error: end-to-end arm '{label}' failed:\n{(done.stderr or done.stdout)[-3000:]}")
        if command is reference:
            rate = json.loads(done.stdout.strip().splitlines()[-1])["epoch_images_per_s"]
        else:  # `wrote ...: ..., train/images_per_s X` (fit's rate over the epoch)
            rate = float(re.findall(r"train/images_per_s ([0-9.]+)", done.stdout + done.stderr)[-1])
        rows.append({"arm": label, "wall_s": wall, "images_per_s": train_images / wall,
                     "epoch_images_per_s": rate})
    return rows


def _extract_image_folder(raw: Path, out: Path) -> None:
    """ILSVRC2012_img_train.tar (one inner tar per WNID) and the val tar + devkit ground truth → ImageFolder's
    train/WNID/*.JPEG and val/WNID/*.JPEG."""
    from vgg.data.imagenet import open_raw

    source = open_raw(raw)
    for split in ("train", "val"):
        for sample in source.iter_split(split):
            target = out / split / sample.wnid / Path(sample.name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(sample.data)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def _child(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.arm == "reference-e2e":
        result = reference_e2e(args.folder, batch=args.batch, workers=1)
    elif args.arm == "baseline":
        result = baseline(batch=args.batch, steps=args.steps, device=device)
    else:
        result = ours(batch=args.batch, steps=args.steps, device=device, precision=args.precision,
                      compile_model=args.compile)
    print(json.dumps(result))


def _run_arm(args: argparse.Namespace, arm: str, malloc: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for key in MALLOC_TUNED:
        env.pop(key, None)
    if malloc == "tuned":
        env.update(MALLOC_TUNED)
    command = [sys.executable, __file__, "--arm", arm, "--batch", str(args.batch), "--steps", str(args.steps),
               "--device", args.device, "--precision", args.precision] + (["--compile"] if args.compile else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"error: arm {arm} ({malloc} malloc) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="images per step (both arms)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per arm")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="ours only")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (slower on CPU)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--e2e", action="store_true", help="also time `vgg train` vs a reference train.py, end to end")
    parser.add_argument("--arm", choices=["baseline", "ours", "reference-e2e"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        _child(args)
        return

    from vgg.train import precision

    dtype = precision.resolve(args.precision, torch.device(args.device))
    nhwc = precision.channels_last(True, device=torch.device(args.device), dtype=dtype)
    ours_label = "ours, " + ("bf16 autocast" if dtype == torch.bfloat16 else "fp32") + (" NHWC" if nhwc else " NCHW")
    rows = []
    # Pairs under the same allocator run back to back, so a busy shared machine skews both alike.
    for malloc in ("default", "tuned"):
        for arm, label in [("baseline", "torchvision vgg11, fp32 NCHW"), ("ours", ours_label)]:
            measured = _run_arm(args, arm, malloc)
            rows.append({"arm": arm, "label": label, "malloc": malloc, **measured,
                         "gflop_per_s": measured["images_per_s"] * GFLOP_PER_IMAGE})
    base = rows[0]["images_per_s"]
    print(f"VGG-A training step at {CROP} px, batch {args.batch}, {args.steps} timed steps, device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'arm':<32} {'malloc':<8} {'images/s':>9} {'GFLOP/s':>8} {'vs first':>9} {'CPU s/image':>12}")
    for row in rows:
        print(f"{row['label']:<32} {row['malloc']:<8} {row['images_per_s']:>9.2f} {row['gflop_per_s']:>8.1f} "
              f"{row['images_per_s'] / base:>8.2f}x {row['cpu_s_per_image']:>12.3g}")
    print("CPU s/image: process CPU time (all threads) per image; steadier than wall time when the cores are shared.")
    e2e_rows = []
    if args.e2e:
        with tempfile.TemporaryDirectory(prefix="vgg-e2e-") as work:
            e2e_rows = end_to_end(args, Path(work))
        first = e2e_rows[0]
        print(f"\nEnd to end: one epoch of {E2E_CLASSES * E2E_TRAIN_PER_CLASS} generated images at {CROP} px, batch "
              f"{args.batch}, VGG-A, + validation")
        print(f"{'command':<38} {'wall s':>7} {'images/s':>9} {'vs first':>9} {'epoch img/s':>12} {'vs first':>9}")
        for row in e2e_rows:
            print(f"{row['arm']:<38} {row['wall_s']:>7.1f} {row['images_per_s']:>9.2f} "
                  f"{row['images_per_s'] / first['images_per_s']:>8.2f}x {row['epoch_images_per_s']:>12.2f} "
                  f"{row['epoch_images_per_s'] / first['epoch_images_per_s']:>8.2f}x")
    if args.out:
        result = {
            "benchmark": "train_step",
            "config": "A",
            "crop": CROP,
            "batch": args.batch,
            "steps": args.steps,
            "device": args.device,
            "precision": str(dtype),
            "channels_last": nhwc,
            "compile": args.compile,
            "threads": torch.get_num_threads(),
            "cpu": _cpu_name(),
            "bf16_isas": list(precision.cpu_bf16_isas()),
            "torch": torch.__version__,
            "malloc_tuned_env": MALLOC_TUNED,
            "rows": rows,
            "end_to_end": e2e_rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
