"""MLflow sink against a real `mlflow server` on 127.0.0.1 (started once per session by conftest)."""

import json
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.tracking import (TABLES_VIEW, VIEW_TAG_PREFIX, MetricsRelay, TrackedRun, TrackingError,
                                check_reachable, flatten, metric_name, reported_tag, runs_page, save_tables_view,
                                tracking_uri)
from tests.conftest import free_port

pytestmark = pytest.mark.slow  # starts Ray, an MLflow server or `vgg` runs: `pytest -m 'not slow'` skips it


def _real_model(tmp_path, tiny_params):
    """A `vgg train`-format final model of A (the tiny profile's shapes) and colour statistics, as a run writes."""
    import numpy as np

    from pipelines.params import load_profile
    from vgg.models import checkpoint, from_config

    profile = load_profile(tiny_params)
    model = from_config("A", profile.model, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "A-low.pt"
    checkpoint.save(path, {**checkpoint.header(config="A", profile=profile, scale=profile.scales.low),
                           "model": model.state_dict()})
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"mean_rgb": [120.0, 110.0, 100.0], "eigval": [0.2, 0.02, 0.002],
                                 "eigvec": np.eye(3).tolist()}))
    return model.eval(), path, stats, profile.model.crop


def test_run_logs_params_metrics_artifacts_and_registers_the_model(mlflow_server, tmp_path, tiny_params):
    run = TrackedRun(
        uri=mlflow_server,
        experiment="vgg-test",
        run_name="train-A-40",
        tags={"stage": "train", "config": "A", "scale": "40", "profile": "test"},
        params=flatten({"train": {"lr": 0.01, "batch_size": 64}, "model": {"crop": 32}}),
    )
    for epoch, (loss, top1) in enumerate([(2.3, 90.0), (1.9, 70.0), (1.5, 55.0)]):
        run.log_metrics({"train/loss": loss, "val/top1_err": top1, "lr": 0.01}, step=epoch)
    run.log_metrics({"table5/D/dense+multicrop/top1_err": 21.5}, step=0)  # the report's keys: `+` is refused
    run.log_dict({"profile": "test"}, "config.json")
    run.log_curves()
    model, weights, stats, crop = _real_model(tmp_path, tiny_params)
    version = run.register_model(weights, stats=stats, crop=crop, name="vgg-test-A",
                                 tags={"config": "A", "scale": "40"})
    again = run.register_model(weights, stats=stats, crop=crop, name="vgg-test-A",
                               tags={"config": "A", "scale": "40"})
    run.finish()

    client = MlflowClient(tracking_uri=mlflow_server)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params == {"train.lr": "0.01", "train.batch_size": "64", "model.crop": "32"}
    assert logged.data.tags["config"] == "A"
    # The UI opens the experiment on its runs table (model training), not on MLflow 3's GenAI view.
    assert client.get_experiment(run.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    history = client.get_metric_history(run.run_id, "val/top1_err")
    assert [(m.step, m.value) for m in history] == [(0, 90.0), (1, 70.0), (2, 55.0)]
    assert logged.data.metrics["table5/D/dense_multicrop/top1_err"] == 21.5
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config.json", "curves.png"} <= artifacts
    registered = client.get_model_version("vgg-test-A", version)
    assert registered.tags == {"config": "A", "scale": "40"} and registered.run_id == run.run_id
    assert int(again) == int(version) + 1  # the registered model exists already: a new version
    # The registered version is an MLflow model that loads in one line, with a signature and an input example, and
    # gives our model's softmax posteriors of mean-subtracted input.
    import mlflow
    import numpy as np

    mlflow.set_tracking_uri(mlflow_server)
    loaded = mlflow.pyfunc.load_model(f"models:/vgg-test-A/{version}")
    assert tuple(loaded.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, crop, crop)
    assert loaded.metadata.saved_input_example_info  # the input example is stored with the model
    images = np.random.default_rng(1).uniform(0, 255, (3, 3, crop, crop)).astype(np.float32)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(images) - torch.tensor([120.0, 110.0, 100.0]).view(1, 3, 1, 1)),
                                 dim=1).numpy()
    np.testing.assert_allclose(loaded.predict(images), expected, rtol=1e-5, atol=1e-6)
    assert registered.run_id == run.run_id and logged.data.tags["vgg.model_sha256"]


def test_an_experiment_made_before_gets_the_training_kind(mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.create_experiment("vgg-made-by-an-older-version")
    run = TrackedRun(uri=mlflow_server, experiment="vgg-made-by-an-older-version", run_name="x", tags={}, params={})
    run.finish()
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"


def test_parent_and_child_runs(mlflow_server):
    parent = TrackedRun(uri=mlflow_server, experiment="vgg-test", run_name="tune", tags={}, params={})
    child = TrackedRun(uri=mlflow_server, experiment="vgg-test", run_name="trial-1", tags={}, params={},
                       parent_run_id=parent.run_id)
    assert MlflowClient(mlflow_server).get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id


def test_the_tables_view_shows_the_protocols_runs_with_their_errors_as_columns(mlflow_server):
    """What the UI does with the saved view, checked through the REST API it calls: its filter finds the runs the
    latest protocol's report evaluated (one of them trained by an earlier protocol), each carries every column the
    view selects, in Tables 3-5's order; saving again (a later protocol) moves the view, keeps its creation time."""
    import urllib.request

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.create_experiment("vgg-view")
    columns = ["eval/dense_single/top1_err", "eval/dense_single/top5_err", "eval/dense_multi/top1_err",
               "eval/both_multi/top1_err"]
    parents, runs_of = [], {}
    for protocol in range(2):
        parent = client.create_run(experiment, run_name=f"protocol {protocol}").info.run_id
        for config in "AB":
            run = client.create_run(experiment, run_name=f"{config}-low",
                                    tags={"mlflow.parentRunId": parent, "config": config}).info.run_id
            for column in columns:
                client.log_metric(run, column, 10.0 * protocol + 1)
            runs_of[protocol, config] = run
        parents.append(parent)
    # the second protocol retrained B only and reports A of the first
    for run in (runs_of[0, "A"], runs_of[1, "B"]):
        client.set_tag(run, reported_tag(parents[1]), "true")
    for parent in parents:
        save_tables_view(client, experiment, protocol_run_id=parent, metrics=columns[::-1])
    tag = VIEW_TAG_PREFIX + TABLES_VIEW
    envelope = json.loads(client.get_experiment(experiment).tags[tag])
    state = json.loads(envelope["state"])
    assert envelope["name"] == "Tables 3-5" and envelope["updatedAt"] >= envelope["createdAt"]
    request = urllib.request.Request(
        f"{mlflow_server}/api/2.0/mlflow/runs/search", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"experiment_ids": [experiment], "filter": state["searchFilter"]}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.load(response)["runs"]
    assert sorted(run["info"]["run_id"] for run in runs) == sorted([runs_of[0, "A"], runs_of[1, "B"]])
    metric_columns = [c.removeprefix("metrics.`").removesuffix("`") for c in state["selectedColumns"]
                      if c.startswith("metrics.")]
    assert metric_columns == columns  # Table 3 (one Q), Table 4 (several Q), Table 5; top-1 before top-5
    for run in runs:
        assert {m["key"] for m in run["data"]["metrics"]} == set(columns)
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "config"}]  # nested runs, flat
    page = runs_page("http://ui", experiment, tags=client.get_experiment(experiment).tags)
    assert page.endswith(f"/runs?workflowType=machine_learning&viewStateShareKey={TABLES_VIEW}")
    assert runs_page("http://ui", experiment, tags={}).endswith("/runs?workflowType=machine_learning")


def test_a_tracked_run_ends_by_what_ended_its_block(mlflow_server):
    from vgg.errors import Interrupted

    client = MlflowClient(tracking_uri=mlflow_server)
    ended = {}
    for name, error in (("finished", None), ("failed", ValueError("bad")), ("killed", Interrupted(15))):
        try:
            with TrackedRun(uri=mlflow_server, experiment="vgg-lifecycle", run_name=name, tags={}, params={}) as run:
                if error is not None:
                    raise error
        except (ValueError, Interrupted) as raised:
            assert raised is error  # the block's own error, not one of ending the run
        ended[name] = client.get_run(run.run_id).info.status
    assert ended == {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def test_a_server_that_is_down_is_one_clear_line():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=rf"MLflow tracking server {uri} is not reachable") as error:
        check_reachable(uri, timeout_s=2)
    assert "\n" not in str(error.value)


def test_default_store_is_a_sqlite_file_in_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_commands_started_together_share_a_new_sqlite_store(tmp_path):
    # Three processes open the same new store (in a directory not made yet) at once, each logging a run in the same
    # new experiment (`vgg train` and `vgg tune` started together in a fresh project): MLflow creates the store's
    # tables and the experiment on first use, which without the lock fails in all but one of them with a traceback.
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    script = ("import sys; from pipelines.tracking import TrackedRun; "
              f"TrackedRun(uri={uri!r}, experiment='vgg-new', run_name=sys.argv[1], tags={{}}, params={{}})")
    processes = [subprocess.Popen([sys.executable, "-c", script, f"run-{i}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]  # all ended before any assertion
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-2000:]
    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "vgg-new"]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["run-0", "run-1", "run-2"]


def test_flatten_gives_dotted_names():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": None}) == {"a.b": "1", "a.c.d": "x", "e": "None"}


def test_metric_names_keep_what_mlflow_allows():
    assert metric_name("val/top1_err") == "val/top1_err"
    assert metric_name("table4/D-jitter: Q 2.5") == "table4/D-jitter: Q 2.5"
    assert metric_name("dense+multicrop(1)") == "dense_multicrop_1_"


def test_relay_opens_the_run_and_logs_every_epoch_line_written_by_another_process(mlflow_server, tmp_path):
    path = tmp_path / "epochs.jsonl"

    def open_run() -> TrackedRun:
        return TrackedRun(uri=mlflow_server, experiment="vgg-test", run_name="relayed", tags={}, params={})

    relay = MetricsRelay(open_run, path).start()
    lines = [json.dumps({"step": epoch, "metrics": {"epoch": float(epoch), "val/top1_err": 90.0 - 10 * epoch}})
             for epoch in (1, 2, 3)]
    # A writer process as Ray Train's controller is: the first line alone, then the rest, the last in two halves.
    writer = ("import sys, time\n"
              "path, first, rest = sys.argv[1], sys.argv[2], sys.argv[3]\n"
              "open(path, 'a').write(first + '\\n'); time.sleep(1.2)\n"
              "with open(path, 'a') as f:\n"
              "    f.write(rest[:len(rest) // 2]); f.flush(); time.sleep(1.2); f.write(rest[len(rest) // 2:] + '\\n')\n")
    subprocess.run([sys.executable, "-c", writer, str(path), lines[0], "\n".join(lines[1:])], check=True)
    run = relay.stop()
    run.finish()
    history = MlflowClient(tracking_uri=mlflow_server).get_metric_history(run.run_id, "val/top1_err")
    assert [(m.step, m.value) for m in history] == [(1, 80.0), (2, 70.0), (3, 60.0)]


def test_a_relay_whose_run_cannot_open_says_so_at_once_and_at_the_end(tmp_path, capfd):
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens

    def open_run() -> TrackedRun:
        return TrackedRun(uri=uri, experiment="vgg-test", run_name="never", tags={}, params={})

    relay = MetricsRelay(open_run, tmp_path / "epochs.jsonl").start()
    deadline = time.monotonic() + 30
    while "warning:" not in (seen := capfd.readouterr().err) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "is not reachable" in seen and "training goes on untracked" in seen  # before the training ends
    with pytest.raises(TrackingError, match=rf"MLflow tracking server {uri} is not reachable"):
        relay.stop()
