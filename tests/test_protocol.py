"""The protocol as a pipeline, with the real tools: `dvc repro` of dvc.yaml in a temporary git repository on the tiny
profile (every stage, through Ray Train on the shared local cluster, tracked to a local MLflow store), its
incremental behaviour, and `ray job submit` of `vgg train` to the cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, ROOT, make_project

# Most of `make test`'s 13–14 minutes on 2 cores (Ray Train runs); `PYTEST_ARGS="-m 'not protocol'"` skips it.
pytestmark = [pytest.mark.protocol, pytest.mark.slow]

STAGES_UPSTREAM_OF_TRAINING = {"synth", "ingest"}


def _env(ray_cluster: dict, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_ADDRESS=ray_cluster["address"],
        RAY_USAGE_STATS_ENABLED="0", MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="68719476736",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid", **extra,
    )
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 2400) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_params, ray_cluster) -> Path:
    """A fresh git repository holding this project's tracked files, with the tiny profile active, after one
    complete `dvc repro`."""
    env = _env(ray_cluster)
    root = make_project(tmp_path_factory.mktemp("project"), tiny_params, env, max_epochs=1)
    result = _run([str(BIN / "dvc"), "repro"], root, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def test_every_stage_runs_and_writes_its_outputs(project):
    models = ["A-low", "A-LRN-low", "B-low", "C-low", "C-high", "C-jitter", "D-low", "D-high", "D-jitter",
              "E-low", "E-high", "E-jitter"]
    assert sorted(p.stem for p in (project / "runs/tiny").glob("*.pt")) == sorted(models)
    results = {p.name for p in (project / "results/tiny").glob("*.npz")}
    assert {f"{m}-dense-single.npz" for m in models} <= results
    assert {"D-jitter-multicrop-multi.npz", "E-jitter-both-multi.npz", "DE-jitter-both-multi.npz"} <= results
    report = (project / "reports/tiny/report.md").read_text()
    assert "Table 3" in report and "Table 6" in report and "29.6" in report  # the paper's A beside ours
    assert (project / "mlflow.db").is_file()


def test_a_second_repro_is_a_no_op(project, ray_cluster):
    result = _run([str(BIN / "dvc"), "repro"], project, _env(ray_cluster))
    assert result.returncode == 0
    assert "Data and pipelines are up to date" in result.stdout


def test_metrics_are_declared(project, ray_cluster):
    result = _run([str(BIN / "dvc"), "metrics", "show", "--json"], project, _env(ray_cluster))
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    table3 = next(iter(metrics.values()))["data"]["reports/tiny/metrics.json"]["data"]["table3"]
    assert 0.0 <= table3["A/low"]["top1_err"] <= 100.0


def _changed(project: Path, env: dict[str, str]) -> set[str]:
    """The protocol's changed stages (dvc.yaml: the tune pipeline, run on demand, is not part of `dvc repro`)."""
    result = _run([str(BIN / "dvc"), "status", "--json", "dvc.yaml"], project, env)
    assert result.returncode == 0, result.stderr
    return {stage.split("@")[0] for stage in json.loads(result.stdout)}


def test_a_training_param_or_library_edit_reruns_only_what_depends_on_it(project, ray_cluster):
    env = _env(ray_cluster)
    params_path = project / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["profiles"]["tiny"]["train"]["lr"] = 0.02
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = _changed(project, env)
        assert {"train-scratch", "train-deep", "train-high", "train-jitter"} <= changed
        assert not changed & STAGES_UPSTREAM_OF_TRAINING
    finally:
        params_path.write_text(original)

    report_code = project / "vgg/report.py"
    code = report_code.read_text()
    report_code.write_text(code + "\n# an edit\n")
    try:
        assert _changed(project, env) == {"report"}
    finally:
        report_code.write_text(code)


def test_the_paper_profile_without_imagenet_says_which_param_and_files(project, ray_cluster):
    result = _run([str(BIN / "vgg"), "synth", "data/paper/raw", "--profile", "paper"], project, _env(ray_cluster))
    assert result.returncode == 2
    assert "profiles.paper.data.raw" in result.stderr and "ILSVRC2012_img_train.tar" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_outside_the_project_is_one_line(tmp_path, ray_cluster):
    result = _run([str(BIN / "vgg"), "demo"], tmp_path, _env(ray_cluster))
    assert result.returncode == 2
    assert result.stderr.startswith("error: params file not found") and "Traceback" not in result.stderr


def test_ray_job_submit_runs_vgg_train_on_the_cluster(tmp_path, tiny_params, tiny_shards, ray_cluster):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    shutil.copy(tiny_params, job_dir / "params.yaml")
    out = tmp_path / "A-low.pt"
    env = _env(ray_cluster)
    submit = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", str(job_dir),
              "--", "vgg", "train", "--config", "A", "--scale", "low", "--shards", str(tiny_shards), "--out", str(out),
              "--storage", str(tmp_path / "ray_results"), "--no-track"]
    for _ in range(30):  # the head's job agent comes up some seconds after `ray start` returns
        result = _run(submit, job_dir, env, timeout=600)
        if "No available agent to submit job" not in result.stdout + result.stderr:
            break
        time.sleep(5)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    from vgg.models import checkpoint

    assert checkpoint.load(out, expect_config="A")["config"] == "A"


def _store(project: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    return client, client.get_experiment_by_name("vgg-tiny").experiment_id


def test_each_model_run_carries_its_evaluation_errors_and_the_runs_nest_under_one_protocol_run(project):
    """The runs table is Tables 3-5: every training run has its model's errors under the same metric names; the
    stage runs of one `dvc repro` share one parent; the best single model is the registered `champion`."""
    client, experiment = _store(project)
    runs = client.search_runs([experiment])
    metrics = json.loads((project / "reports/tiny/metrics.json").read_text())
    training = {f"{r.data.tags['config']}-{r.data.tags['scale_kind']}": r for r in runs
                if r.data.tags.get("stage", "").startswith("train-")}
    assert len(training) == 12
    for name, run in training.items():
        config, kind = name.rsplit("-", 1)
        assert run.data.metrics["eval/dense_single/top1_err"] == pytest.approx(
            metrics["table3"][f"{config}/{kind}"]["top1_err"])
        if config not in ("A", "A-LRN"):
            assert run.data.metrics["eval/dense_multi/top1_err"] == pytest.approx(
                metrics["table4"][f"{config}/{kind}"]["top1_err"])
    for config in ("D", "E"):
        jitter = training[f"{config}-jitter"].data.metrics
        assert jitter["eval/multicrop_multi/top1_err"] == pytest.approx(metrics["table5"][f"{config}/multicrop"]["top1_err"])
        assert jitter["eval/both_multi/top1_err"] == pytest.approx(metrics["table5"][f"{config}/dense+multicrop"]["top1_err"])
    fusion = [r for r in runs if r.data.tags.get("stage") == "fusion"]
    assert [r.info.run_name for r in fusion] == ["fusion-D+E-40-72"]
    assert fusion[0].data.metrics["eval/both_multi/top1_err"] == pytest.approx(
        metrics["table6"]["D+E/dense+multicrop"]["top1_err"])
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs if r.data.tags.get("stage") != "protocol"}
    assert len(parents) == 1 and client.get_run(parents.pop()).data.tags["stage"] == "protocol"
    best = min((r for r in training.values() if "eval/dense_multi/top1_err" in r.data.metrics),
               key=lambda r: r.data.metrics["eval/dense_multi/top1_err"])
    champion = client.get_model_version_by_alias(f"vgg-{best.data.tags['config']}", "champion")
    assert champion.run_id == best.info.run_id


def test_dvc_plots_show_draws_every_training_curve(project, ray_cluster):
    result = _run([str(BIN / "dvc"), "plots", "show", "--json"], project, _env(ray_cluster))
    assert result.returncode == 0, result.stderr
    curves = {name for name in json.loads(result.stdout)["data"] if name.endswith(".epochs.csv")}
    assert len(curves) == 12, curves


def test_two_dvc_experiments_compare_in_dvc_exp_show(project, ray_cluster):
    """Two `dvc exp run -S ...` (an evaluation param: only evaluation and the report rerun) and `dvc exp show`
    lists both with their metrics; MLflow groups each under a protocol run of its own."""
    env = _env(ray_cluster)
    for batch in (16, 32):
        result = _run([str(BIN / "dvc"), "exp", "run", "-S", f"profiles.tiny.eval.batch_size={batch}"], project, env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "train-" not in "".join(line for line in result.stdout.splitlines() if line.startswith("Running"))
    shown = _run([str(BIN / "dvc"), "exp", "show", "--json"], project, env)
    assert shown.returncode == 0, shown.stderr
    experiments = [exp for baseline in json.loads(shown.stdout) for exp in (baseline.get("experiments") or [])]
    batches = set()
    for experiment in experiments:
        for revision in experiment.get("revs", []):
            data = revision.get("data") or {}
            params = data.get("params", {}).get("params.yaml", {}).get("data", {})
            metrics = data.get("metrics", {}).get("reports/tiny/metrics.json", {}).get("data", {})
            if metrics.get("table3"):
                batches.add(params["profiles"]["tiny"]["eval"]["batch_size"])
    assert batches >= {16, 32}
    client, experiment_id = _store(project)
    # The runs a DVC experiment logs (its report; its evaluations land on the models' own runs) nest under a
    # protocol run named for the experiment (a stage whose inputs did not change does not run, nor log).
    names = {r.info.run_name for r in client.search_runs([experiment_id]) if r.data.tags.get("stage") == "protocol"}
    assert "protocol-tiny" in names and any(name.startswith("protocol-tiny-") for name in names), names


def test_the_mlflow_ui_serves_the_runs_table_a_comparison_and_the_champion(project):
    """What docs/screenshots.py photographs, checked through MLflow's REST API on a real `mlflow ui` of the store."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("screenshots", ROOT / "docs" / "screenshots.py")
    screenshots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshots)
    with screenshots.mlflow_ui(project / "mlflow.db") as url:
        pages = screenshots.pages(url)
        experiment = screenshots._get(url, "experiments/get-by-name", {"experiment_name": "vgg-tiny"})["experiment"]
        tags = {tag["key"]: tag["value"] for tag in experiment.get("tags", [])}
        evaluated = screenshots._post(url, "runs/search", {
            "experiment_ids": [experiment["experiment_id"]],
            "filter": "metrics.`eval/dense_single/top1_err` >= 0", "max_results": 100})["runs"]
        champion = screenshots._get(url, "registered-models/alias", {"name": pages["model"].rsplit("/", 1)[1],
                                                                    "alias": "champion"})["model_version"]
        # the runs page opens on the saved view "Tables 3-5": the runs the last report evaluated, errors as columns
        view = json.loads(json.loads(tags["mlflow.sharedViewState.tables-3-5"])["state"])
        shown = screenshots._post(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                       "filter": view["searchFilter"], "max_results": 100})["runs"]
    assert pages["runs"].endswith(f"#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning"
                                  "&viewStateShareKey=tables-3-5")
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    trained = {run["info"]["run_id"] for run in evaluated if run["info"]["run_name"].startswith("train-")}
    assert len(trained) == 12
    assert {run["info"]["run_id"] for run in shown if run["info"]["run_name"].startswith("train-")} == trained
    assert any(run["info"]["run_name"].startswith("fusion-") for run in shown)
    assert {f"metrics.`eval/{mode}/top1_err`" for mode in ("dense_single", "dense_multi", "multicrop_multi",
                                                           "both_multi")} <= set(view["selectedColumns"])
    assert "compare-runs?runs=" in pages["compare"] and champion["run_id"]
