"""`vgg tune` against a real two-node local Ray cluster and a real MLflow server (conftest), on the tiny profile."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipelines.params import load_profile
from pipelines.ray_tune import (INTERVAL_FILE, TrialResult, _best, check_space, format_table, make_searcher,
                                parse_fractions, parse_sizes, plan_trials, ranked, trial_profile, tune)
from vgg.config import Profile, from_mapping
from vgg.errors import ConfigError

# The tiny profile: crop 32, data.max_side 72, scales.jitter [40, 72], q_offset 8.
SPACE = {"lr_range": (1e-3, 1e-1), "s_min_range": (40, 48), "s_max_range": (56, 64), "trials": 2}
# Label smoothing searched in the end-to-end run: with the profile's seed 0 the two trials draw 0.05 and 0 (the
# profile's own value), so both a changed and an unchanged ε go through a trial.
SMOOTHING = (0.0, 0.05, 0.1, 0.2)
TUNE_TIMEOUT_S = 900  # two tiny trials: ~2.5 min at load 10, 7 min at load 20 on the 2 shared cores
# `vgg tune` as the command line runs it: a fresh process whose environment names the cluster and the MLflow server.
DRIVER = """
import dataclasses, json, sys
from pathlib import Path
from pipelines.params import load_profile
from pipelines.ray_tune import tune
a = json.loads(sys.argv[1])
rows = tune(load_profile(Path(a["params"])), config="A", scale_key="jitter", shards=Path(a["shards"]),
            lr_range=tuple(a["lr_range"]), s_min_range=a["s_min_range"], s_max_range=a["s_max_range"],
            trials=a["trials"], max_epochs=2, time_budget_s=3600, storage=Path("ray"), out=Path(a["out"]), track=True,
            label_smoothing=a["label_smoothing"])
Path("rows.json").write_text(json.dumps([dataclasses.asdict(row) for row in rows]))
"""


@pytest.fixture(scope="module")
def profile(tiny_params) -> Profile:
    return load_profile(tiny_params)


def _tune(profile: Profile, shards: Path, tmp_path: Path, **changes) -> tuple:
    space = {**SPACE, **changes}
    return tune(profile, config="A", scale_key="jitter", shards=shards, max_epochs=2, time_budget_s=600,
                storage=tmp_path / "ray", out=tmp_path / "best.yaml", track=False, **space)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lr_range": (1e-1, 1e-3)}, r"^--lr-range: the low end 0\.1 must be below the high end 0\.001;"),
        ({"lr_range": (1e-2, 1e-2)}, r"^--lr-range: the low end 0\.01 must be below"),
        ({"lr_range": (0.0, 1e-1)}, r"^--lr-range: learning rates must be > 0"),
        ({"lr_range": (-1e-2, 1e-1)}, r"^--lr-range: learning rates must be > 0"),
        ({"lr_range": (1.0, 100.0)}, r"^--lr-range: lr: must be <= 10 \(an SGD lr above 10 only diverges\), got 100"),
        ({"s_min_range": (64, 72), "s_max_range": (48, 56)},
         r"^--s-min/--s-max: every Smin \(64\.\.72\) is above every Smax \(48\.\.56\)"),
        ({"s_min_range": (24, 40)}, r"^--s-min: S=24 px is outside \[32, 72\]"),
        ({"s_max_range": (64, 80)}, r"^--s-max: S=80 px is outside \[32, 72\]"),
        ({"s_min_range": ()}, r"^--s-min: no sizes given"),
        # Fixed S=72 needs Q up to 72+8 px > data.max_side: the only candidate is rejected by the profile itself
        ({"s_min_range": (72,), "s_max_range": (72,)}, r"^--s-min/--s-max: no candidate S range gives a valid"),
        ({"trials": 0}, r"^--trials: must be >= 1, got 0"),
        ({"label_smoothing": (0.0, 1.0)}, r"^--label-smoothing: every value must be in \[0, 1\), got 1;"),
        ({"label_smoothing": (-0.1,)}, r"^--label-smoothing: every value must be in \[0, 1\), got -0\.1;"),
        ({"label_smoothing": (math.nan,)}, r"^--label-smoothing: every value must be in \[0, 1\), got nan;"),
        ({"label_smoothing": ()}, r"^--label-smoothing: no values given"),
    ],
)
def test_an_invalid_search_space_is_one_line_before_ray_starts(profile, tiny_shards, tmp_path, changes, message):
    ray.shutdown()  # so the check below sees this call alone
    with pytest.raises(ConfigError, match=message) as error:
        _tune(profile, tiny_shards, tmp_path, **changes)
    assert "\n" not in str(error.value)
    assert not ray.is_initialized()
    assert not (tmp_path / "ray").exists() and not (tmp_path / "best.yaml").exists()


def test_the_plan_is_seeded_and_inside_the_space(profile):
    space = check_space(profile, scale_key="jitter", lr_range=(1e-4, 1e-1), s_min_range=range(32, 73, 8),
                        s_max_range=range(32, 73, 8), trials=20, max_epochs=2, time_budget_s=60)
    # Fixed S needs S-8 >= 32 and S+8 <= 72 (multi-scale Q, §3.2); a jittered pair needs only 32 <= Smin < Smax <= 72
    assert (32, 32) not in space.scales and (72, 72) not in space.scales and (40, 40) in space.scales
    assert all(low <= high for low, high in space.scales)
    plan = plan_trials(space, trials=20, seed=0)
    assert plan == plan_trials(space, trials=20, seed=0)
    assert plan != plan_trials(space, trials=20, seed=1)
    assert all(1e-4 <= trial["lr"] < 1e-1 and (trial["s_min"], trial["s_max"]) in space.scales for trial in plan)
    assert min(t["lr"] for t in plan) < 1e-3 and max(t["lr"] for t in plan) > 1e-2  # log-uniform: every decade


def test_label_smoothing_is_searched_only_when_asked(profile):
    options = dict(scale_key="jitter", lr_range=(1e-4, 1e-1), s_min_range=(40, 48), s_max_range=(56, 64), trials=20,
                   max_epochs=2, time_budget_s=60)
    default = check_space(profile, **options)
    assert default.label_smoothing == (profile.train.label_smoothing,) == (0.0,)
    plan = plan_trials(default, trials=20, seed=0)
    assert {trial["label_smoothing"] for trial in plan} == {0.0}
    # One candidate is not drawn: the lr and S values are those of the default plan, only ε differs.
    fixed = plan_trials(check_space(profile, label_smoothing=(0.1,), **options), trials=20, seed=0)
    assert [{**trial, "label_smoothing": 0.0} for trial in fixed] == plan
    assert {trial["label_smoothing"] for trial in fixed} == {0.1}
    searched = check_space(profile, label_smoothing=(0.1, 0.0, 0.1), **options)
    assert searched.label_smoothing == (0.0, 0.1)  # sorted, without repeats
    drawn = plan_trials(searched, trials=20, seed=0)
    assert drawn == plan_trials(searched, trials=20, seed=0)
    assert {trial["label_smoothing"] for trial in drawn} == {0.0, 0.1}
    assert all(0.0 <= trial["lr"] < 1e-1 for trial in drawn)
    trial = next(trial for trial in drawn if trial["label_smoothing"] == 0.1)
    changed = trial_profile(profile, scale_key="jitter", lr=trial["lr"], s_min=trial["s_min"], s_max=trial["s_max"],
                            max_epochs=2, label_smoothing=trial["label_smoothing"])
    assert (changed.train.label_smoothing, changed.train.lr) == (0.1, trial["lr"])
    assert trial_profile(profile, scale_key="jitter", lr=0.01, s_min=40, s_max=64,
                         max_epochs=2).train.label_smoothing == profile.train.label_smoothing
    assert parse_fractions("0, 0.1,0.05,0.1", option="--label-smoothing") == (0.0, 0.05, 0.1)
    with pytest.raises(ConfigError, match=r"^--label-smoothing: cannot read 'x'; give numbers in \[0, 1\)"):
        parse_fractions("0,x", option="--label-smoothing")

def test_a_trial_that_diverged_is_never_the_best_even_after_good_epochs():
    good = TrialResult(trial="a", lr=0.01, s_min=40, s_max=64, epochs=2, top1_err=50.0, top5_err=10.0, best_epoch=2,
                       outcome="completed")
    diverged_late = dataclasses.replace(good, trial="b", lr=0.1, top1_err=40.0, outcome="diverged")
    no_epoch = dataclasses.replace(good, trial="c", epochs=0, top1_err=math.nan, top5_err=math.nan, best_epoch=0,
                                   outcome="stopped")
    rows = ranked([no_epoch, diverged_late, good])
    assert rows[0] == good and _best(rows, grid=[]) == good
    assert ranked([good, no_epoch, dataclasses.replace(no_epoch, trial="d"), diverged_late])[1:] == (
        diverged_late, no_epoch, dataclasses.replace(no_epoch, trial="d"))  # unusable, by error, then as given
    with pytest.raises(ConfigError, match=r"^--lr-range, --time-budget: 1 of 2 trials diverged \(the lowest at lr "
                                          r"0\.1\) and the others finished no epoch in time; lower the range or "
                                          r"raise the budget$"):
        _best(ranked([no_epoch, diverged_late]), grid=[])
    with pytest.raises(ConfigError, match=r"^--lr-range: every trial diverged, the lowest at lr 0\.1; lower"):
        _best(ranked([diverged_late]), grid=[])


def test_size_lists_read_from_the_command_line():
    assert parse_sizes("40,48", option="--s-min") == (40, 48)
    assert parse_sizes("40:72:16, 44", option="--s-min") == (40, 44, 56, 72)
    assert parse_sizes("40:42", option="--s-min") == (40, 41, 42)
    for bad in ("40-72", "72:40", "40:72:0", "x"):
        with pytest.raises(ConfigError, match=rf"^--s-max: cannot read {bad!r}"):
            parse_sizes(bad, option="--s-max")


def test_trials_run_on_the_cluster_and_the_best_config_merges_into_the_profile(
    profile, tiny_params, tiny_shards, ray_cluster, mlflow_server, tmp_path
):
    out = tmp_path / "best.yaml"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"],
           "MLFLOW_TRACKING_URI": mlflow_server, "RAY_USAGE_STATS_ENABLED": "0"}
    arguments = {"params": str(tiny_params), "shards": str(tiny_shards), "out": str(out), **SPACE,
                 "label_smoothing": SMOOTHING}
    driver = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(arguments)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=TUNE_TIMEOUT_S)
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
    rows = [TrialResult(**row) for row in json.loads((tmp_path / "rows.json").read_text())]
    assert format_table(rows, label_smoothing=True) in driver.stdout  # the table is printed, best first, with ε

    space = check_space(profile, scale_key="jitter", max_epochs=2, time_budget_s=900, label_smoothing=SMOOTHING,
                        **SPACE)
    plan = plan_trials(space, trials=2, seed=profile.train.seed)
    planned = sorted((trial["lr"], trial["s_min"], trial["s_max"], trial["label_smoothing"]) for trial in plan)
    assert sorted((row.lr, row.s_min, row.s_max, row.label_smoothing) for row in rows) == planned
    assert {row.label_smoothing for row in rows} == {0.0, 0.05}
    for row in rows:  # the value each trial trained with: its checkpoint's profile
        paths = list((tmp_path / "ray" / f"train-{row.trial}").glob("**/checkpoint.pt"))
        assert paths and all(torch.load(path, weights_only=True, mmap=True)["profile"]["train"]["label_smoothing"]
                             == row.label_smoothing for path in paths)
    assert [row.top1_err for row in rows] == sorted(row.top1_err for row in rows)
    # Two trial slots (the cluster holds four trials of one worker): the trials ran at the same time, as they
    # recorded it themselves: each started (INTERVAL_FILE) before the other reported its first epoch (the result's
    # `timestamp`, whole seconds, set in the trial's process).
    started, first_report = {}, {}
    for record in (tmp_path / "ray").glob(f"tune-*/*/{INTERVAL_FILE}"):
        interval = json.loads(record.read_text())
        started[interval["trial"]] = interval["start"]
        results = [json.loads(line) for line in (record.parent / "result.json").read_text().splitlines()]
        first_report[interval["trial"]] = min(result["timestamp"] for result in results if "epoch" in result)
    assert sorted(started) == sorted(row.trial for row in rows)
    assert max(started.values()) < min(first_report.values()), (started, first_report)
    # At max_epochs `fit` ends a trial itself; a trial with one epoch was stopped there by ASHA
    assert all(row.outcome == ("completed" if row.epochs == 2 else "stopped") and row.epochs >= 1 for row in rows)
    assert all(0.0 <= row.top5_err <= row.top1_err <= 100.0 for row in rows)
    best = rows[0]

    # The overlay: a comment header with the metric, then the profile's keys; merged, it validates.
    text = out.read_text()
    assert text.startswith("# vgg tune: best of 2 trials") and f"val/top1_err {best.top1_err:.2f} %" in text
    overlay = yaml.safe_load(text)
    tuned = overlay["profiles"]["tiny"]
    assert tuned == {"train": {"lr": best.lr, "label_smoothing": best.label_smoothing},
                     "scales": {"jitter": {"s_min": best.s_min, "s_max": best.s_max}}}
    merged = load_profile(tiny_params, overrides=[f"train.lr={tuned['train']['lr']!r}",
                                                  f"train.label_smoothing={tuned['train']['label_smoothing']!r}",
                                                  f"scales.jitter={tuned['scales']['jitter']}"])
    assert (merged.train.lr, merged.train.label_smoothing, merged.scales.jitter.s_min, merged.scales.jitter.s_max) == (
        best.lr, best.label_smoothing, best.s_min, best.s_max)
    deep = profile.to_dict()
    deep["train"].update(tuned["train"])
    deep["scales"]["jitter"].update(tuned["scales"]["jitter"])
    assert from_mapping(Profile, deep) == merged

    # MLflow: the parent run and one child per trial, with the trial's values, per-epoch metrics and status.
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("vgg-tiny")
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'tune'")
    assert parent.info.run_name == "tune-A" and parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial"] == best.trial
    assert (parent.data.tags["trial_slots"], parent.data.tags["regime"], parent.data.tags["searcher"]) == (
        "2", "scratch", "random")
    assert json.loads(parent.data.params["tune.label_smoothing"]) == list(SMOOTHING)
    assert float(parent.data.params["train.label_smoothing"]) == profile.train.label_smoothing
    assert math.isclose(parent.data.metrics["best/val/top1_err"], best.top1_err)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"best.yaml", "tune_results.json"}
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {child.data.tags["trial_id"]: child for child in children}
    assert set(by_trial) == {row.trial for row in rows}
    for row in rows:
        child = by_trial[row.trial]
        assert child.info.status == "FINISHED" and child.data.tags["outcome"] == row.outcome
        assert (float(child.data.tags["lr"]), int(child.data.tags["s_min"]), int(child.data.tags["s_max"])) == (
            pytest.approx(row.lr, rel=1e-5), row.s_min, row.s_max)
        assert float(child.data.params["train.label_smoothing"]) == row.label_smoothing
        history = client.get_metric_history(child.info.run_id, "val/top1_err")
        assert sorted(m.step for m in history) == list(range(1, row.epochs + 1))
        assert min(m.value for m in history) == pytest.approx(row.top1_err)


def test_a_diverging_trial_is_a_finding_of_the_search_not_an_error(
    profile, tiny_params, tiny_shards, ray_cluster, mlflow_server, tmp_path
):
    """Every trial at lr >= 5 diverges in its first epoch: `vgg tune` says so in the table, in MLflow and in its
    one error line (no overlay is written), without a trial error's traceback."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"],
           "MLFLOW_TRACKING_URI": mlflow_server, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [str(Path(sys.executable).parent / "vgg"), "tune", "--params", str(tiny_params), "--config", "A",
               "--shards", str(tiny_shards), "--lr-range", "5", "10", "--s-min", "40", "--s-max", "64",
               "--trials", "1", "--max-epochs", "1", "--storage", "ray", "--out", "best.yaml"]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TUNE_TIMEOUT_S)
    space = check_space(profile, scale_key="jitter", lr_range=(5, 10), s_min_range=(40,), s_max_range=(64,),
                        trials=1, max_epochs=1, time_budget_s=900)
    (planned,) = plan_trials(space, trials=1, seed=profile.train.seed)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: --lr-range: every trial diverged, the lowest at lr {planned['lr']:.4g}; lower the range")
    assert "Traceback" not in run.stderr
    (row,) = [line for line in run.stdout.splitlines() if line.endswith("  diverged")]
    assert row.split()[1] == f"{planned['lr']:.4g}"
    assert not (tmp_path / "best.yaml").exists()

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("vgg-tiny")
    (child,) = client.search_runs([experiment.experiment_id],
                                  filter_string="tags.stage = 'tune-trial' and tags.outcome = 'diverged'")
    assert child.info.status == "FAILED"
    assert child.data.tags["diverged"].startswith("training diverged in epoch 1 by optimizer step 8 (lr ")
    assert float(child.data.tags["lr"]) == pytest.approx(planned["lr"], rel=1e-5)
    assert client.get_run(child.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


def test_the_ledger_tells_completed_from_stopped_and_diverged_trials(profile, tiny_shards, tmp_path):
    """The callback's reading of what Tune (2.60, tune_controller.py) hands it, one trial per way to end: the
    function returns (Tune then marks its last result `done`, without a callback); ASHA stops it at a result (marked
    `done` before callbacks see it); the time budget stops it (no result marked); it diverges (its last result)."""
    from types import SimpleNamespace

    from pipelines.ray_train import TrainJob
    from pipelines.ray_tune import DIVERGED, METRIC, TrialLedger

    base = TrainJob(profile=profile, config="A", scale="jitter", init=None, shards=tiny_shards, out=tmp_path / "m.pt",
                    storage=tmp_path / "ray", max_failures=0)
    ledger = TrialLedger(parent=None, base=base)
    epoch = {"epoch": 1.0, METRIC: 50.0, "done": False}
    endings = {"returned": [epoch, {**epoch, "epoch": 2.0}], "asha": [{**epoch, "done": True}], "budget": [epoch],
               "diverged": [epoch, {METRIC: math.nan, DIVERGED: "training diverged in epoch 2", "done": False}]}
    for name, results in endings.items():
        trial = SimpleNamespace(trial_id=name, config={"lr": 0.01, "s_min": 40, "s_max": 64}, last_result={})
        ledger.on_trial_start(0, [], trial)
        for result in results:
            ledger.on_trial_result(0, [], trial, dict(result))
            trial.last_result = dict(result)
        if name in ("returned", "diverged"):
            trial.last_result["done"] = True
        ledger.on_trial_complete(0, [], trial)
    assert ledger.outcomes == {"returned": "completed", "asha": "stopped", "budget": "stopped", "diverged": "diverged"}


def _suggestions(searcher, results: dict[int, float], count: int) -> list[dict]:
    """Ask `searcher` for `count` configurations one after another, completing trial i with `results[i]` (% top-1
    error) as soon as it is suggested, as Tune does with one trial slot."""
    suggested = []
    for index in range(count):
        config = searcher.suggest(f"t{index}")
        suggested.append(config)
        searcher.on_trial_complete(f"t{index}", result={"val/top1_err": results.get(index, 50.0), "epoch": 1})
    return suggested


def test_tpe_suggestions_are_seeded_and_learn_from_earlier_results(profile, tmp_path):
    """Optuna's TPE through Ray Tune: the same seed and results give the same search; the same seed with other
    results for the start-up trials gives other later suggestions."""
    space = check_space(profile, scale_key="jitter", lr_range=(1e-4, 1e-1), s_min_range=(40, 48),
                        s_max_range=(56, 64, 72), trials=9, max_epochs=2, time_budget_s=60)

    def search(results: dict[int, float], seed: int = 0, kind: str = "tpe") -> list[dict]:
        return _suggestions(make_searcher(space, searcher=kind, trials=9, seed=seed), results, count=6)

    low_lr_good = {0: 30.0, 1: 70.0, 2: 35.0}  # the start-up draws (9 // 3 = 3) ranked one way ...
    low_lr_bad = {0: 70.0, 1: 30.0, 2: 65.0}  # ... and the other
    first = search(low_lr_good)
    assert first == search(low_lr_good)  # reproducible
    searcher = make_searcher(space, searcher="tpe", trials=9, seed=0)
    _suggestions(searcher, low_lr_good, count=2)
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune saves its searcher with the experiment's state
    other = search(low_lr_bad)
    assert first[:3] == other[:3]  # the start-up draws depend on the seed only
    assert first[3:] != other[3:]  # the model's suggestions depend on the results
    assert search(low_lr_good, seed=1)[:3] != first[:3]
    for config in first + other:  # every suggestion is a complete, valid trial configuration
        assert 1e-4 <= config["lr"] <= 1e-1 and (config["s_min"], config["s_max"]) in space.scales
        assert config["label_smoothing"] == profile.train.label_smoothing
    # TPE's first model-based suggestion lies nearer (in log lr) the start-up trial that won than the one that lost
    for configs, (winner, loser) in ((first, (0, 1)), (other, (1, 0))):
        distance = [abs(math.log(configs[3]["lr"] / configs[index]["lr"])) for index in (winner, loser)]
        assert distance[0] < distance[1], [config["lr"] for config in configs]


def test_overlays_set_only_their_profile_keys(tiny_params, tmp_path):
    from pipelines.params import overlay_overrides

    overlay = tmp_path / "A-low.yaml"
    overlay.write_text("profiles:\n  tiny: {train: {lr: 0.0123}, scales: {jitter: {s_min: 48}}}\n"
                       "  paper: {train: {lr: 0.5}}\n")
    assert overlay_overrides(overlay, "tiny") == ["train.lr=0.0123", "scales.jitter.s_min=48"]
    assert overlay_overrides(overlay, "small") == []
    tuned = load_profile(tiny_params, overlays=[overlay])
    assert (tuned.train.lr, tuned.scales.jitter.s_min, tuned.scales.jitter.s_max) == (
        0.0123, 48, load_profile(tiny_params).scales.jitter.s_max)
    assert load_profile(tiny_params, overlays=[overlay], overrides=["train.lr=0.02"]).train.lr == 0.02  # --set wins
    for text, message in (("[1, 2]\n", "expected a top-level 'profiles:' mapping"),
                          ("profiles:\n  tiny: {train: {nope: 1}}\n", r"profiles\.tiny\.train\.nope: unknown key")):
        overlay.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_profile(tiny_params, overlays=[overlay])
    with pytest.raises(ConfigError, match=r"^--overlay: file not found: "):
        load_profile(tiny_params, overlays=[tmp_path / "missing.yaml"])


def _dvc_env(ray_cluster: dict) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               RAY_ADDRESS=ray_cluster["address"], RAY_USAGE_STATS_ENABLED="0",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid")
    return env


@pytest.mark.slow
def test_tuning_is_a_dvc_step_whose_values_reach_the_training_stage(tiny_params, ray_cluster, tmp_path):
    """The tune pipeline (tune/dvc.yaml) in a temporary repository on the tiny profile: the protocol's `dvc repro`
    does not run it; `dvc repro tune/dvc.yaml:scratch@A` does (three TPE trials, one at a time), writes the tuned
    params file and records the search; ASHA stopped at epoch 1 each trial whose epoch-1 error was behind the best
    quarter of those before it, and only those; A's training stage then reads the tuned lr (its params in
    dvc.lock, its checkpoint's profile). A search of the jittered stage from that A fine-tunes it
    (train.fine_tune_lr) from its weights."""
    from tests.conftest import make_project

    env = _dvc_env(ray_cluster)
    root = make_project(tmp_path / "project", tiny_params, env, max_epochs=1)
    dvc = [str(Path(sys.executable).parent / "dvc")]
    settings = yaml.safe_load((root / "tune/params.yaml").read_text())
    settings.update(trials=3, trial_slots=1, max_epochs=2, time_budget=1200, searcher="tpe")
    (root / "tune/params.yaml").write_text(yaml.safe_dump(settings))
    tuned_file = root / "tune/A-low.yaml"
    tuned_file.write_text("profiles:\n  paper: {train: {lr: 0.02}}\n")  # another profile's tuned values stay
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "tune settings"]):
        subprocess.run(command, cwd=root, env=env, check=True)

    # On demand only: the protocol's pipeline (what `dvc repro` runs) holds no tune stage, the tune pipeline does
    stages = subprocess.run(dvc + ["stage", "list", "--name-only"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert "train-scratch@A" in stages.stdout.split() and "scratch@A" not in stages.stdout.split(), stages.stderr
    stages = subprocess.run(dvc + ["stage", "list", "--name-only", "tune/dvc.yaml"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert "tune/dvc.yaml:scratch@A" in stages.stdout.split(), stages.stdout

    run = subprocess.run(dvc + ["repro", "tune/dvc.yaml:scratch@A"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=TUNE_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    search = json.loads((root / "tune/A-low.search.json").read_text())
    assert (search["searcher"], search["regime"], search["lr_key"], len(search["rows"])) == (
        "tpe", "scratch", "train.lr", 3)
    tuned = yaml.safe_load(tuned_file.read_text())["profiles"]
    assert tuned["paper"] == {"train": {"lr": 0.02}}
    assert tuned["tiny"]["train"] == {"lr": search["best"]["lr"]}
    lock = yaml.safe_load((root / "tune/dvc.lock").read_text())["stages"]["scratch@A"]
    assert lock["params"]["tune/params.yaml"]["trials"] == 3 and "tune/A-low.search.json" in str(lock["outs"])
    # MLflow (the project's local store): the search's parent run, named in the search record, with its children
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    parent = client.get_run(search["mlflow_run_id"])
    assert parent.data.tags["stage"] == "tune" and parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    assert len(children) == 3
    # ASHA (one rung at epoch 1, reduction factor 4): a trial goes on unless its epoch-1 error is above the 25th
    # percentile of the epoch-1 errors of the trials before it (in start order: one slot)
    earlier: list[float] = []
    stopped = 0
    for child in children:
        (first,) = [m.value for m in client.get_metric_history(child.info.run_id, "val/top1_err") if m.step == 1]
        epochs = len(client.get_metric_history(child.info.run_id, "val/top1_err"))
        behind = bool(earlier) and first > float(np.percentile(earlier, 25))
        assert (child.data.tags["outcome"], epochs) == (("stopped", 1) if behind else ("completed", 2)), (
            first, earlier)
        stopped += behind
        earlier.append(first)
    assert stopped >= 1  # the seeded trials on the tiny data: at least one falls behind
    # One slot: each trial started after the one before it had ended (its own records: its start, its end or, when
    # ASHA ended it from outside, its last result's whole-second timestamp)
    spans = []
    for record in (root / "ray_results").glob(f"tune-*/*/{INTERVAL_FILE}"):
        interval = json.loads(record.read_text())
        results = [json.loads(line) for line in (record.parent / "result.json").read_text().splitlines()]
        spans.append((interval["start"], interval.get("end", max(result["timestamp"] for result in results))))
    spans.sort()
    assert len(spans) == 3 and all(later[0] >= earlier[1] - 1 for earlier, later in zip(spans, spans[1:])), spans

    status = subprocess.run(dvc + ["status", "--json"], cwd=root, env=env, capture_output=True, text=True)
    assert "train-scratch@A" in json.loads(status.stdout)  # its tuned params changed
    train = subprocess.run(dvc + ["repro", "train-scratch@A"], cwd=root, env=env, capture_output=True, text=True,
                           timeout=TUNE_TIMEOUT_S)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train-scratch@A"]
    assert lock["params"]["tune/A-low.yaml"]["profiles"]["tiny"]["train"]["lr"] == search["best"]["lr"]
    model = root / "runs/tiny/A-low.pt"
    assert torch.load(model, weights_only=True, mmap=True)["profile"]["train"]["lr"] == search["best"]["lr"]
    # New search settings change the tune stage only: training does not wait on a search
    settings["trials"] = 4
    (root / "tune/params.yaml").write_text(yaml.safe_dump(settings))
    again = subprocess.run(dvc + ["repro", "train-scratch@A"], cwd=root, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout[-2000:]
    status = subprocess.run(dvc + ["status", "--json", "tune/dvc.yaml"], cwd=root, env=env, capture_output=True,
                            text=True)
    assert any("scratch@A" in stage for stage in json.loads(status.stdout)), status.stdout

    # The jittered stage's regime: fine-tuning A from that model searches train.fine_tune_lr and starts from its
    # weights (at an lr of 1e-8 one epoch leaves them as they were; a fresh start would not).
    out = tmp_path / "A-jitter.yaml"
    command = [str(Path(sys.executable).parent / "vgg"), "tune", "--config", "A", "--scale", "jitter", "--init",
               str(model), "--lr-range", "1e-8", "2e-8", "--s-min", "40", "--s-max", "64", "--trials", "1",
               "--max-epochs", "1", "--no-track", "--storage", str(tmp_path / "ray"), "--out", str(out),
               "--shards", "data/tiny/shards", "--results", str(tmp_path / "search.json")]
    tune_run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=TUNE_TIMEOUT_S)
    assert tune_run.returncode == 0, tune_run.stdout[-3000:] + tune_run.stderr[-3000:]
    search = json.loads((tmp_path / "search.json").read_text())
    assert (search["regime"], search["lr_key"]) == ("fine-tune", "train.fine_tune_lr")
    assert yaml.safe_load(out.read_text())["profiles"]["tiny"]["train"] == {"fine_tune_lr": search["best"]["lr"]}
    (trial_checkpoint,) = (tmp_path / "ray").glob(f"train-{search['best']['trial']}/**/checkpoint.pt")
    trial = torch.load(trial_checkpoint, weights_only=True, mmap=True)
    start = torch.load(model, weights_only=True, mmap=True)
    assert trial["profile"]["train"]["fine_tune_lr"] == search["best"]["lr"]
    assert trial["profile"]["train"]["lr"] == load_profile(root / "params.yaml").train.lr  # not searched
    for name, weights in start["model"].items():
        assert torch.allclose(trial["model"][name].float(), weights.float(), atol=1e-4), name


def test_the_library_and_the_random_searcher_need_no_optuna(profile):
    """Optuna is imported by `--searcher tpe` only: every vgg/ module, and `vgg tune`'s module with its random and
    grid plans, import and run where it is missing."""
    code = """
import importlib, pkgutil, sys
sys.modules["optuna"] = None  # `import optuna` now fails, as where it is not installed
import vgg
for module in pkgutil.walk_packages(vgg.__path__, "vgg."):
    importlib.import_module(module.name)
from pipelines.params import load_profile
from pipelines.ray_tune import check_space, make_searcher
from pathlib import Path
profile = load_profile(Path(sys.argv[1]))
space = check_space(profile, scale_key="low", lr_range=(1e-3, 1e-1), s_min_range=(40,), s_max_range=(40,), trials=3,
                    max_epochs=1, time_budget_s=60)
for kind in ("random", "grid"):
    make_searcher(space, searcher=kind, trials=3, seed=0)
try:
    make_searcher(space, searcher="tpe", trials=3, seed=0)
except ImportError:
    print("tpe needs optuna")
"""
    run = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parents[1] / "params.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "tpe needs optuna"


def test_the_grid_spans_the_lr_range_evenly_in_log_lr(profile):
    from pipelines.ray_tune import grid_plan

    space = check_space(profile, scale_key="low", lr_range=(1e-4, 1e-1), s_min_range=(40,), s_max_range=(40,),
                        trials=4, max_epochs=1, time_budget_s=60)
    assert [trial["lr"] for trial in grid_plan(space, trials=4)] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])
    assert {(t["s_min"], t["s_max"], t["label_smoothing"]) for t in grid_plan(space, trials=4)} == {(40, 40, 0.0)}
    wide = check_space(profile, scale_key="jitter", lr_range=(1e-4, 1e-1), s_min_range=(40, 48), s_max_range=(64,),
                       trials=4, max_epochs=1, time_budget_s=60)
    with pytest.raises(ConfigError, match=r"^--searcher grid: spans the lr only; give one Smin, one Smax"):
        grid_plan(wide, trials=4)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--searcher", "bayes"], r"^error: --searcher: unknown searcher 'bayes'; choose one of random, tpe, grid$"),
        (["--trial-slots", "9"], r"^error: --trial-slots: 9 trials at once need 9x the resources of one trial but "
                                 r"the Ray cluster holds 4; lower it, or pass 0 for as many as it holds$"),
        (["--searcher", "grid", "--s-min", "40,48"], r"^error: --searcher grid: spans the lr only"),
        (["--out", "notes.yaml"], r"^error: --out notes\.yaml: exists but is not a params overlay"),
    ],
)
def test_bad_search_options_are_one_line(tiny_params, tiny_shards, ray_cluster, tmp_path, options, message):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"], "RAY_USAGE_STATS_ENABLED": "0"}
    (tmp_path / "notes.yaml").write_text("notes: not tuned values\n")
    command = [str(Path(sys.executable).parent / "vgg"), "tune", "--params", str(tiny_params), "--config", "A",
               "--shards", str(tiny_shards), "--s-max", "64", "--trials", "9", "--max-epochs", "1", "--no-track",
               "--storage", "ray", *options]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.match(message, run.stderr.strip().splitlines()[-1]) and "Traceback" not in run.stderr
    assert not list((tmp_path / "ray").glob("tune-*/*/result.json"))  # no trial ran
