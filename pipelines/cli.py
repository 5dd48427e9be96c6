"""The `vgg` command line. Each command reads the profile, calls one function of the `vgg` library (or a driver in
`pipelines/`), and prints what it did. Any `VGGError` becomes one line, `error: ...`, and exit status 2; Ctrl-C
and SIGTERM end a command through its clean-up (clusters it started stopped, MLflow runs marked killed) with one
line and status 130 or 143."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.cluster import DEFAULT_STORAGE, STORAGE_ENV, STORAGE_SHARED_ENV, storage_path
from pipelines.params import DEFAULT_PARAMS, load_profile
from vgg.config import Profile
from vgg.errors import ConfigError, Interrupted, VGGError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Reproduce VGG (Simonyan & Zisserman, ICLR 2015): data, training, every evaluation mode, report.",
)

ParamsOption = Annotated[Path, typer.Option("--params", help="params file holding the profiles")]
ProfileOption = Annotated[
    Optional[str], typer.Option("--profile", help="profile name (default: the params file's 'profile:' key)")
]
SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", help="override a profile key, e.g. --set train.lr=0.02 (repeatable)")
]
# Ray's storage (pipelines.cluster): a path (str: a URI is refused in one line, not mangled by Path).
StorageOption = Annotated[str, typer.Option("--storage", envvar=STORAGE_ENV, help="Ray storage for checkpoints and "
                                            "run state; on a cluster, a directory every node mounts")]
StorageSharedOption = Annotated[bool, typer.Option("--storage-shared", envvar=STORAGE_SHARED_ENV, help="every node "
                                                   "of the Ray cluster mounts --storage (required with several nodes)")]


@app.callback()
def _root() -> None:
    """Reproduce VGG (Simonyan & Zisserman, ICLR 2015): data, training, every evaluation mode, report."""


def _profile(params: Path, profile: str | None, overrides: list[str] | None) -> Profile:
    return load_profile(params, profile=profile, overrides=overrides or ())


@app.command()
def profile(
    params: ParamsOption = DEFAULT_PARAMS, profile: ProfileOption = None, set_: SetOption = None
) -> None:
    """Print the resolved profile (after overrides) as YAML-like nested keys."""
    resolved = _profile(params, profile, set_)
    _print_tree(resolved.to_dict())


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="directory for the three ILSVRC-2012 archives")],
    params: ParamsOption = DEFAULT_PARAMS,
    profile: ProfileOption = None,
    set_: SetOption = None,
) -> None:
    """Generate the embedded default dataset in the raw ILSVRC-2012 archive layout (the profile's `synth`)."""
    from vgg.data.synthetic import synthesize

    resolved = _profile(params, profile, set_)
    resolved.require_raw_source()
    if resolved.data.raw:
        out.mkdir(parents=True, exist_ok=True)
        typer.echo(f"profile {resolved.name} reads real ImageNet from {resolved.data.raw}; nothing to generate")
        return
    report = synthesize(out, resolved.synth, progress=True)
    typer.echo(f"wrote {report.train} train + {report.val} val images of {len(report.classes)} classes to {out} "
               f"({len(report.quirks)} quirky files: PNG named .JPEG, CMYK, grayscale)")


@app.command()
def ingest(
    raw: Annotated[Optional[Path], typer.Argument(help="raw ILSVRC-2012 directory (default: the profile's data.raw)")] = None,
    out: Annotated[Path, typer.Option("--out", help="directory for the shards, index.json, stats.json")] = Path("shards"),
    workers: Annotated[int, typer.Option(help="processes decoding and writing shards")] = os.cpu_count() or 1,
    overwrite: Annotated[bool, typer.Option(help="replace an OUT that holds shards of a different input")] = False,
    params: ParamsOption = DEFAULT_PARAMS,
    profile: ProfileOption = None,
    set_: SetOption = None,
) -> None:
    """Raw archives (or the extracted layout) → WebDataset shards + index.json + stats.json."""
    from vgg.data.ingest import ingest as ingest_raw

    resolved = _profile(params, profile, set_)
    if raw is None:
        resolved.require_raw_source()
        if not resolved.data.raw:  # the profile generates its data: there is no default directory to read
            raise ConfigError(f"RAW: profile {resolved.name} sets no data.raw; pass the directory to read, e.g. "
                              f"`vgg synth data/{resolved.name}/raw` then `vgg ingest data/{resolved.name}/raw "
                              f"--out {out}`")
        raw = Path(resolved.data.raw)
    report = ingest_raw(raw, out, max_side=resolved.data.max_side, shard_size=resolved.data.shard_size,
                        workers=workers, overwrite=overwrite, progress=True)
    typer.echo(report.summary())


@app.command()
def train(
    config: Annotated[str, typer.Option("--config", help="Table 1 configuration: A, A-LRN, B, C, D, E")],
    scale: Annotated[str, typer.Option("--scale", help="training scale S: low, high or jitter (params.yaml scales)")],
    shards: Annotated[Path, typer.Option("--shards", help="output of `vgg ingest`")],
    out: Annotated[Path, typer.Option("--out", help="final model file to write")],
    init: Annotated[Optional[Path], typer.Option("--init", help="checkpoint to start from: a trained A (warm start "
                                                  "of B-E) or this configuration at another S (fine-tuning)")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Ray Train workers (default: train.workers)")] = None,
    storage: StorageOption = DEFAULT_STORAGE,
    storage_shared: StorageSharedOption = False,
    max_failures: Annotated[int, typer.Option(help="worker-group restarts from the last checkpoint")] = 2,
    stage: Annotated[str, typer.Option(help="stage name for the MLflow tags")] = "train",
    track: Annotated[bool, typer.Option(help="log the run to MLflow (MLFLOW_TRACKING_URI or ./mlflow.db)")] = True,
    overlay: Annotated[Optional[list[Path]], typer.Option(
        "--overlay", help="params overlay applied before --set, e.g. `vgg tune`'s output (repeatable)")] = None,
    params: ParamsOption = DEFAULT_PARAMS,
    profile: ProfileOption = None,
    set_: SetOption = None,
) -> None:
    """One training run of the protocol (§3.1) on Ray Train: local Ray, or the cluster in RAY_ADDRESS."""
    overrides = list(set_ or []) + ([f"train.workers={workers}"] if workers is not None else [])
    resolved = load_profile(params, profile=profile, overrides=overrides, overlays=overlay or ())
    from pipelines import ray_train  # imports Ray and torch: only this command pays for them

    metrics = ray_train.train(profile=resolved, config=config, scale=scale, shards=shards, out=out, init=init,
                             storage=storage_path(storage), max_failures=max_failures, stage=stage, track=track,
                             params_file=params, storage_shared=storage_shared)
    typer.echo(f"wrote {out}: " + ", ".join(f"{key} {value:.4g}" for key, value in metrics.items()))


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="`vgg train` checkpoint, or torchvision VGG weights with --torchvision")],
    shards: Annotated[Path, typer.Option("--shards", help="output of `vgg ingest`")],
    out: Annotated[Path, typer.Option("--out", help="posteriors file to write (.npz)")],
    mode: Annotated[str, typer.Option(help="dense | multicrop | dense+multicrop (§3.2)")] = "dense",
    scales: Annotated[str, typer.Option(help="single (Q from the training S) | multi (three Q) | explicit px list "
                                        "like 256,384,512")] = "single",
    torchvision: Annotated[Optional[str], typer.Option(help="the file is torchvision vgg11/13/16/19 weights of this "
                                                       "configuration (A/B/D/E); needs explicit --scales")] = None,
    single_out: Annotated[Optional[Path], typer.Option(
        "--single-out", help="with --scales multi: also write the single-scale posteriors (Q from the training S, "
        "one of the three) from the same pass")] = None,
    split: Annotated[str, typer.Option(help="split of the shards to evaluate")] = "val",
    device: Annotated[Optional[str], typer.Option(
        help="auto (CUDA here if any, else CPU) | cpu | cuda | ray (a task on the Ray cluster); default eval.device")
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS,
    profile: ProfileOption = None,
    set_: SetOption = None,
) -> None:
    """Per-image softmax posteriors of one model in one evaluation mode, saved for fusion and the report."""
    from vgg.evaluate.metrics import errors
    from vgg.evaluate.scales import choose_scales

    from pipelines.evaluation import Request, run
    from vgg.files import check_writable

    resolved = _profile(params, profile, set_)
    for path, option in ((out, "--out"), (single_out, "--single-out")):
        if path is not None:
            check_writable(path.parent, option)  # one line now, not after minutes of evaluation
    if single_out is not None and scales != "multi":
        raise ConfigError("--single-out: only with --scales multi (the single-scale Q is one of the three)")
    chosen = choose_scales(scales, model=None if torchvision else model, q_offset=resolved.eval.q_offset)
    request = Request(
        model=model.absolute(), torchvision=torchvision, shards=shards.absolute(), split=split, mode=mode,
        scales=chosen.scales, keep_scales=(chosen.single,) if single_out else (), grid=resolved.eval.grid,
        batch_size=resolved.eval.batch_size, channels_last=resolved.train.channels_last,
        decode_threads=resolved.data.loader_workers,
    )
    results = run(request, device=device or resolved.eval.device, gpu=resolved.train.use_gpu)
    for path, result in zip([out, single_out], results):
        result.save(path)
        error = errors(result)
        typer.echo(f"{path}: {result.meta['config']} {mode} Q={result.meta['scales']}: top-1 error "
                   f"{error['top1_err']:.2f}%, top-5 error {error['top5_err']:.2f}% on {len(result.keys)} {split} "
                   "images")


@app.command()
def fuse(
    inputs: Annotated[list[Path], typer.Argument(help="posteriors files of the models to fuse (same images)")],
    out: Annotated[Path, typer.Option("--out", help="fused posteriors file to write (.npz)")],
) -> None:
    """ConvNet fusion (§4.4): average the softmax posteriors of several models (or of dense and multi-crop)."""
    from vgg.evaluate.metrics import errors
    from vgg.evaluate.results import Posteriors, fuse as fuse_posteriors
    from vgg.files import check_writable

    check_writable(out.parent, "--out")
    fused = fuse_posteriors([Posteriors.load(path) for path in inputs])
    fused.save(out)
    result = errors(fused)
    typer.echo(f"{out}: {fused.meta.get('config')} fused from {len(inputs)} files: top-1 error "
               f"{result['top1_err']:.2f}%, top-5 error {result['top5_err']:.2f}%")


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="directory of posteriors files (`vgg evaluate`, `vgg fuse`)")],
    out: Annotated[Path, typer.Option("--out", help="directory for report.md, metrics.json and the plots")],
    show: Annotated[bool, typer.Option(help="print the Markdown report")] = True,
    track: Annotated[bool, typer.Option(help="log the report to MLflow (MLFLOW_TRACKING_URI or ./mlflow.db)")] = True,
    params: ParamsOption = DEFAULT_PARAMS,
    profile: ProfileOption = None,
    set_: SetOption = None,
) -> None:
    """The paper's Tables 3-6 with our numbers beside the paper's, findings, plots."""
    import json

    from vgg.report import write_report

    resolved = _profile(params, profile, set_)
    paths = write_report(results, out)
    if show:
        typer.echo(paths.markdown.read_text())
    typer.echo(f"wrote {paths.markdown}, {paths.metrics} and {len(paths.plots)} plots in {out}")
    if track:
        from pipelines.provenance import protocol_key
        from pipelines.tracking import (TrackedRun, flatten, git_commit, protocol_name, record_evaluations,
                                        source_tags, tracking_uri)

        root = Path.cwd()
        tags = {"profile": resolved.name, "git_commit": git_commit(root), **source_tags(root, command="report")}
        with TrackedRun(uri=tracking_uri(root), experiment=f"vgg-{resolved.name}", run_name="report",
                        tags={**tags, "stage": "report"}, params=flatten(resolved.to_dict()),
                        protocol=(protocol_key(params), protocol_name(resolved.name))) as run:
            numbers = {key.replace(".", "/"): float(value)
                       for key, value in flatten(json.loads(paths.metrics.read_text())).items() if _is_number(value)}
            run.log_metrics(numbers, step=0)
            for path in (paths.markdown, paths.metrics, *paths.plots):
                run.log_artifact(path)
            for note in record_evaluations(run, list(paths.placed), tags=tags):
                typer.echo(f"warning: {note}", err=True)
        typer.echo(f"logged to MLflow: experiment vgg-{resolved.name}, run {run.run_id}; each model's errors on its "
                   "training run")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text not in ("nan", "inf", "-inf", "None")


@app.command()
def tune(
    config: Annotated[str, typer.Option("--config", help="Table 1 configuration to tune (A..E)")],
    shards: Annotated[Path, typer.Option("--shards", help="output of `vgg ingest`")],
    out: Annotated[Path, typer.Option("--out", help="best values as a params.yaml overlay to merge")] = Path("tune-best.yaml"),
    scale: Annotated[str, typer.Option(help="which scales entry the S range tunes (low, high, jitter)")] = "jitter",
    init: Annotated[Optional[Path], typer.Option("--init", help="the tuned stage's --init: fine-tuning the same "
                                                 "configuration searches train.fine_tune_lr (default: from scratch)")] = None,
    lr_range: Annotated[Optional[tuple[float, float]], typer.Option(
        "--lr-range", help="log-uniform lr range: LOW HIGH (default: a decade either side of the profile's)")] = None,
    s_min: Annotated[str, typer.Option(help="Smin candidates, px: 40,48 or 40:56:8 (default: the profile's)")] = "",
    s_max: Annotated[str, typer.Option(help="Smax candidates, px: 56,64,72 or 56:72:8 (default: the profile's)")] = "",
    trials: Annotated[int, typer.Option(help="trials (each a Ray Train run)")] = 4,
    searcher: Annotated[str, typer.Option(help="random (a seeded plan), tpe (Optuna, learns from the results) or "
                                          "grid (lr only, no early stop)")] = "random",
    trial_slots: Annotated[int, typer.Option(help="trials at once (0: as many as the Ray cluster holds)")] = 0,
    max_epochs: Annotated[int, typer.Option(help="epochs per trial; ASHA stops the weak ones earlier")] = 4,
    time_budget: Annotated[float, typer.Option(help="seconds for the whole search")] = 900.0,
    label_smoothing: Annotated[str, typer.Option(
        "--label-smoothing", help="train.label_smoothing candidates drawn per trial, e.g. 0,0.1 (default: the "
        "profile's value, not searched)")] = "",
    results: Annotated[Optional[Path], typer.Option(
        "--results", help="also write the results table and the search's provenance as JSON")] = None,
    storage: StorageOption = DEFAULT_STORAGE,
    storage_shared: StorageSharedOption = False,
    track: Annotated[bool, typer.Option(help="parent + child runs in MLflow")] = True,
    params: ParamsOption = DEFAULT_PARAMS,
    profile: ProfileOption = None,
    set_: SetOption = None,
) -> None:
    """Ray Tune search over lr (log-uniform) and the S range in the tuned stage's regime, trials in parallel,
    early-stopped by ASHA; writes the best as params (docs/tuning.md)."""
    from pipelines import ray_tune
    from pipelines.cluster import check_storage, connect

    resolved = _profile(params, profile, set_)
    if not storage_shared and os.environ.get("RAY_ADDRESS"):  # a local Ray is one node
        connect()
        check_storage(storage_path(storage).absolute(), shared=False)
    ray_tune.tune(
        resolved, config=config, scale_key=scale, shards=shards, lr_range=lr_range,
        s_min_range=ray_tune.parse_sizes(s_min, option="--s-min") if s_min else None,
        s_max_range=ray_tune.parse_sizes(s_max, option="--s-max") if s_max else None,
        trials=trials, max_epochs=max_epochs, time_budget_s=time_budget, storage=storage_path(storage), out=out,
        track=track,
        label_smoothing=(ray_tune.parse_fractions(label_smoothing, option="--label-smoothing")
                         if label_smoothing else None),
        init=init, searcher=searcher, trial_slots=trial_slots, results=results,
    )
    typer.echo(f"best values written to {out}")


@app.command()
def demo() -> None:
    """The main job: the paper's whole protocol (`dvc repro`) on the profile in params.yaml, then the report. Run it
    from the project root: dvc reads ./params.yaml (switch profiles with `dvc exp run -S profile=...`)."""
    import contextlib
    import subprocess
    import time

    resolved = _profile(DEFAULT_PARAMS, None, None)
    if not Path("dvc.yaml").is_file():
        raise ConfigError("dvc.yaml not found: run `vgg demo` (or `make demo`) from the project root")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        # dvc's stages call `vgg`: this environment's, also when it is not activated (`.venv/bin/vgg demo`).
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        # dvc's index and lock databases in the project (.dvc/tmp is dvc's own, ignored by git), not in /var/tmp/dvc,
        # which every user and every earlier clone shares
        env.setdefault("DVC_SITE_CACHE_DIR", str(Path(".dvc/tmp/site-cache").absolute()))

        def repro(*targets: str) -> None:
            # In a process group of its own, so that an interrupt reaches dvc and its stage together, as SIGINT
            # (dvc releases its stage locks on it; the stage's `vgg` ends through its clean-up) — also when this
            # process got SIGTERM — and none of them outlives this command.
            process = subprocess.Popen([str(Path(sys.executable).with_name("dvc")), "repro", *targets], env=env,
                                       start_new_session=True)
            try:
                code = process.wait()
            except BaseException:
                _interrupt_group(process)
                raise
            if code:
                raise ConfigError("dvc repro failed (see the stage output above); fix it and run `make demo` again")

        if not env.get("RAY_ADDRESS"):
            from concurrent.futures import ThreadPoolExecutor

            from pipelines.cluster import local_cluster

            # One local Ray for every training stage, instead of starting (and stopping) Ray in each of them. It
            # starts (~11 s on 2 cores) while dvc makes the data, which needs no Ray.
            cluster = local_cluster()
            starting = stack.enter_context(ThreadPoolExecutor(max_workers=1)).submit(cluster.__enter__)
            stack.callback(lambda: starting.exception() is None and cluster.__exit__(None, None, None))
            repro("ingest")  # and what it depends on
            env = starting.result().client_env(env)
            env.update(RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",  # one more actor per stage; no preemption here
                       RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")  # (default 2 s) a run's end is seen ~1 s sooner
        repro()
    report = Path("reports") / resolved.name / "report.md"
    typer.echo(report.read_text())
    typer.echo(f"protocol ({resolved.name} profile) up to date after {time.monotonic() - started:.0f} s")
    typer.echo(f"report: {report}; plots: {report.parent}/*.png; metrics: dvc metrics show")
    typer.echo(f"MLflow UI: mlflow ui --backend-store-uri sqlite:///mlflow.db, then open {_runs_page(resolved.name)}")


def _runs_page(profile: str, server: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page of the profile's runs table, on its Tables 3-5 view (`pipelines.tracking.runs_page`)."""
    from pipelines.tracking import TrackedRun, runs_page, tracking_uri

    experiment = TrackedRun.find_experiment(tracking_uri(Path.cwd()), f"vgg-{profile}")
    return runs_page(server, experiment and experiment.experiment_id, tags=experiment and experiment.tags)


def _interrupt_group(process, grace_s: float = 120.0) -> None:
    """SIGINT to `process`'s group, then SIGKILL to what is left of it after `grace_s` (a training stage stops its
    Ray run and marks its MLflow run in a few seconds)."""
    import subprocess

    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            pass


def _print_tree(tree: dict, indent: int = 0) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            typer.echo(" " * indent + f"{key}:")
            _print_tree(value, indent + 2)
        else:
            typer.echo(" " * indent + f"{key}: {value}")


def main() -> None:
    """Console-script entry point."""
    # No usage reports from the user's machine (MLflow would also keep an id file in the home); Ray's usage stats
    # are off for the clusters the project starts, and DVC's analytics in .dvc/config.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    exit_now(run_command())


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def run_command() -> int:
    """Run the `vgg` command in sys.argv; returns its exit status. User errors are one line on stderr and status 2."""
    try:
        app()
    except VGGError as error:
        typer.echo(f"error: {error}", err=True)
        return getattr(error, "exit_status", 2)
    except SystemExit as exit_:  # how typer ends every command
        if isinstance(exit_.code, str):
            typer.echo(exit_.code, err=True)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Interrupted as interrupt:
        sig = signal.Signals(interrupt.signum)
        typer.echo(f"error: interrupted ({sig.name}); what was already written is kept (`vgg train` and `vgg demo` "
                   "resume from it when run again)", err=True)
        return 128 + sig
    return 0


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown of torch, Ray, MLflow and the rest, which takes 1–3 s
    per command on 2 cores (the protocol runs ~30). What a normal exit does before that teardown still happens,
    in order, through the same two calls the interpreter makes: `threading._shutdown` (thread-pool workers told
    to stop, other non-daemon threads joined), `atexit._run_exitfuncs` (Ray's shutdown, multiprocessing's worker
    clean-up, logging's flush); then the standard streams are flushed.

    `threading._shutdown` is private, and this is its one use: no public API runs the exit hooks that
    `concurrent.futures` registers with `threading._register_atexit`, and joining the threads without them would
    wait forever on idle pool workers. If a Python release removes it, `sys.exit(code)` is the fallback: the same
    outcome, the teardown's seconds slower."""
    if not hasattr(threading, "_shutdown"):
        sys.exit(code)
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
