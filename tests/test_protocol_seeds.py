"""benchmarks/protocol.py --seeds: the seed goes into the clone's params, and the variation between seeds is
summarised right (verdict counts per finding, per-cell spread)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from benchmarks.protocol import set_seed, variation
from pipelines.params import load_profile
from tests.conftest import ROOT


def test_set_seed_changes_the_active_profiles_synth_and_train_seeds_only(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = yaml.safe_load(params.read_text())
    assert set_seed(params, 7) == before["profile"]
    after = yaml.safe_load(params.read_text())
    name = before["profile"]
    before["profiles"][name]["synth"]["seed"] = before["profiles"][name]["train"]["seed"] = 7
    assert after == before
    profile = load_profile(params)  # still a valid params file for `vgg`
    assert profile.synth.seed == 7 and profile.train.seed == 7


def _run(seed, findings, a_err, d_err):
    return {"seed": seed, "total_s": 600.0, "metrics": {
        "table3": {"A, S low": {"top1_err": a_err}, "D, S low": {"top1_err": d_err}},
        "findings": findings, "finding_tests": {"depth_helps": {"verdict": findings["depth_helps"]}}}}


def test_variation_counts_verdicts_per_finding_and_spreads_per_cell():
    runs = [
        _run(0, {"depth_helps": "reproduced", "lrn_does_not_help": "contradicted"}, 40.0, 30.0),
        _run(1, {"depth_helps": "reproduced", "lrn_does_not_help": "same direction, not significant"}, 44.0, 20.0),
        _run(2, {"depth_helps": "same direction, not significant", "lrn_does_not_help": "reproduced"}, 42.0, 25.0),
    ]
    summary = variation(runs)
    assert summary["seeds"] == [0, 1, 2]
    depth = summary["findings"]["depth_helps"]
    assert depth["reproduced"] == 2 and depth["contradicted"] == 0 and not depth["same_every_seed"]
    assert summary["findings"]["lrn_does_not_help"]["contradicted"] == 1
    a = summary["cells"]["table3 / A, S low"]
    assert a["top1_err"] == [40.0, 44.0, 42.0] and a["mean"] == pytest.approx(42.0)
    assert (a["min"], a["max"]) == (40.0, 44.0) and a["std"] == pytest.approx(2.0)
    assert [row["best_top1_err"] for row in summary["per_seed"]] == [30.0, 20.0, 25.0]
    assert [(row["reproduced"], row["contradicted"]) for row in summary["per_seed"]] == [(1, 1), (1, 0), (1, 0)]


def test_a_cell_missing_in_one_seed_is_none_there_and_left_out_of_the_spread():
    runs = [_run(0, {"depth_helps": "reproduced"}, 40.0, 30.0), _run(1, {"depth_helps": "reproduced"}, 50.0, 30.0)]
    del runs[1]["metrics"]["table3"]["A, S low"]
    cell = variation(runs)["cells"]["table3 / A, S low"]
    assert cell["top1_err"] == [40.0, None] and cell["mean"] == 40.0 and cell["std"] is None
