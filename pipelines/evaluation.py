"""Where `vgg evaluate` computes its posteriors (the profile's `eval.device`): on this machine, on its CPU or CUDA
device, or as one Ray task on the cluster in RAY_ADDRESS (or a local Ray), on one of its GPUs when the profile
trains on GPUs. On a cluster `dvc repro` runs on the head, which has no GPU: there, VGG-16's 50,000 validation
images at three scales would take days instead of minutes.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import torch

from pipelines.provenance import file_sha256
from vgg.config import EvalConfig
from vgg.errors import ConfigError
from vgg.evaluate.posteriors import EvalOptions, checkpoint_meta, compute_posteriors
from vgg.evaluate.results import Posteriors
from vgg.models.io import TorchvisionNormalize, load_model

DEVICES = typing.get_args(typing.get_type_hints(EvalConfig)["device"])  # auto, cpu, cuda, ray


@dataclasses.dataclass(frozen=True)
class Request:
    """One `vgg evaluate`: what to compute, independent of where (paths absolute: a Ray task may run elsewhere)."""

    model: Path  # our checkpoint, or torchvision weights of configuration `torchvision`
    torchvision: str | None
    shards: Path
    split: str
    mode: str
    scales: tuple[int, ...]  # test scales Q, px (§3.2)
    keep_scales: tuple[int, ...]  # of those, the ones whose own posteriors are returned too
    grid: int
    batch_size: int
    channels_last: bool
    decode_threads: int  # threads decoding and rescaling ahead of the model on an accelerator (a CPU runs inline)


def posteriors(request: Request, device: str) -> tuple[Posteriors, ...]:
    """The posteriors over `request.scales`, then those of each of `request.keep_scales`, computed here."""
    network = load_model(request.model, name=request.torchvision)
    meta = {"config": request.torchvision, "source": str(request.model)} if request.torchvision else (
        checkpoint_meta(request.model))
    meta["model_sha256"] = file_sha256(request.model)  # `vgg report` finds the model's MLflow run by it
    options = EvalOptions(
        mode=request.mode, scales=request.scales, keep_scales=request.keep_scales, grid=request.grid,
        batch_size=request.batch_size, device=device, precision="auto", channels_last=request.channels_last,
        workers=0 if device == "cpu" else request.decode_threads,
    )
    result = compute_posteriors(network, request.shards, request.split, options, progress=True, meta=meta,
                                preprocess=TorchvisionNormalize() if request.torchvision else None)
    return (result, *(result.at_scale(q) for q in request.keep_scales))


def run(request: Request, *, device: str, gpu: bool) -> tuple[Posteriors, ...]:
    """`posteriors(request)` where `device` (an `eval.device` value) says; `gpu`: the profile trains on GPUs, so a
    Ray task takes one. A device that cannot be used here is one line before any work."""
    return _on_ray(request, gpu=gpu) if device == "ray" else posteriors(request, _local(device))


def _local(choice: str) -> str:
    """The torch device for `choice` on this machine: auto = CUDA where there is one, else the CPU."""
    if choice not in DEVICES:
        raise ConfigError(f"--device: expected one of {', '.join(DEVICES)}, got {choice!r}")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA device; use cpu, or ray to evaluate on a GPU of "
                          "the Ray cluster")
    return choice


def _on_ray(request: Request, *, gpu: bool) -> tuple[Posteriors, ...]:
    """`posteriors(request)` as one Ray task: on one GPU (and `decode_threads` CPUs) when `gpu`, else one CPU."""
    import ray

    from pipelines.cluster import ClusterError, connect, placeable, user_error

    connect()
    cpus = max(1, request.decode_threads) if gpu else 1
    if gpu and ray.cluster_resources().get("GPU", 0.0) < 1:
        raise ClusterError("eval.device=ray on a GPU profile needs a GPU but the Ray cluster has none; add a GPU "
                           "node, or evaluate on this machine with --device auto")
    if gpu and placeable({"GPU": 1.0, "CPU": cpus}) < 1:
        raise ClusterError(f"eval.device=ray on a GPU profile needs a node with a GPU and {cpus} CPUs (its decode "
                           f"threads: data.loader_workers) but no GPU node of the Ray cluster has {cpus} CPUs; lower "
                           "data.loader_workers, or evaluate on this machine with --device auto")
    task = ray.remote(posteriors).options(num_gpus=1 if gpu else 0, num_cpus=cpus)
    try:
        return ray.get(task.remote(request, "cuda" if gpu else "cpu"))
    except Exception as error:  # Ray wraps a task's exception
        raise user_error(error) or error
