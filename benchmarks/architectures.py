"""What VGG's accuracy costs against the ConvNets that came next: parameters (and where they sit), forward FLOPs,
activation memory to train one image, forward and training images/s, and ImageNet top-1, one row per model.

Models: AlexNet; VGG-11/16/19, ours (`vgg.models`, Table 1 configs A, D, E) and torchvision's as a check (the same
nets: `vgg/models/convert.py` maps one state_dict onto the other); GoogLeNet; Inception-v3; ResNet-18/50/152;
DenseNet-121; SE-ResNet-50 (no builder in the pinned stack: its row says so); EfficientNet-B0. Each is built as
torchvision builds it for its IMAGENET1K_V1 weights (GoogLeNet's released weights have no auxiliary heads;
Inception-v3's keep its auxiliary classifier, which torchvision's parameter count includes), with fresh weights.

What each column is:
- parameters: `sum(p.numel())`, split by the module that holds them: Conv2d (conv), Linear (FC), the rest
  (BatchNorm); checked against torchvision's published `num_params`;
- GFLOPs: one image's forward at the model's own input size (224 px; Inception-v3 299 px, the crop of its weights'
  transforms), counted by `torch.utils.flop_counter.FlopCounterMode` on the meta device: 2 FLOPs per
  multiply-accumulate of convolutions and matrix products (what torchvision's `_ops` counts in GMACs), no pooling,
  activations or normalisation;
- activation memory per training image: on the CPU, the bytes of the distinct tensors autograd saves for the
  backward pass of one training forward (train mode, batch `--batch`, divided by it), weights and buffers left out;
  on a GPU, the peak of `torch.cuda.max_memory_allocated` over that forward minus what was allocated before it;
- images/s: forward (eval mode, inference_mode) and training step (train mode: forward, cross-entropy, backward, an
  SGD step) at batch `--batch`, fp32, NCHW, median and min-max over `--repeats`. On the CPU the models take turns
  within each repeat (all stay resident; the SGD step keeps no momentum buffers so that they fit); each call also
  records this process's CPU time per image, which other tenants of a shared host disturb least, and each
  repeat's figures are divided by the baseline's (VGG-16, ours) of the same repeat. torchvision's VGG-11/19 are
  counted, not timed (ours are the same nets; VGG-16's pair is timed as the check). On CUDA (when available) each
  model is timed alone at `--gpu-batch`;
- top-1: ImageNet-1K `acc@1` from torchvision's weight metadata (IMAGENET1K_V1, its first weights; nothing is
  downloaded); ours carry their torchvision twin's. Accuracy per GFLOP and per million parameters follow.

VGG-16 (ours) is also broken down by stage: the five conv blocks and the FC layers, with their parameters, FLOPs
and saved activations.

    python benchmarks/architectures.py benchmarks/out/architectures.json        # also writes .md and .png beside it
    python benchmarks/architectures.py out.json --models alexnet resnet18 --repeats 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from vgg.files import write_atomic  # noqa: E402
from vgg.models import build  # noqa: E402
from vgg.models.vgg import VGG  # noqa: E402

CLASSES = 1000  # ImageNet-1K
WEIGHTS = "IMAGENET1K_V1"  # torchvision's first weights of each model (its V2 weights, where any, use a newer recipe)
BASELINE = "vgg16"
SAME_NET = "same net as ours; counted, not timed"
SE_RESNET_NOTE = (f"not measured: no builder in the pinned stack (torchvision {torchvision.__version__.split('+')[0]} "
                  "has no SE-ResNet; timm is not a dependency)")


@dataclass(frozen=True)
class Arch:
    """One row: a torchvision builder (its weights' metadata gives top-1 and the input size), or one of ours."""

    key: str  # --models name
    label: str
    year: int  # of the paper
    torchvision: str | None  # torchvision builder; for ours, the twin whose metadata we quote
    ours: str | None = None  # Table 1 configuration of vgg.models
    options: tuple[tuple[str, Any], ...] = ()  # builder options: aux_logits as torchvision's weights have it
    note: str = ""
    timed: bool = True  # False: counted only (torchvision's VGG-11/19, the same nets as ours)


ARCHS = (
    Arch("alexnet", "AlexNet", 2012, "alexnet"),
    Arch("vgg11", "VGG-11 (A), ours", 2014, "vgg11", ours="A"),
    Arch("tv_vgg11", "VGG-11, torchvision", 2014, "vgg11", note=SAME_NET, timed=False),
    Arch("vgg16", "VGG-16 (D), ours", 2014, "vgg16", ours="D"),
    Arch("tv_vgg16", "VGG-16, torchvision", 2014, "vgg16"),
    Arch("vgg19", "VGG-19 (E), ours", 2014, "vgg19", ours="E"),
    Arch("tv_vgg19", "VGG-19, torchvision", 2014, "vgg19", note=SAME_NET, timed=False),
    Arch("googlenet", "GoogLeNet", 2014, "googlenet", options=(("aux_logits", False), ("init_weights", True))),
    Arch("inception_v3", "Inception-v3", 2015, "inception_v3", options=(("aux_logits", True), ("init_weights", True)),
         note="auxiliary classifier included: 3.3M params, training only"),
    Arch("resnet18", "ResNet-18", 2015, "resnet18"),
    Arch("resnet50", "ResNet-50", 2015, "resnet50"),
    Arch("resnet152", "ResNet-152", 2015, "resnet152"),
    Arch("densenet121", "DenseNet-121", 2016, "densenet121"),
    Arch("se_resnet50", "SE-ResNet-50", 2017, None, note=SE_RESNET_NOTE),
    Arch("efficientnet_b0", "EfficientNet-B0", 2019, "efficientnet_b0"),
)
BY_KEY = {arch.key: arch for arch in ARCHS}


def weights_meta(arch: Arch) -> dict[str, Any]:
    """torchvision's metadata of the IMAGENET1K_V1 weights (no download): num_params, _ops, _metrics, crop."""
    assert arch.torchvision is not None
    weights = torchvision.models.get_model_weights(arch.torchvision)[WEIGHTS]
    return {**weights.meta, "crop": weights.transforms().crop_size[0]}


def input_size(arch: Arch) -> int:
    """px: the centre crop of the weights' own evaluation transforms (224; Inception-v3 299)."""
    return weights_meta(arch)["crop"]


def build_model(arch: Arch, *, meta: bool = False) -> nn.Module:
    """Fresh weights (seed 0) on the CPU, or shapes only on the meta device (for counting)."""
    if arch.torchvision is None:
        raise ValueError(f"{arch.label}: {arch.note}")
    torch.manual_seed(0)
    if arch.ours is not None:
        if meta:
            with torch.device("meta"):
                return VGG(arch.ours, num_classes=CLASSES)
        # Kaiming keeps activations at a trained net's scale through 19 layers: no denormals slowing the CPU.
        return build(arch.ours, num_classes=CLASSES, init="kaiming", generator=torch.Generator().manual_seed(0))
    with torch.device("meta" if meta else "cpu"):
        return torchvision.models.get_model(arch.torchvision, weights=None, num_classes=CLASSES, **dict(arch.options))


def parameter_split(model: nn.Module) -> dict[str, int]:
    """Parameters by the kind of module that holds them: conv (Conv2d), fc (Linear), other (BatchNorm...)."""
    split = {"conv": 0, "fc": 0, "other": 0}
    for module in model.modules():
        count = sum(p.numel() for p in module.parameters(recurse=False))
        kind = "conv" if isinstance(module, nn.Conv2d) else "fc" if isinstance(module, nn.Linear) else "other"
        split[kind] += count
    split["total"] = sum(p.numel() for p in model.parameters())
    return split


def forward_flops(model: nn.Module, size: int, *, channels: int = 3) -> dict[str, int]:
    """FLOPs of one image's forward (eval mode) at size × size px: total, in convolutions, in FC (matrix) layers."""
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, channels, size, size, device=device))
    by_op = {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}
    conv = sum(count for op, count in by_op.items() if "convolution" in op)
    return {"total": counter.get_total_flops(), "conv": conv, "fc": counter.get_total_flops() - conv}


class SavedTensors:
    """Bytes of the distinct storages autograd saves for backward during a forward, weights and buffers excluded:
    the activation memory a training step holds between its forward and backward passes."""

    def __init__(self, model: nn.Module) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.sizes: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer and pointer not in self.excluded:  # returned as is: it stays alive until backward
            self.sizes.setdefault(pointer, storage.nbytes())
        return tensor

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def __call__(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


def saved_activation_bytes(model: nn.Module, size: int, *, batch: int = 2) -> float:
    """Bytes autograd saves per image in one training forward at batch `batch` (BatchNorm needs batch > 1 where a
    map is 1 × 1, as in Inception-v3's auxiliary head)."""
    model.train()
    tracker = SavedTensors(model)
    with tracker():
        output = model(torch.randn(batch, 3, size, size))
    del output
    return tracker.total / batch


def cuda_activation_bytes(model: nn.Module, size: int, *, batch: int) -> float:
    """Peak CUDA memory per image over one training forward, above what was allocated before it (the model on
    the GPU)."""
    model.train()
    x = torch.randn(batch, 3, size, size, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    output = model(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del output
    return peak / batch


def training_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy; Inception-v3 trains its auxiliary classifier too (weight 0.4; the weight does not change the
    cost)."""
    if isinstance(output, tuple):  # InceptionOutputs(logits, aux_logits)
        logits, aux = output
        return F.cross_entropy(logits, labels) + 0.4 * F.cross_entropy(aux, labels)
    return F.cross_entropy(output, labels)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timer:
    """One model's forward and training-step timings at a fixed batch on one device: each call returns
    (images/s by the wall clock, CPU-seconds per image of this process, all its threads)."""

    def __init__(self, model: nn.Module, size: int, *, batch: int, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(0)
        self.model, self.device, self.batch = model, device, batch
        self.x = torch.randn(batch, 3, size, size, generator=generator).to(device)
        self.labels = torch.randint(CLASSES, (batch,), generator=generator).to(device)
        # No momentum: no per-parameter state, so every model can stay resident while they take turns.
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def forward(self) -> tuple[float, float]:
        """One forward pass."""
        self.model.eval()
        with torch.inference_mode():
            return self._timed(lambda: self.model(self.x))

    def train(self) -> tuple[float, float]:
        """One training step."""
        self.model.train()

        def step() -> None:
            training_loss(self.model(self.x), self.labels).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)  # frees the gradients before the next model's turn

        return self._timed(step)

    def _timed(self, call: Callable[[], Any]) -> tuple[float, float]:
        _sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        _sync(self.device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return self.batch / wall, cpu / self.batch


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def cpu_speeds(models: dict[str, nn.Module], sizes: dict[str, int], *, batch: int, repeats: int,
               baseline: str) -> dict[str, dict[str, Any]]:
    """Forward and training speed of every model, in turns within each repeat (after one warm-up turn each):
    wall-clock images/s, CPU-seconds per image, and per repeat each one's ratio to `baseline`'s (> 1: faster)."""
    cpu = torch.device("cpu")
    timers = {key: Timer(model, sizes[key], batch=batch, device=cpu) for key, model in models.items()}
    for timer in timers.values():  # warm-up: allocator, oneDNN primitives, thread pool
        timer.forward()
        timer.train()
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {key: {"forward": [], "train": []} for key in timers}
    for repeat in range(repeats):
        for key, timer in timers.items():
            samples[key]["forward"].append(timer.forward())
            samples[key]["train"].append(timer.train())
        print(f"  CPU repeat {repeat + 1}/{repeats} done (load average {os.getloadavg()[0]:.1f})", flush=True)
    result: dict[str, dict[str, Any]] = {}
    for key, modes in samples.items():
        result[key] = {}
        for mode, pairs in modes.items():
            base = samples[baseline][mode]
            result[key][mode] = {
                "images_per_s": spread([rate for rate, _ in pairs]),
                "cpu_s_per_image": spread([seconds for _, seconds in pairs]),
                "vs_baseline": spread([rate / base_rate for (rate, _), (base_rate, _) in zip(pairs, base)]),
                "cpu_vs_baseline": spread([base_s / seconds for (_, seconds), (_, base_s) in zip(pairs, base)]),
            }
    return result


def gpu_speeds(arch: Arch, model: nn.Module, size: int, *, batch: int, repeats: int) -> dict[str, Any]:
    """One model alone on the GPU: forward and training images/s and peak activation memory per image."""
    cuda = torch.device("cuda")
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels once
    model.to(cuda)
    try:
        timer = Timer(model, size, batch=batch, device=cuda)
        for _ in range(3):  # warm-up, cuDNN autotuning
            timer.forward()
            timer.train()
        forward = [timer.forward()[0] for _ in range(repeats)]
        train = [timer.train()[0] for _ in range(repeats)]
        memory = cuda_activation_bytes(model, size, batch=batch)
    finally:
        model.to("cpu")
        torch.cuda.empty_cache()
    return {"forward": {"images_per_s": spread(forward)}, "train": {"images_per_s": spread(train)},
            "activation_bytes_per_image": memory, "batch": batch}


def vgg_stages(model: VGG, *, batch: int = 2) -> list[dict[str, Any]]:
    """Our VGG by stage (five conv blocks, then FC6-8): parameters, FLOPs and saved activations per image, in one
    training forward at the model's crop."""
    stages: list[tuple[str, nn.Module]] = []
    layers: list[nn.Module] = []
    for layer in model.features:
        layers.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages.append((f"conv{len(stages) + 1}", nn.Sequential(*layers)))
            layers = []
    stages.append(("fc6-8", nn.Sequential(nn.Flatten(1), model.classifier)))
    model.train()
    tracker = SavedTensors(model)
    x = torch.randn(batch, 3, model.crop, model.crop)
    rows = []
    with tracker():
        for name, stage in stages:
            saved_before, side = tracker.total, x.shape[-1]
            with FlopCounterMode(display=False) as counter:
                x = stage(x)
            rows.append({"stage": name, "input_px": side, "params": sum(p.numel() for p in stage.parameters()),
                         "flops": counter.get_total_flops() // batch,
                         "activation_bytes_per_image": (tracker.total - saved_before) / batch})
    return rows


def measure(archs: Sequence[Arch], *, batch: int, repeats: int, gpu_batch: int, gpu_repeats: int,
            speed: bool = True) -> dict[str, Any]:
    """Every figure of the table for `archs`; the speed columns only with `speed`."""
    rows: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}
    sizes: dict[str, int] = {}
    for arch in archs:
        row: dict[str, Any] = {"key": arch.key, "model": arch.label, "year": arch.year, "note": arch.note,
                               "ours": arch.ours is not None,
                               "builder": f"vgg.models.build({arch.ours!r})" if arch.ours else arch.torchvision}
        rows[arch.key] = row
        if arch.torchvision is None:
            row["available"] = False
            continue
        row["available"] = True
        meta = weights_meta(arch)
        size = sizes[arch.key] = meta["crop"]
        shapes = build_model(arch, meta=True)
        split = parameter_split(shapes)
        flops = forward_flops(shapes, size)
        top1 = meta["_metrics"]["ImageNet-1K"]["acc@1"]
        row.update({
            "input_px": size,
            "params": split,
            "fc_param_share": split["fc"] / split["total"],
            "torchvision_num_params": meta["num_params"],
            "forward_flops": flops,
            "forward_gflops": flops["total"] / 1e9,
            "fc_flop_share": flops["fc"] / flops["total"],
            "torchvision_gmacs": meta["_ops"],
            "top1": top1,
            "top1_source": f"torchvision {arch.torchvision} {WEIGHTS}" + (" (the same net)" if arch.ours else ""),
            "top1_per_gflop": top1 / (flops["total"] / 1e9),
            "top1_per_mparam": top1 / (split["total"] / 1e6),
        })
        print(f"{arch.label}: {split['total'] / 1e6:.2f} M params, {flops['total'] / 1e9:.2f} GFLOPs", flush=True)
        model = models[arch.key] = build_model(arch)
        row["cpu_activation_bytes_per_image"] = saved_activation_bytes(model, size, batch=batch)
    timed = {key: model for key, model in models.items() if BY_KEY[key].timed}
    if speed and timed:
        baseline = BASELINE if BASELINE in timed else next(iter(timed))
        print(f"timing {len(timed)} models on the CPU ({torch.get_num_threads()} threads), batch {batch}, "
              f"{repeats} repeats, baseline {rows[baseline]['model']}", flush=True)
        for key, figures in cpu_speeds(timed, sizes, batch=batch, repeats=repeats, baseline=baseline).items():
            rows[key]["cpu"] = figures
        rows[baseline]["baseline"] = True
        if torch.cuda.is_available():
            for arch in archs:
                if arch.key in timed:
                    print(f"  GPU: {arch.label}", flush=True)
                    rows[arch.key]["gpu"] = gpu_speeds(arch, models[arch.key], sizes[arch.key], batch=gpu_batch,
                                                       repeats=gpu_repeats)
    stages = vgg_stages(models[BASELINE], batch=batch) if BASELINE in models else []
    return {"rows": list(rows.values()), "vgg16_stages": stages}


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "platform": platform.platform()}


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def _spread(figure: dict[str, float]) -> str:
    return f"{figure['median']:.3g} ({figure['min']:.3g}–{figure['max']:.3g})"


def markdown(result: dict[str, Any]) -> str:
    """Two tables with one row per model (what each costs and scores; how fast it runs), and VGG-16's stages."""
    settings, rows, host = result["settings"], result["rows"], result["machine"]
    baseline = next((row["model"] for row in rows if row.get("baseline")), None)
    lines = [
        f"Measured {result['date']}: {host['cpu']}, {host['cpu_threads']} threads of {host['cpus']} CPUs "
        f"(load average {result['load_average'][0]:.1f} at the start, {result['load_average'][1]:.1f} at the end), "
        f"torch {host['torch']}, torchvision {host['torchvision']}; GPU: {host['gpu'] or 'not measured (no GPU lent)'}."
        f" Top-1: torchvision's `{settings['weights']}` metadata.",
        "",
        "| model | year | input px | params M | conv / FC / other M | FC share | GFLOPs | act. MiB/img | top-1 % "
        "| top-1 per GFLOP | top-1 per M params |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if not row["available"]:
            lines.append(f"| {row['model']} | {row['year']} | {row['note']} |" + " – |" * 8)
            continue
        split, note = row["params"], f" ({row['note']})" if row["note"] else ""
        lines.append(
            f"| {row['model']}{note} | {row['year']} | {row['input_px']} | {split['total'] / 1e6:.2f} | "
            f"{split['conv'] / 1e6:.2f} / {split['fc'] / 1e6:.2f} / {split['other'] / 1e6:.2f} | "
            f"{100 * row['fc_param_share']:.1f} % | {row['forward_gflops']:.2f} | "
            f"{row['cpu_activation_bytes_per_image'] / 2**20:.0f} | {row['top1']:.2f} | {row['top1_per_gflop']:.2f} | "
            f"{row['top1_per_mparam']:.2f} |"
        )
    timed = [row for row in rows if "cpu" in row]
    if timed:
        lines += [
            "",
            f"Speed, fp32 NCHW, CPU batch {settings['batch']}: median (min–max) of {settings['repeats']} repeats; "
            f"CPU s/img is this process's CPU time (all threads) per image; × is how many times faster than "
            f"{baseline}, by wall clock / by CPU time: the median of each repeat's ratio.",
            "",
            "| model | fwd img/s | fwd CPU s/img | × wall / CPU | train img/s | train CPU s/img | × wall / CPU "
            "| GPU fwd / train img/s | GPU act. MiB/img |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in timed:
            cells = []
            for mode in ("forward", "train"):
                figure = row["cpu"][mode]
                cells += [_spread(figure["images_per_s"]), _spread(figure["cpu_s_per_image"]),
                          f"{figure['vs_baseline']['median']:.2f}× / {figure['cpu_vs_baseline']['median']:.2f}×"]
            if "gpu" in row:
                gpu = row["gpu"]
                forward, train = gpu["forward"]["images_per_s"], gpu["train"]["images_per_s"]
                cells += [f"{forward['median']:.4g} / {train['median']:.4g} (batch {gpu['batch']})",
                          f"{gpu['activation_bytes_per_image'] / 2**20:.0f}"]
            else:
                cells += ["not measured (no GPU lent)", "not measured"]
            lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    stages = result["vgg16_stages"]
    if stages:
        total = {key: sum(stage[key] for stage in stages) for key in ("params", "flops", "activation_bytes_per_image")}
        lines += ["", "VGG-16 (ours, config D) by stage, one 224 px training image:", "",
                  "| stage | input px | params M | share | GFLOPs | share | saved activations MiB | share |",
                  "|---|---|---|---|---|---|---|---|"]
        for stage in stages:
            side = f"{stage['input_px']} (flattened)" if stage["stage"].startswith("fc") else str(stage["input_px"])
            lines.append(
                f"| {stage['stage']} | {side} | {stage['params'] / 1e6:.2f} | "
                f"{100 * stage['params'] / total['params']:.1f} % | {stage['flops'] / 1e9:.2f} | "
                f"{100 * stage['flops'] / total['flops']:.1f} % | {stage['activation_bytes_per_image'] / 2**20:.1f} | "
                f"{100 * stage['activation_bytes_per_image'] / total['activation_bytes_per_image']:.1f} % |"
            )
    return "\n".join(lines) + "\n"



def plot(result: dict[str, Any], path: Path) -> None:
    """Top-1 against forward GFLOPs (log scale), bubble area by parameters; one point per architecture (ours
    share their torchvision twin's point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result["rows"] if row["available"] and not row["ours"]]
    figure, axes = plt.subplots(figsize=(8, 5.2), dpi=100)
    below = {"googlenet", "tv_vgg16"}  # labels that would overlap a neighbour's above their bubbles
    for row in rows:
        is_vgg = row["key"].startswith("tv_vgg")
        millions = row["params"]["total"] / 1e6
        area = millions * 12  # points²
        axes.scatter(row["forward_gflops"], row["top1"], s=area, alpha=0.45,
                     color="tab:red" if is_vgg else "tab:blue", edgecolors="black", linewidths=0.5)
        label = row["model"].replace(", torchvision", "")
        offset = (area**0.5 / 2 + 2) * (-1 if row["key"] in below else 1)  # points, beyond the bubble's edge
        axes.annotate(f"{label}, {millions:.0f}M", (row["forward_gflops"], row["top1"]), xytext=(0, offset),
                      textcoords="offset points", fontsize=8, ha="center", va="top" if offset < 0 else "bottom")
    axes.set_xscale("log")
    axes.set_xlabel("forward GFLOPs per image at the model's input size (log scale)")
    axes.set_ylabel("ImageNet top-1 % (torchvision IMAGENET1K_V1)")
    axes.set_title("Accuracy against compute; bubble area ∝ parameters", fontsize=11)
    axes.grid(True, which="both", alpha=0.3)
    axes.margins(x=0.15, y=0.12)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def _check_keys(keys: Sequence[str]) -> list[Arch]:
    unknown = [key for key in keys if key not in BY_KEY]
    if unknown:
        raise SystemExit(f"error: --models: unknown {unknown[0]!r}; choose from {', '.join(BY_KEY)}")
    return [BY_KEY[key] for key in keys]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSON results; the Markdown table (.md) and plot (.png) go beside it")
    parser.add_argument("--models", nargs="+", default=[arch.key for arch in ARCHS], help="row keys (default: all)")
    parser.add_argument("--batch", type=int, default=2, help="CPU batch (images/s and saved activations)")
    parser.add_argument("--repeats", type=int, default=3, help="timed CPU turns per model")
    parser.add_argument("--gpu-batch", type=int, default=32, help="batch on CUDA")
    parser.add_argument("--gpu-repeats", type=int, default=10, help="timed steps per model on CUDA")
    parser.add_argument("--no-speed", action="store_true", help="counts and memory only")
    args = parser.parse_args(argv)
    archs = _check_keys(args.models)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    result = {
        "benchmark": "architectures",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"batch": args.batch, "repeats": args.repeats, "gpu_batch": args.gpu_batch,
                     "gpu_repeats": args.gpu_repeats, "weights": WEIGHTS, "precision": "fp32"},
        **measure(archs, batch=args.batch, repeats=args.repeats, gpu_batch=args.gpu_batch,
                  gpu_repeats=args.gpu_repeats, speed=not args.no_speed),
    }
    result["load_average"] = [load_at_start, os.getloadavg()[0]]  # 1-min, the host is shared
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    write_atomic(args.out, (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    write_atomic(args.out.with_suffix(".md"), table.encode())
    plot(result, args.out.with_suffix(".png"))
    print(table)
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')} "
          f"in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
