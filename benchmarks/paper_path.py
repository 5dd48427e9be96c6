"""The paper profile on the user's own path, on one GPU: `vgg synth` (ImageNet-size JPEGs, `synth.jpeg: imagenet`)
→ `vgg ingest` → `vgg train --profile paper` through Ray Train (one GPU worker: Ray's TorchTrainer picks the nccl
backend for GPU workers) for a bounded number of steps → `vgg evaluate --device ray`, each as the command a user
types. Then a projection of the paper profile's whole `dvc repro` on one 8-GPU node from the measured rates.

What it reports (a table on stdout, everything in the JSON, rewritten after every section so a run stopped at its
time limit keeps what it finished):
1. data: mean JPEG size and pixel size of the generated shards (ImageNet's ~110 KB at ~400×350);
2. the loader alone (`train_batches`, the profile's `data.loader_workers`) for each `data.decode` option — `cpu`
   (libjpeg-turbo in the loader workers) and `device` (`torchvision.io.decode_jpeg` on the training device: nvJPEG
   on CUDA, whose batched call uses the A100/H100 hardware JPEG engine for baseline JPEGs, `hardware_jpeg` below
   checks that the engine is there and takes these files, and `nvidia-smi dmon`'s jpg column whether it was busy)
   at S = 256, and the CPU decode at S = 384 and S ∈ [256, 512];
3. the bare step: `fit` on device-resident batches at the same micro-batch, compiled as the profile trains;
4. `vgg train` for each decode option: img/s of its last epoch as `fit` measures it (data loading included), MFU
   against the card's nominal dense bf16 peak (H100 SXM: 989 TFLOP/s), and its ratio to the bare step;
5. `vgg evaluate --device ray` (dense, single scale) wall time; and the evaluation rates in-process (dense at
   Q = 384 with flips, multi-crop) on the trained model;
6. the projection: every training stage in dvc.yaml × its configurations × `train.max_epochs` × 1,281,167 images
   at the measured per-GPU rate scaled by each configuration's FLOPs, on 8 GPUs; plus every evaluation stage
   over 50,000 images at its scales (dense cost ∝ Q², one GPU, stages run one after another as `dvc repro`
   runs them); against the paper's 2–3 weeks per net on 4 Titan Black GPUs.

    python benchmarks/paper_path.py benchmarks/out/paper_path.json            # on a CUDA machine (docs/benchmarks.md)
    python benchmarks/paper_path.py out.json --tiny                           # CPU, tiny sizes: the code path only

`--tiny` (automatic without CUDA) runs every section on the CPU with the paper profile shrunk through `--set`
(width ×1/8, 32 px crops, 10 classes, a few dozen images); its numbers are not performance figures. Exit status 1
when a section failed (its error is in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import glob
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu as bench  # noqa: E402  (benchmarks/gpu.py: FLOP count, peaks, shard views, the loader/step/eval arms)

from pipelines.cluster import local_cluster  # noqa: E402
from pipelines.params import load_profile  # noqa: E402
from vgg.config import Profile, ScaleRange  # noqa: E402
from vgg.data.batch import Batch  # noqa: E402
from vgg.data.gpu_decode import decode_jpegs  # noqa: E402
from vgg.data.loader import batches_per_epoch, train_batches  # noqa: E402
from vgg.data.preprocessing import ALPHA_STD, Preprocess  # noqa: E402
from vgg.data.samples import iter_samples  # noqa: E402
from vgg.data.shard_format import read_index, read_stats  # noqa: E402
from vgg.files import write_atomic  # noqa: E402
from vgg.models import build, checkpoint  # noqa: E402
from vgg.models.io import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 train
VAL_IMAGES = 50_000  # ILSVRC-2012 val, what every evaluation stage scores
NODE_GPUS = 8
PAPER_WEEKS_PER_NET = (2, 3)  # §3.1 "training a single net took 2–3 weeks", 4 NVIDIA Titan Black GPUs
GOAL_TRAIN_IMAGES_PER_S = 4500  # issue 23's goals, one H100
GOAL_TRAIN_OF_STEP = 0.9
GOAL_DENSE_IMAGES_PER_S = 1000  # dense at Q = 384 with flips
GOAL_PROTOCOL_HOURS = 8.0
DECODES = ("cpu", "device")  # vgg.config.DataConfig.decode
RATE = re.compile(r"train/images_per_s (\S+?)(?:,|$)", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    synth: dict[str, Any]  # the profile's `synth` section for `vgg synth` (paper: null; set here)
    sets: tuple[str, ...]  # `--set` overrides on the paper profile, for every command
    epoch_images: int  # training images per epoch (the generated train split listed until it has this many)
    epochs: int  # train.max_epochs: the last one is timed (the first pays for compilation and start-up)
    loader_images: int  # images drained in each loader-alone arm
    step_steps: int  # steps per epoch of the bare step
    eval_images: int  # val images in the in-process evaluation arms
    micro_batch: int | None = None  # images per step per GPU; None: the paper profile's train.micro_batch


DEVICE = Setup(
    name="gpu",
    # All 1,000 classes (the paper model's; `vgg train` checks the shards have as many): 5,000 train + 1,000 val
    # images, ≈ 15 s to draw on 16 cores; the train split listed 5× makes an epoch of 25,000 images
    synth={"classes": 1000, "train_per_class": 5, "val_per_class": 1, "min_side": 256, "max_side": 400, "seed": 0,
           "jpeg": "imagenet"},
    sets=("train.workers=1", "train.checkpoint_every=0"),
    epoch_images=24_576, epochs=2, loader_images=8_192, step_steps=40, eval_images=200,
)
TINY = Setup(
    name="tiny",
    synth={"classes": 10, "train_per_class": 6, "val_per_class": 2, "min_side": 48, "max_side": 160, "seed": 0,
           "jpeg": "imagenet"},
    sets=("train.workers=1", "train.checkpoint_every=0", "train.use_gpu=false", "train.compile=false",
          "model.num_classes=10", "model.width=0.125", "model.fc_width=64", "model.crop=32",
          "scales.low={s_min: 40, s_max: 40}", "scales.high={s_min: 56, s_max: 56}",
          "scales.jitter={s_min: 40, s_max: 72}", "eval.q_offset=8", "eval.batch_size=64", "data.max_side=72",
          "data.shard_size=16", "data.loader_workers=1"),
    epoch_images=64, epochs=2, loader_images=48, step_steps=2, eval_images=6, micro_batch=8,
)


# ---------------------------------------------------------------------------------------------------- the decoders


def hardware_jpeg(jpegs: list[bytes]) -> dict[str, Any]:
    """Whether nvJPEG's hardware backend (the A100/H100/H200 JPEG engines) opens on this machine, and which of
    `jpegs` it accepts for batched decoding (baseline JPEGs; `nvjpegDecodeBatchedSupported` == 0): torchvision's
    batched `decode_jpeg(device='cuda')` asks for NVJPEG_BACKEND_HARDWARE and sends exactly those files to it, the
    rest one by one through the CUDA (SM) decoder."""
    if not torch.cuda.is_available():
        return {"available": False, "reason": "no CUDA device"}
    decode_jpegs(jpegs[:1], device=torch.device("cuda"))  # loads the libnvjpeg that torchvision uses: probe that one
    with open("/proc/self/maps") as maps:
        mapped = sorted({line.split()[-1] for line in maps if "libnvjpeg" in line})
    library = mapped[0] if mapped else _nvjpeg_library()
    if library is None:
        return {"available": None, "reason": "libnvjpeg not found (torchvision.libs, nvidia/*/lib, CUDA's lib64)"}
    nvjpeg = ctypes.CDLL(library)
    handle, stream, supported = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_int(-1)
    status = nvjpeg.nvjpegCreateEx(3, None, None, 0, ctypes.byref(handle))  # 3 = NVJPEG_BACKEND_HARDWARE
    if status != 0:
        return {"available": False, "library": library,
                "reason": f"nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE) returned {status} (7 = no engine on this GPU)"}
    accepted = 0
    try:
        if nvjpeg.nvjpegJpegStreamCreate(handle, ctypes.byref(stream)) != 0:
            return {"available": True, "library": library, "reason": "nvjpegJpegStreamCreate failed"}
        for jpeg in jpegs:
            nvjpeg.nvjpegJpegStreamParseHeader(handle, jpeg, ctypes.c_size_t(len(jpeg)), stream)
            nvjpeg.nvjpegDecodeBatchedSupported(handle, stream, ctypes.byref(supported))
            accepted += supported.value == 0
        nvjpeg.nvjpegJpegStreamDestroy(stream)
    finally:
        nvjpeg.nvjpegDestroy(handle)
    return {"available": True, "library": library, "files": len(jpegs), "hardware_decodable": accepted}


def _nvjpeg_library() -> str | None:
    import torchvision

    site = Path(torchvision.__file__).resolve().parents[1]
    patterns = [str(site / "torchvision.libs" / "libnvjpeg*.so*"), str(site / "nvidia" / "*" / "lib" / "libnvjpeg.so*"),
                "/usr/local/cuda/lib64/libnvjpeg.so*", "/usr/local/cuda/targets/*/lib/libnvjpeg.so*"]
    found = [path for pattern in patterns for path in sorted(glob.glob(pattern))]
    return found[0] if found else ctypes.util.find_library("nvjpeg")


@contextlib.contextmanager
def jpeg_engine_load(result: dict[str, Any]) -> Iterator[None]:
    """`nvidia-smi dmon -s u` while the block runs: the highest utilisation of the JPEG engines (its `jpg` column,
    %) goes to result["jpg_util_max"]; None where nvidia-smi or the column is missing."""
    result["jpg_util_max"] = None
    try:
        process = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
    except OSError:
        yield
        return
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        yield
        time.sleep(1.5)  # one more sample after the work
    finally:
        process.terminate()
        process.wait()
        reader.join(timeout=5)
    header = next((line.lstrip("#").split() for line in lines if line.startswith("# gpu")), None)
    if header and "jpg" in header:
        column = header.index("jpg")
        values = [line.split()[column] for line in lines if not line.startswith("#") and len(line.split()) > column]
        numbers = [float(value) for value in values if value.replace(".", "", 1).isdigit()]
        result["jpg_util_max"] = max(numbers) if numbers else None


# ---------------------------------------------------------------------------------------------------- commands


def vgg_command() -> list[str]:
    """This environment's `vgg`, or the same CLI through the interpreter where it is not installed (a device
    image that brings its own Python)."""
    binary = Path(sys.executable).with_name("vgg")
    return [str(binary)] if binary.is_file() else [sys.executable, "-m", "pipelines.cli"]


def run_vgg(args: list[str], *, env: dict[str, str], log: Path, cwd: Path) -> tuple[float, str]:
    """Run `vgg ARGS`; (wall seconds, stdout). Output goes to `log`; a failure raises with its last lines."""
    started = time.perf_counter()
    done = subprocess.run([*vgg_command(), *args], env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log.write_text(f"$ vgg {' '.join(args)}\n{done.stdout}\n--- stderr ---\n{done.stderr}")
    if done.returncode:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        raise RuntimeError(f"vgg {args[0]} exited {done.returncode}: {' | '.join(tail)} (log: {log})")
    return wall, done.stdout


def profile_sets(setup: Setup, *, micro_batch: int, epochs: int, loader_workers: int | None) -> list[str]:
    sets = [f"synth={json.dumps(setup.synth)}", *setup.sets, f"train.micro_batch={micro_batch}",
            f"train.batch_size={micro_batch}", f"train.max_epochs={epochs}"]
    return sets + ([f"data.loader_workers={loader_workers}"] if loader_workers else [])


# ---------------------------------------------------------------------------------------------------- projection


def dvc_stages(path: Path) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """(training runs, evaluation runs) of dvc.yaml: each training stage's configurations and scale, each
    evaluation stage's models, mode and scales, read from the stages' `foreach` lists and commands."""
    spec = yaml.safe_load(path.read_text())
    variables = {key: value for entry in spec.get("vars", []) for key, value in entry.items()}

    def items(stage: dict[str, Any]) -> list[str]:
        foreach = stage.get("foreach", [])
        if isinstance(foreach, str):
            foreach = variables[foreach.strip("${} ")]
        return list(foreach)

    train, evaluate = [], []
    for name, stage in spec["stages"].items():
        cmd = " ".join(str((stage.get("do") or stage).get("cmd", "")).split())
        if cmd.startswith("vgg train"):
            scale = re.search(r"--scale (\w+)", cmd).group(1)
            train += [{"stage": name, "config": item, "scale": scale} for item in items(stage)]
        elif cmd.startswith("vgg evaluate"):
            mode, scales = re.search(r"--mode (\S+)", cmd).group(1), re.search(r"--scales (\S+)", cmd).group(1)
            for item in items(stage):
                config, scale = item.rsplit("-", 1)
                evaluate.append({"stage": name, "model": item, "config": config, "scale": scale, "mode": mode,
                                 "scales": scales})
    return train, evaluate


def projection(result: dict[str, Any], profile: Profile, *, epochs: int, decode: str,
               gflop: Callable[[str], float]) -> dict[str, Any] | None:
    """Hours of the paper profile's whole `dvc repro` on one node of NODE_GPUS GPUs, from this run's rates: every
    training run of dvc.yaml for `epochs` epochs at the rate `vgg train` measured with `decode`, and every
    evaluation at `profile`'s scales. None until those rates are measured."""
    train_rate = (result.get("train", {}).get(decode) or {}).get("images_per_s")
    evaluation = {row["mode"]: row for row in result.get("evaluation") or []}
    if not train_rate or "dense" not in evaluation or "multicrop" not in evaluation:
        return None
    reference = gflop("D")
    train_runs, eval_runs = dvc_stages(ROOT / "dvc.yaml")
    rows = []
    for run in train_runs:
        rate = train_rate * reference / gflop(run["config"])  # per GPU; the step's cost ∝ FLOPs at a fixed crop
        hours = epochs * TRAIN_IMAGES / (NODE_GPUS * rate) / 3600
        rows.append({**run, "epochs": epochs, "per_gpu_images_per_s": rate, "hours": hours})
    dense, multicrop = evaluation["dense"], evaluation["multicrop"]
    overhead = result.get("evaluate_command", {}).get("overhead_s", 0.0)
    eval_rows = []
    for run in eval_runs:
        scale = profile.scale(run["scale"])
        qs = [scale.single_q] if run["scales"] == "single" else list(scale.multi_q(profile.eval.q_offset))
        ratio = gflop(run["config"]) / reference
        seconds = 0.0
        if "dense" in run["mode"]:  # the whole image at Q (and its flip): cost ∝ Q² per scale
            seconds += sum(VAL_IMAGES * (q / dense["q"]) ** 2 / dense["seen_shapes_images_per_s"] for q in qs)
        if "multicrop" in run["mode"]:  # 50 crops of the crop size per scale, whatever Q
            seconds += len(qs) * VAL_IMAGES / multicrop["seen_shapes_images_per_s"]
        eval_rows.append({**run, "q": qs, "hours": (seconds * ratio + overhead) / 3600})
    train_hours = sum(row["hours"] for row in rows)
    eval_hours = sum(row["hours"] for row in eval_rows)
    nets = len(rows)
    return {
        "gpus": NODE_GPUS, "train_images": TRAIN_IMAGES, "val_images": VAL_IMAGES, "epochs_per_run": epochs,
        "decode": decode, "measured_train_images_per_s": train_rate,
        "assumptions": "per-GPU rate of this run × 8 (no all-reduce cost), scaled by each configuration's FLOPs; "
                       "every run to train.max_epochs (the plateau schedule may stop earlier); evaluation on one "
                       "GPU per stage, stages one after another, dense cost ∝ Q²; data stages not included",
        "training": rows, "evaluation": eval_rows, "training_hours": train_hours, "evaluation_hours": eval_hours,
        "total_hours": train_hours + eval_hours, "training_runs": nets,
        "paper_hours": [weeks * 7 * 24 * nets for weeks in PAPER_WEEKS_PER_NET],
    }


# ---------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSON results file")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    parser.add_argument("--work-dir", type=Path, help="data, models and command logs (default: beside OUT); "
                        "generated data there is reused when complete")
    parser.add_argument("--micro-batch", type=int, help="images per GPU per step (default: the profile's)")
    parser.add_argument("--loader-workers", type=int, help="loader processes per GPU (default: the profile's)")
    parser.add_argument("--decodes", nargs="+", choices=DECODES, default=list(DECODES),
                        help="data.decode options to train with through `vgg train`")
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="skip the optional sections not started within this many seconds (they are listed)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak for MFU (default: datasheet)")
    args = parser.parse_args()

    tiny = args.tiny or not torch.cuda.is_available()
    setup = TINY if tiny else DEVICE
    device = torch.device("cpu" if tiny else "cuda")
    if tiny:  # the in-process arms on one thread, as the one-CPU Ray Train worker computes (on a busy host, two
        torch.set_num_threads(1)  # OpenMP threads waiting on each other made the same step ~40x slower)
    cpus = os.cpu_count() or 1
    work = (args.work_dir or args.out.parent / f"paper_path-{setup.name}").resolve()
    data_dir = work / "data"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paper = load_profile(ROOT / "params.yaml", profile="paper")
    micro = args.micro_batch or setup.micro_batch or paper.train.micro_batch
    sets = profile_sets(setup, micro_batch=micro, epochs=setup.epochs, loader_workers=args.loader_workers)
    profile = load_profile(ROOT / "params.yaml", profile="paper", overrides=sets)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or (None if tiny else bench.nominal_peak(device_name))
    import ray
    import torchvision

    result: dict[str, Any] = {
        "benchmark": "paper_path", "mode": setup.name, "performance_figure": not tiny,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": device_name, "cpus": cpus,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "cuda": torch.version.cuda, "ray": ray.__version__},
        "work_dir": str(work), "profile_sets": sets, "micro_batch": micro,
        "loader_workers": profile.data.loader_workers,
        "peak_tflops": peak, "peak_source": "--peak-tflops" if args.peak_tflops else (
            "datasheet dense bf16 (benchmarks/gpu.py NOMINAL_BF16_TFLOPS; H100 SXM 989.4)" if peak else None),
        "errors": {}, "skipped": [], "seconds": {},
    }

    def save() -> None:  # after every section: a run stopped at its time limit keeps what it finished
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())

    def section(name: str, run: Callable[[], Any], *, optional: bool = True) -> Any:
        if optional and time.perf_counter() - started > args.budget_s:
            result["skipped"].append(name)
            return None
        return bench.run_section(result, name, run, save=save, label="paper_path")

    gflop_cache: dict[str, float] = {}

    def gflop(config: str) -> float:
        if config not in gflop_cache:
            model = profile.model
            gflop_cache[config] = bench.forward_gflop(width=model.width, fc_width=model.fc_width,
                                                      num_classes=model.num_classes, crop=model.crop, config=config)
        return gflop_cache[config]

    train_gflop = bench.TRAIN_FLOP_FACTOR * gflop("D")
    result["flops"] = {"forward_gflop": gflop("D"), "train_gflop_per_image": train_gflop}

    def utilisation(images_per_s: float) -> dict[str, Any]:
        tflops = images_per_s * train_gflop / 1e3
        return {"tflops": tflops, "mfu": tflops / peak if peak else None}

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    common = ["--params", str(ROOT / "params.yaml"), "--profile", "paper", *[x for s in sets for x in ("--set", s)]]

    # 1. Data, as a user makes it.
    raw, shards = data_dir / "raw", data_dir / "shards"

    def make_data() -> dict[str, Any]:
        if not (shards / "index.json").is_file():
            run_vgg(["synth", str(raw), *common], env=env, log=work / "synth.log", cwd=work)
            run_vgg(["ingest", str(raw), "--out", str(shards), "--workers", str(cpus), *common], env=env,
                    log=work / "ingest.log", cwd=work)
        view, copies = bench.replicated_view(shards, data_dir / "view", min_train=setup.epoch_images)
        return {"shards": str(shards), "view": str(view), "replicas": copies, **bench.data_summary(shards)}

    data = result["data"] = section("data", make_data, optional=False)
    if data is None:
        print_table(result)
        return 1
    view = Path(data["view"])
    preprocess = Preprocess(read_stats(shards)).to(device)
    jpegs = [sample.jpeg for sample in islice(iter_samples(shards, "train"), 64)]
    result["hardware_jpeg"] = section("hardware_jpeg", lambda: hardware_jpeg(jpegs))

    # 2. The loader alone, per decode option and training scale.
    def loader_arm(scale: ScaleRange, decode: str) -> dict[str, Any]:
        steps = min(setup.loader_images // micro, batches_per_epoch(read_index(view), batch_size=micro, world_size=1))
        batches = islice(train_batches(view, scale=scale, crop=profile.model.crop, batch_size=micro, rank=0,
                                       world_size=1, workers=profile.data.loader_workers, epoch=0, seed=0,
                                       decode_device=device if decode == "device" else None), steps)
        row: dict[str, Any] = {"decode": decode, "scale": scale.label()}
        with jpeg_engine_load(row) if decode == "device" and device.type == "cuda" else contextlib.nullcontext():
            row.update(bench.drain(batches, device=device, skip=min(profile.data.loader_workers, steps // 2)))
        return row

    loader_rows = result["loader"] = []
    arms = [(profile.scales.low, decode) for decode in DECODES]
    arms += [(profile.scales.high, "cpu"), (profile.scales.jitter, "cpu")]
    for scale, decode in arms:
        row = section(f"loader {decode} S={scale.label()}", lambda: loader_arm(scale, decode))
        if row is not None:
            loader_rows.append(row)

    # 3. The bare step at the same micro-batch, compiled as the profile trains.
    def bare_step() -> dict[str, Any]:
        generator = torch.Generator().manual_seed(0)
        crop = profile.model.crop
        images = torch.randint(0, 256, (micro, 3, crop, crop), dtype=torch.uint8, generator=generator)
        batch = Batch(images.to(device), torch.randint(profile.model.num_classes, (micro,)).to(device),
                      (ALPHA_STD * torch.randn(micro, 3, generator=generator)).to(device))
        with torch.device(device):
            model = build("D", num_classes=profile.model.num_classes, width=profile.model.width,
                                fc_width=profile.model.fc_width, crop=crop, init=profile.model.init,
                                generator=torch.Generator(device).manual_seed(0))
        header = checkpoint.header(config="D", profile=profile, scale=profile.scales.low)
        row = bench.fit_arm(model=model, train=profile.train, header=header, preprocess=preprocess, device=device,
                            batch=micro, epochs=2, steps=setup.step_steps, compile_model=profile.train.compile,
                            batches=lambda epoch, start: [batch] * (setup.step_steps - start), skip=0)
        return {**row, "compile": profile.train.compile, **utilisation(row["steady_images_per_s"])}

    result["step"] = section("bare step", bare_step)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the Ray Train worker shares this GPU

    # 4-5. The user's commands, on one local Ray (as `vgg demo` runs them): training with the first decode option,
    # its evaluation, then the other decode options (the first to go when the time budget runs out).
    def train_run(decode: str, ray_env: dict[str, str]) -> dict[str, Any]:
        out, storage = work / f"D-{decode}.pt", work / f"ray_results-{decode}"
        shutil.rmtree(storage, ignore_errors=True)  # else `vgg train` resumes (or adopts) an earlier run of it
        wall, stdout = run_vgg(["train", "--config", "D", "--scale", "low", "--shards", str(view), "--out", str(out),
                                "--storage", str(storage), "--no-track", "--stage", f"paper-path-{decode}",
                                *common, "--set", f"data.decode={decode}"],
                               env=ray_env, log=work / f"train-{decode}.log", cwd=work)
        match = RATE.search(stdout)
        if match is None:
            raise RuntimeError(f"no train/images_per_s in vgg train's output: {stdout[-300:]}")
        rate = float(match.group(1))  # fit's last epoch: all its images over its wall time, loading included
        step = (result.get("step") or {}).get("steady_images_per_s")
        epoch = batches_per_epoch(read_index(view), batch_size=micro, world_size=1) * micro
        return {"images_per_s": rate, "of_bare_step": rate / step if step else None, "wall_s": wall,
                "epoch_images": epoch, "epochs": setup.epochs, "model": str(out),
                # Ray's TorchTrainer: nccl when the workers have GPUs, else gloo (ray.train.torch.config)
                "backend": "nccl" if profile.train.use_gpu else "gloo",
                "overhead_s": wall - setup.epochs * epoch / rate, **utilisation(rate)}

    def evaluate_run(model_path: Path, ray_env: dict[str, str]) -> dict[str, Any]:
        out = work / "D-dense-single.npz"
        wall, stdout = run_vgg(["evaluate", str(model_path), "--mode", "dense", "--scales", "single", "--device", "ray",
                                "--shards", str(view), "--out", str(out), *common],
                               env=ray_env, log=work / "evaluate.log", cwd=work)
        images = read_index(view).split("val").count
        return {"images": images, "wall_s": wall, "q": profile.scales.low.single_q, "stdout": stdout.strip()}

    def evaluation(model_path: Path) -> list[dict[str, Any]]:
        """In-process rates on the trained model: dense at Q = 384 (the goal's) and multi-crop (§3.2)."""
        model = load_model(model_path).to(device)
        torch.backends.cudnn.benchmark = False  # as `vgg evaluate` runs: dense meets many input sizes
        samples = list(islice(iter_samples(view, "val"), setup.eval_images))
        eval_setup = dataclasses.replace(bench.SMOKE if tiny else bench.GPU, eval_q=profile.scales.high.single_q,
                                         eval_batch=profile.eval.batch_size)
        return bench.evaluation(model, samples, eval_setup, preprocess, device, threads=profile.data.loader_workers)

    result["train"] = {}
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # Ray's workers import vgg and pipelines from this checkout
    with local_cluster() as cluster:
        ray_env = cluster.client_env(env)
        first, *others = args.decodes
        row = section(f"vgg train decode={first}", lambda: train_run(first, ray_env), optional=False)
        if row is not None:
            result["train"][first] = row
            model_path = Path(row["model"])
            result["evaluate_command"] = section("vgg evaluate --device ray", lambda: evaluate_run(model_path, ray_env))
            result["evaluation"] = section("evaluation in-process", lambda: evaluation(model_path))
            command, dense = result.get("evaluate_command"), {r["mode"]: r for r in result.get("evaluation") or []}
            if command and "dense" in dense:  # what a `vgg evaluate` costs beyond its images: Ray task, model load
                per_image = (command["q"] / dense["dense"]["q"]) ** 2 / dense["dense"]["seen_shapes_images_per_s"]
                command["overhead_s"] = max(0.0, command["wall_s"] - command["images"] * per_image)
        for decode in others:
            row = section(f"vgg train decode={decode}", lambda: train_run(decode, ray_env))
            if row is not None:
                result["train"][decode] = row

    # The protocol as `dvc repro` runs it: the paper profile's epochs and decode; the scales of the profile measured
    # (the paper's on a GPU, the shrunk ones with --tiny).
    result["projection"] = projection(result, profile, epochs=paper.train.max_epochs, decode=paper.data.decode,
                                      gflop=gflop)
    result["goal"] = goals(result, tiny)
    save()
    print_table(result)
    return 1 if result["errors"] else 0


def goals(result: dict[str, Any], tiny: bool) -> dict[str, Any]:
    train = max((row["images_per_s"] for row in result["train"].values()), default=None)
    best = max(result["train"].values(), key=lambda row: row["images_per_s"], default={})
    dense = next((row for row in result.get("evaluation") or [] if row["mode"] == "dense"), None)
    hours = (result.get("projection") or {}).get("total_hours")
    checks = {
        "train_images_per_s": [train, GOAL_TRAIN_IMAGES_PER_S],
        "train_of_bare_step": [best.get("of_bare_step"), GOAL_TRAIN_OF_STEP],
        "dense_q384_images_per_s": [dense and dense["seen_shapes_images_per_s"], GOAL_DENSE_IMAGES_PER_S],
        "protocol_hours_8_gpus": [hours, GOAL_PROTOCOL_HOURS],
    }
    return {key: {"value": value, "target": target,
                  "met": None if tiny or value is None else (value <= target if "hours" in key else value >= target)}
            for key, (value, target) in checks.items()}


def print_table(result: dict[str, Any]) -> None:
    print(f"\nThe paper profile on the user's path ({result['mode']}) on {result['device']}, {result['cpus']} CPUs; "
          f"versions {result['versions']}")
    if not result["performance_figure"]:
        print("CPU, tiny sizes: the code path only — not a performance figure")
    data = result.get("data") or {}
    if data:
        print(f"data: {data['train_images']} train images (listed {data['replicas']}x), mean JPEG "
              f"{data['mean_jpeg_kb']} KB at {data['mean_size'][0]}x{data['mean_size'][1]} px")
    hw = result.get("hardware_jpeg") or {}
    print(f"hardware JPEG engine: {hw.get('available')} "
          f"({hw.get('reason') or str(hw.get('hardware_decodable')) + '/' + str(hw.get('files')) + ' files accepted'})")
    peak = result["peak_tflops"]
    print(f"MFU against {peak} TFLOP/s ({result['peak_source']}); {result['flops']['train_gflop_per_image']:.3g} "
          f"GFLOP per training image (3 x forward)\n")
    print(f"{'arm':<40} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'x step':>7}  note")
    for row in result.get("loader") or []:
        note = f"jpg engine max {row['jpg_util_max']}%" if row.get("jpg_util_max") is not None else ""
        print(f"{'loader ' + row['decode'] + ' S=' + row['scale']:<40} {row['steady_images_per_s']:>9.1f} "
              f"{'':>8} {'':>6} {'':>7}  {note}")
    step = result.get("step")

    def util(row: dict[str, Any]) -> str:
        mfu = f"{100 * row['mfu']:5.1f}%" if row.get("mfu") is not None else f"{'-':>6}"
        return f"{row['tflops']:>8.3g} {mfu}"

    if step:
        print(f"{'bare step b' + str(step['batch']) + (' compiled' if step['compile'] else ''):<40} "
              f"{step['steady_images_per_s']:>9.1f} {util(step)} {'1.00':>7}")
    for decode, row in (result.get("train") or {}).items():
        ratio = f"{row['of_bare_step']:.2f}" if row.get("of_bare_step") else "-"
        print(f"{'vgg train (Ray Train) decode=' + decode:<40} {row['images_per_s']:>9.1f} {util(row)} {ratio:>7}"
              f"  wall {row['wall_s']:.0f} s")
    for row in result.get("evaluation") or []:
        print(f"{'eval ' + row['mode'] + ' Q=' + str(row['q']) + ' (in-process)':<40} "
              f"{row['seen_shapes_images_per_s']:>9.1f} {'':>8} {'':>6} {'':>7}  first pass {row['images_per_s']:.1f}")
    command = result.get("evaluate_command")
    if command:
        print(f"{'vgg evaluate --device ray (dense single)':<40} {command['images'] / command['wall_s']:>9.1f} "
              f"{'':>8} {'':>6} {'':>7}  wall {command['wall_s']:.0f} s for {command['images']} images")
    plan = result.get("projection")
    if plan:
        print(f"\nprojection, whole `dvc repro` of the paper profile on one {plan['gpus']}-GPU node "
              f"({plan['training_runs']} training runs x {plan['epochs_per_run']} epochs x {plan['train_images']:,} "
              f"images; evaluation of {plan['val_images']:,} images per model and mode):")
        by_stage: dict[str, float] = {}
        for row in plan["training"] + plan["evaluation"]:
            by_stage[row["stage"]] = by_stage.get(row["stage"], 0.0) + row["hours"]
        for stage, hours in by_stage.items():
            print(f"  {stage:<22} {hours:>9.2f} h")
        low, high = plan["paper_hours"]
        print(f"  {'total':<22} {plan['total_hours']:>9.2f} h  (training {plan['training_hours']:.2f} h, evaluation "
              f"{plan['evaluation_hours']:.2f} h; {plan['total_hours'] / 24:.2f} days)")
        print(f"  paper: 2-3 weeks per net on 4 Titan Black = {low:,}-{high:,} h for the same {plan['training_runs']} "
              f"runs; assumptions: {plan['assumptions']}")
    print("\ngoals (issue 23, one H100):")
    for key, goal in result["goal"].items():
        value = goal["value"]
        shown = "-" if value is None else f"{value:.3g}"
        print(f"  {key:<26} {shown:>9}  target {goal['target']}  met: {goal['met']}")
    for name in result["skipped"]:
        print(f"SKIPPED (time budget): {name}")
    for name, error in result["errors"].items():
        print(f"ERROR in {name}: {error}")


if __name__ == "__main__":
    sys.exit(main())
