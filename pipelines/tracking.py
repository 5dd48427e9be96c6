"""MLflow, the lab notebook: one experiment per profile, one run per stage execution, logged by one process.

The run is created and written by the driver process (never by Ray workers), so a training run with any number
of workers — or workers restarted after a failure — is exactly one MLflow run. Per-epoch metrics reach it through
`MetricsRelay`. Default store: a SQLite file in the project (`mlflow ui --backend-store-uri sqlite:///mlflow.db`);
`MLFLOW_TRACKING_URI` points elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator, Mapping

from vgg.errors import Interrupted, VGGError


RESUME_TAG = "vgg.resume_key"
PROTOCOL_TAG = "vgg.protocol_key"  # the parent run of one protocol execution (`pipelines.provenance.protocol_key`)
MODEL_TAG = "vgg.model_sha256"  # on a training run: the sha256 of the model file it wrote
# MLflow's artifact downloads draw progress bars on stderr, one per file: noise in every stage's output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class TrackingError(VGGError):
    """The tracking store cannot be reached or written."""


class UnrecordedError(TrackingError):
    """The work finished and its output is written, but MLflow could not record it."""

    exit_status = 3  # its own: a training whose model is written but not recorded is not a failed training


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the project's SQLite store `<root>/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def check_reachable(uri: str, *, timeout_s: float = 5.0) -> None:
    """Fail before any work starts when a tracking server is down (a local store needs no check)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        problem = str(getattr(error, "reason", error))
    raise TrackingError(
        f"MLflow tracking server {uri} is not reachable ({problem}); start it, fix MLFLOW_TRACKING_URI, "
        "or unset it to use the local store mlflow.db"
    )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → MLflow params with dotted names (`train.lr`), the same names in every run."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def source_tags(root: Path, *, command: str) -> dict[str, str]:
    """MLflow's source tags (the runs table's Source and Version columns): the DVC stage or `vgg` command that ran,
    the git commit, and the DVC experiment where there is one."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": os.environ.get("DVC_STAGE") or f"vgg {command}",
            "mlflow.source.git.commit": git_commit(root).removesuffix("+dirty")}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    return tags


def protocol_name(profile: str) -> str:
    """The parent run's name: the profile, and the DVC experiment where there is one."""
    experiment = os.environ.get("DVC_EXP_NAME")
    return f"protocol-{profile}" + (f"-{experiment}" if experiment else "")


def git_commit(root: Path) -> str:
    """The commit the code ran at, `+dirty` when the work tree differs; `unknown` outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


# Marks the experiment as model training rather than GenAI. (MLflow 3.17's UI still picks its view from the address,
# `?workflowType=machine_learning`, which is why `vgg demo` prints one; this tag is the experiment's own record.)
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}


def metric_name(key: str) -> str:
    """`key` as an MLflow metric name: MLflow refuses any character but letters, digits, `_ - . : /` and space
    (the report's `table5/D/dense+multicrop/top1_err` becomes `table5/D/dense_multicrop/top1_err`)."""
    return _METRIC_NAME_FORBIDDEN.sub("_", key)


_METRIC_NAME_FORBIDDEN = re.compile(r"[^\w\-.:/ ]")


@contextlib.contextmanager
def _one_opener(uri: str) -> Iterator[None]:
    """Serialise the opening of a SQLite store across processes (two `vgg` commands started together): MLflow
    creates and migrates a store's tables on opening it, and two processes doing that on one new file fail with a
    traceback (as two creating one experiment would).

    The lock is flock(2) on the store's directory, not on the database file: closing any descriptor of that file
    would also drop the fcntl locks SQLite holds on it in this process. The directory is made first, as MLflow would
    make it. Where it cannot be made or locked (some network file systems) the store opens unlocked, as MLflow alone
    opens it, and says what is wrong if it cannot open either."""
    path = uri.removeprefix("sqlite:///")
    if path == uri or path == ":memory:":
        yield
        return
    with contextlib.ExitStack() as unlock:
        try:
            parent = Path(path).absolute().parent
            parent.mkdir(parents=True, exist_ok=True)
            directory = os.open(parent, os.O_RDONLY)
            unlock.callback(os.close, directory)
            fcntl.flock(directory, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


class TrackedRun:
    """One MLflow run, written through an explicit client (no global "active run" state)."""

    def __init__(
        self,
        *,
        uri: str,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, str],
        parent_run_id: str | None = None,
        resume_key: str | None = None,
        protocol: tuple[str, str] | None = None,
    ) -> None:
        """`resume_key`: a deterministic key of the work (e.g. the Ray run name); an unfinished run with the same key
        (a crashed earlier attempt) is continued instead of starting a second run for the same work. `protocol`:
        (key, name) of the protocol execution this run belongs to: its parent run, found or made."""
        check_reachable(uri)
        import mlflow  # imported here: ~1 s, and only the commands that track pay it
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._mlflow = mlflow
        try:
            with _one_opener(uri):
                self.client = MlflowClient(tracking_uri=uri)  # creates a SQLite store's tables
                found = self.client.get_experiment_by_name(experiment)
                self.experiment_id = found.experiment_id if found else self.client.create_experiment(
                    experiment, tags=EXPERIMENT_TAGS)
                if found and found.tags.get(EXPERIMENT_KIND) is None:
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, EXPERIMENT_TAGS[EXPERIMENT_KIND])
                if protocol is not None and parent_run_id is None:
                    parent_run_id = self._protocol_run(*protocol, tags=tags)
            all_tags = dict(tags)
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            if resume_key:
                all_tags[RESUME_TAG] = resume_key
            earlier = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{RESUME_TAG}` = '{resume_key}'",
                order_by=["attributes.start_time DESC"], max_results=1,
            ) if resume_key else []
            if earlier and earlier[0].info.status != "FINISHED":
                run = earlier[0]
                self.client.update_run(run.info.run_id, status="RUNNING")
            else:
                run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        except Exception as error:  # the store itself failed (bad path, server error): one line, not a traceback
            raise TrackingError(f"MLflow store {uri} cannot be written: {str(error).splitlines()[0]}") from None
        self.run_id = run.info.run_id
        self.experiment = experiment
        self.parent_run_id = run.data.tags.get("mlflow.parentRunId", parent_run_id)
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params  # a resumed run has them already
        items = [Param(key, value[:6000]) for key, value in sorted(params.items()) if key not in logged]
        for start in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    @staticmethod
    def find_experiment(uri: str, experiment: str) -> Any | None:
        """`experiment` (an `mlflow.entities.Experiment`) in the store at `uri`, if the store and it exist."""
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            return None
        from mlflow.tracking import MlflowClient

        try:
            with _one_opener(uri):
                return MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
        except Exception:  # an unreachable store: the UI link then points at the list of experiments
            return None

    def _protocol_run(self, key: str, name: str, *, tags: Mapping[str, str]) -> str:
        """The parent run of protocol execution `key`, made (and marked finished: it only groups) by its first stage;
        called while the store is locked, so two stages never make two."""
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PROTOCOL_TAG}` = '{key}'",
                                        max_results=1)
        if found:
            return found[0].info.run_id
        inherited = {k: v for k, v in tags.items() if k.startswith(("mlflow.source.git", "dvc.experiment", "profile"))}
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**inherited, PROTOCOL_TAG: key, "stage": "protocol"})
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def log_dataset(self, index: Path, *, name: str, context: str) -> None:
        """Record the shards this run read (the runs table's Dataset column): their index file, named by its
        sha256 (which covers every shard's own sha256)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        from pipelines.provenance import file_sha256

        dataset = Dataset(name=name, digest=file_sha256(index)[:12], source_type="local",
                          source=json.dumps({"uri": str(index.parent.resolve())}))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def log_metrics(self, metrics: Mapping[str, Any], *, step: int) -> None:
        """Log the numeric entries of `metrics` at `step` (names through `metric_name`)."""
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.client.log_batch(self.run_id, metrics=_metrics(numeric, step=step))

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2, sort_keys=True))
            self.client.log_artifact(self.run_id, str(path))

    def log_artifact(self, path: Path, *, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def log_curves(self, keys: tuple[str, ...] = ("train/loss", "val/top1_err", "val/top5_err", "lr")) -> None:
        """Training curves as one PNG artifact (`curves.png`), from the metrics this run logged."""
        history = {key: sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))
                   for key in keys}
        present = [key for key in keys if history[key]]
        if not present:
            return
        from matplotlib.figure import Figure  # not pyplot: no GUI backend, ~1 s less to import

        figure = Figure(figsize=(4 * len(present), 3), layout="tight")
        axes = figure.subplots(1, len(present), squeeze=False)
        for axis, key in zip(axes[0], present):
            steps, values = zip(*history[key])
            axis.plot(steps, values, marker="o")
            axis.set_title(key)
            axis.set_xlabel("epoch")
            if key == "lr":
                axis.set_yscale("log")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "curves.png"
            figure.savefig(path, dpi=100)
            self.client.log_artifact(self.run_id, str(path))

    def register_model(self, checkpoint: Path, *, stats: Path, crop: int, name: str, tags: Mapping[str, str]) -> str:
        """Log the final checkpoint as this run's MLflow model `model` (`pipelines/mlflow_model.py`: code, the
        checkpoint and the colour statistics `stats`; nothing pickled), with its signature and an input example of
        two `crop` px crops, and register it as a new version of `name` with `tags`; returns the version.
        `mlflow.pyfunc.load_model("models:/<name>/<version>")` loads it. The run gets the model file's sha256
        (MODEL_TAG), by which `vgg report` finds it. A torch.export model instead costs ~12 s per training stage
        (benchmarks/RESULTS.md); this one ~2 s."""
        import numpy as np

        from pipelines.provenance import file_sha256

        self.client.set_tag(self.run_id, MODEL_TAG, file_sha256(checkpoint))
        example = np.random.default_rng(0).uniform(0, 255, (2, 3, crop, crop)).astype(np.float32)
        self._mlflow.set_tracking_uri(self.uri)
        with self._mlflow.start_run(run_id=self.run_id):  # the fluent log_model writes to the active run
            logged = self._mlflow.pyfunc.log_model(
                name="model", python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts={"checkpoint": str(checkpoint), "stats": str(stats)}, input_example=example,
                pip_requirements=[f"{package}=={version(package)}" for package in ("torch", "numpy", "mlflow")],
                registered_model_name=name,
            )
        registered = str(logged.registered_model_version)
        for key, value in tags.items():
            self.client.set_model_version_tag(name, registered, key, value)
        return registered

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    # The one lifecycle of a run: `with TrackedRun(...) as run:` ends it FINISHED, or KILLED/FAILED by what ended
    # the block (`end_status`). If ending it fails too (the store that failed in the block, say), the block's own
    # error is the one reported.
    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: object) -> None:
        if error is None:
            self.finish()
            return
        try:
            self.finish(end_status(error))
        except Exception:
            pass


EVAL_MODES = {"dense": "dense", "multicrop": "multicrop", "dense+multicrop": "both"}  # metric name part
CHAMPION = "champion"  # the registered-model alias of the best single model of Table 4


def eval_metrics(result: Any) -> dict[str, float]:
    """A report result (`vgg.report.Result`) as the metrics every model's run carries under the same names, so the
    runs table's columns are Tables 3-5: `eval/<dense|multicrop|both>_<single|multi>/top1_err` (and top5_err, and
    their 95% interval bounds)."""
    prefix = f"eval/{EVAL_MODES[result.mode]}_{'multi' if len(result.scales) > 1 else 'single'}"
    return {f"{prefix}/top1_err": result.top1_err, f"{prefix}/top5_err": result.top5_err,
            f"{prefix}/top1_ci_low": result.top1_ci[0], f"{prefix}/top1_ci_high": result.top1_ci[1],
            f"{prefix}/top5_ci_low": result.top5_ci[0], f"{prefix}/top5_ci_high": result.top5_ci[1]}


def unrecorded(out: Path, problem: str) -> UnrecordedError:
    return UnrecordedError(f"training finished and {out} is written, but MLflow failed to record it ({problem}); the "
                           "model is kept")


def record_evaluations(report: TrackedRun, results: list[Any], *, tags: Mapping[str, str]) -> list[str]:
    """Log each placed evaluation result (`vgg.report.Result`) to the run of the model it evaluated (found by the
    model file's sha256, MODEL_TAG) and each fusion of several models to a `fusion-<configs>-<S>` run beside the
    report's, marking each with `reported_tag` of the report's protocol run; save the experiment's "Tables 3-5" view
    of those runs (`save_tables_view`); then set the registered-model alias `champion` on the best single model of
    Table 4 (dense, multiple Q). Returns one line per thing it could not place (a model trained untracked, say)."""
    client, notes = report.client, []
    by_run: dict[str, dict[str, float]] = {}
    fusions: dict[str, dict[str, float]] = {}
    for result in results:
        if result.model is None:
            name = f"fusion-{result.config}-{result.train_label}"
            fusions.setdefault(name, {}).update(eval_metrics(result))
            continue
        found = client.search_runs([report.experiment_id], filter_string=f"tags.`{MODEL_TAG}` = '{result.model}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            notes.append(f"{result.path}: no MLflow run recorded its model (trained with --no-track?)")
            continue
        by_run.setdefault(found[0].info.run_id, {}).update(eval_metrics(result))
    member = {reported_tag(report.parent_run_id): "true"} if report.parent_run_id else {}
    for run_id, metrics in by_run.items():
        client.log_batch(run_id, metrics=_metrics(metrics, step=0), tags=_tags(member))
    for name, metrics in fusions.items():
        fusion = TrackedRun(uri=report.uri, experiment=report.experiment, run_name=name,
                            tags={**tags, **member, "stage": "fusion", "config": name.split("-")[1]}, params={},
                            parent_run_id=report.parent_run_id)
        fusion.log_metrics(metrics, step=0)
        fusion.finish()
    columns = sorted({key for metrics in by_run.values() for key in metrics if key.endswith("_err")})
    if columns and report.parent_run_id:
        save_tables_view(client, report.experiment_id, protocol_run_id=report.parent_run_id, metrics=columns)
    best = min(by_run, key=lambda run_id: by_run[run_id].get("eval/dense_multi/top1_err", float("inf")), default=None)
    if best is not None and "eval/dense_multi/top1_err" in by_run[best]:
        champions = client.search_model_versions(f"run_id = '{best}'")
        for model in client.search_registered_models("name LIKE 'vgg-%'"):  # one champion across vgg-A..E
            if CHAMPION in model.aliases and model.name not in {version.name for version in champions}:
                client.delete_registered_model_alias(model.name, CHAMPION)
        for version in champions:
            client.set_registered_model_alias(version.name, CHAMPION, version.version)
    return notes


# MLflow 3.17's runs page opens a saved view named in its address (`#/experiments/<id>/runs?viewStateShareKey=<key>`)
# from the experiment tag `mlflow.sharedViewState.<key>`: a JSON envelope {name, createdAt, updatedAt, state}, whose
# `state` is the page's search facets and UI state as a JSON string (the shape the UI's "Save as new view" writes).
# Without one, the runs table opens collapsed, on the Source/Models/Dataset columns, and no evaluation is in sight.
TABLES_VIEW = "tables-3-5"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."


def _table_order(metric: str) -> tuple[int, int, str]:
    """Tables 3, 4, 5 left to right: dense at one Q, dense at several, multi-crop, both; top-1 before top-5."""
    modes = ["dense_single", "dense_multi", "multicrop_single", "multicrop_multi", "both_single", "both_multi"]
    mode = metric.split("/")[1] if metric.count("/") >= 2 else ""
    return (modes.index(mode) if mode in modes else len(modes), 0 if metric.endswith("top1_err") else 1, metric)


def tables_view_state(*, protocol_run_id: str, metrics: list[str]) -> dict[str, Any]:
    """The runs page's state: the runs of one protocol execution's report (`reported_tag`), grouped by
    configuration, with `metrics` as columns in the order of Tables 3-5.
    Grouping shows the nested runs flat: a shared view cannot expand a parent run (the UI keeps `runsExpanded` per
    user). Every key of the UI's own default state is given: the UI replaces its state with this one."""
    ordered = sorted(metrics, key=_table_order)
    columns = [f"metrics.`{metric}`" for metric in ordered]  # alone: beside Models and Dataset they start off-screen
    return {
        # search facets
        "searchFilter": f"tags.`{reported_tag(protocol_run_id)}` = 'true'", "orderByKey": "attributes.start_time",
        "orderByAsc": False, "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        # UI state; 170 px shows a whole `eval/dense_single/top1_err` header
        "selectedColumns": columns, "columnOrder": columns, "columnWidths": dict.fromkeys(columns, 170),
        "runsExpanded": {}, "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {}, "runsHiddenMode": "SHOW_ALL",
        "viewMaximized": False, "runListHidden": False, "isAccordionReordered": False,
        "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "config"}]},
        "groupsExpanded": {}, "autoRefreshEnabled": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def save_tables_view(client: Any, experiment_id: str, *, protocol_run_id: str, metrics: list[str]) -> None:
    """Save (or replace) the experiment's `tables-3-5` view: the latest protocol run's models with their errors in
    every evaluation mode, so the runs table is Tables 3-5."""
    now = int(time.time() * 1000)
    tag = VIEW_TAG_PREFIX + TABLES_VIEW
    earlier = client.get_experiment(experiment_id).tags.get(tag)
    try:
        created = json.loads(earlier)["createdAt"] if earlier else now
    except (ValueError, KeyError, TypeError):
        created = now
    state = json.dumps(tables_view_state(protocol_run_id=protocol_run_id, metrics=metrics))
    client.set_experiment_tag(experiment_id, tag, json.dumps(
        {"name": "Tables 3-5", "createdAt": created, "updatedAt": now, "state": state}))


def runs_page(server: str, experiment_id: str | None, *, tags: Mapping[str, str] | None = None) -> str:
    """The MLflow UI address of an experiment's runs table: the model-training view (MLflow 3's UI opens on its
    GenAI view, traces and token usage, unless the address asks for this one), on the Tables 3-5 view where the
    experiment has one."""
    if experiment_id is None:
        return f"{server}/#/experiments?workflowType=machine_learning"
    view = f"&viewStateShareKey={TABLES_VIEW}" if (tags or {}).get(VIEW_TAG_PREFIX + TABLES_VIEW) else ""
    return f"{server}/#/experiments/{experiment_id}/runs?workflowType=machine_learning{view}"


def reported_tag(protocol_run_id: str) -> str:
    """The tag that marks a run as evaluated (or fused) in the report of protocol run `protocol_run_id`. A run's
    parent is the protocol run that trained it; a later protocol (a `dvc exp run` that changed one stage) reports
    models of earlier ones too, so its report's runs are found by this tag, not by their parent."""
    return f"vgg.reported.{protocol_run_id}"


def _tags(values: Mapping[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(key, value) for key, value in values.items()]


def _metrics(values: Mapping[str, float], *, step: int) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(metric_name(key), float(value), now, step) for key, value in values.items()]


def end_status(error: BaseException) -> str:
    """MLflow's status for a run that `error` ended: KILLED for Ctrl-C or SIGTERM, FAILED for anything else."""
    return "KILLED" if isinstance(error, (Interrupted, KeyboardInterrupt)) else "FAILED"


class MetricsRelay:
    """Opens a `TrackedRun` and logs to it the per-epoch metrics another process of this node appends to a JSON-lines
    file (Ray Train's controller: `pipelines.ray_train.EpochLog`), from a thread of this process, while the caller
    waits on the training. MLflow's import and store set-up (~5 s on 2 cores) then overlap Ray Train's start-up
    instead of preceding it, and the controller never imports MLflow (which took that CPU from the first epochs).

    Each line: {"step": int, "metrics": {name: number}}. `start()`, then `stop()` once the training has ended:
    it logs what is left and returns the run, or raises the `TrackingError` that stopped the relay.
    """

    POLL_S = 0.5

    def __init__(self, open_run: Callable[[], TrackedRun], path: Path) -> None:
        self._open_run, self.path = open_run, path
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._relay, name="mlflow-relay", daemon=True)
        self._run: TrackedRun | None = None
        self._error: BaseException | None = None

    def start(self) -> MetricsRelay:
        self._thread.start()
        return self

    def stop(self) -> TrackedRun:
        self._stopping.set()
        self._thread.join()
        if self._error is not None:
            if isinstance(self._error, TrackingError):
                raise TrackingError(str(self._error))
            raise TrackingError(f"MLflow store cannot be written: {_first_line(self._error)}") from self._error
        assert self._run is not None
        return self._run

    def _relay(self) -> None:
        offset = 0
        try:
            try:
                self._run = self._open_run()
            except TrackingError as error:  # said now, not only when a possibly long training has ended
                print(f"warning: {error}; training goes on untracked, its model is still written", file=sys.stderr)
                raise
            while True:
                last = self._stopping.wait(self.POLL_S)
                try:
                    offset = self._log_new_lines(offset)
                except Exception as error:  # after MLflow's own retries (~4 min by default: docs/errors.md)
                    print(f"warning: MLflow stopped recording this training ({_first_line(error)}); training goes "
                          "on untracked, its model is still written", file=sys.stderr)
                    raise
                if last:
                    return
        except BaseException as error:  # raised by stop(), in the caller's thread
            self._error = error

    def _log_new_lines(self, offset: int) -> int:
        """Log the complete lines after byte `offset`; returns the offset after them (a line still being written
        is read next time)."""
        try:
            with open(self.path, "rb") as file:
                file.seek(offset)
                data = file.read()
        except FileNotFoundError:
            return offset
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.splitlines():
            entry = json.loads(line)
            self._run.log_metrics(entry["metrics"], step=entry["step"])
        return offset + len(complete)


def _first_line(error: BaseException, limit: int = 300) -> str:
    line = (str(error).splitlines() or [type(error).__name__])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"
