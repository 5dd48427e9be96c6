"""benchmarks/paper_path.py: the projection's arithmetic and its reading of dvc.yaml, and the whole user's path
(`vgg synth` → `vgg ingest` → `vgg train` on Ray Train → `vgg evaluate --device ray`) end to end in its --tiny
CPU setting, which must produce its table and a JSON of sane values."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import paper_path  # noqa: E402

from pipelines.params import load_profile  # noqa: E402
from vgg.evaluate.results import Posteriors  # noqa: E402

TRAIN_STAGES = {"train-scratch": 2, "train-deep": 4, "train-high": 3, "train-jitter": 3}  # configurations each


def test_dvc_stages_lists_every_training_and_evaluation_run_of_the_protocol():
    train, evaluate = paper_path.dvc_stages(ROOT / "dvc.yaml")
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    variables = {key: value for entry in spec["vars"] for key, value in entry.items()}
    assert {stage: sum(run["stage"] == stage for run in train) for stage in TRAIN_STAGES} == TRAIN_STAGES
    assert [run["config"] for run in train if run["stage"] == "train-deep"] == ["B", "C", "D", "E"]
    assert {run["scale"] for run in train if run["stage"] == "train-jitter"} == {"jitter"}
    expected = [("evaluate-single", model, "dense", "single") for model in variables["single_only"]]
    expected += [("evaluate-multi", model, "dense", "multi") for model in variables["multiscale"]]
    expected += [("evaluate-multicrop", model, "multicrop", "multi") for model in variables["jittered"]]
    assert [(run["stage"], run["model"], run["mode"], run["scales"]) for run in evaluate] == expected
    assert ("A-LRN", "low") in {(run["config"], run["scale"]) for run in evaluate}


def test_projection_adds_epochs_times_imagenet_over_eight_gpus_and_scales_evaluation_by_q_squared():
    paper = load_profile(ROOT / "params.yaml", profile="paper")
    flops = {"A": 7.6, "A-LRN": 7.6, "B": 11.3, "C": 15.5, "D": 15.5, "E": 19.6}  # any positive numbers
    result = {
        "train": {"cpu": {"images_per_s": 1000.0}},
        "evaluation": [{"mode": "dense", "q": 384, "seen_shapes_images_per_s": 500.0},
                       {"mode": "multicrop", "q": 384, "seen_shapes_images_per_s": 50.0}],
        "evaluate_command": {"overhead_s": 36.0},
    }
    plan = paper_path.projection(result, paper, epochs=74, decode="cpu", gflop=flops.__getitem__)
    rows = {(row["stage"], row["config"]): row for row in plan["training"]}
    assert math.isclose(rows["train-deep", "D"]["hours"], 74 * 1_281_167 / (8 * 1000.0) / 3600)
    assert math.isclose(rows["train-scratch", "A"]["hours"], 74 * 1_281_167 * 7.6 / 15.5 / (8 * 1000.0) / 3600)
    evaluations = {(row["stage"], row["model"]): row for row in plan["evaluation"]}
    single = evaluations["evaluate-single", "A-low"]  # Q = 256, one scale, A's FLOPs, plus the command's overhead
    assert single["q"] == [256]
    assert math.isclose(single["hours"], (50_000 * (256 / 384) ** 2 / 500.0 * 7.6 / 15.5 + 36.0) / 3600)
    multi = evaluations["evaluate-multi", "D-jitter"]  # Q = 256, 384, 512
    assert multi["q"] == [256, 384, 512]
    dense_s = sum(50_000 * (q / 384) ** 2 / 500.0 for q in (256, 384, 512))
    assert math.isclose(multi["hours"], (dense_s + 36.0) / 3600)
    crops = evaluations["evaluate-multicrop", "E-jitter"]
    assert math.isclose(crops["hours"], (3 * 50_000 / 50.0 * 19.6 / 15.5 + 36.0) / 3600)
    assert math.isclose(plan["total_hours"], sum(row["hours"] for row in plan["training"] + plan["evaluation"]))
    assert plan["training_runs"] == 12 and plan["paper_hours"] == [2 * 168 * 12, 3 * 168 * 12]
    assert paper_path.projection({"train": {}}, paper, epochs=74, decode="cpu", gflop=flops.__getitem__) is None


@pytest.mark.parametrize("setup", [paper_path.DEVICE, paper_path.TINY], ids=lambda setup: setup.name)
def test_each_setup_is_a_valid_paper_profile_whose_data_has_the_models_classes(setup):
    """What `vgg train` checks before training (the GPU setup cannot run here): the overrides make a valid paper
    profile, and the generated shards have as many classes as the model."""
    paper = load_profile(ROOT / "params.yaml", profile="paper")
    micro = setup.micro_batch or paper.train.micro_batch
    sets = paper_path.profile_sets(setup, micro_batch=micro, epochs=setup.epochs, loader_workers=None)
    profile = load_profile(ROOT / "params.yaml", profile="paper", overrides=sets)
    assert profile.synth.classes == profile.model.num_classes and profile.synth.jpeg == "imagenet"
    assert profile.train.workers == 1 and profile.train.accumulation == 1 and profile.train.max_epochs == 2
    assert profile.synth.classes * profile.synth.train_per_class >= 4 * micro  # steps enough before replication
    if setup is paper_path.DEVICE:  # the paper's model and recipe, on one GPU
        assert profile.model == paper.model and profile.scales == paper.scales
        assert profile.train.use_gpu and profile.train.compile and profile.eval.device == "ray"


@pytest.mark.slow
def test_tiny_run_goes_through_every_command_and_writes_its_table_and_json(tmp_path):
    out = tmp_path / "paper_path.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)  # the benchmark starts (and stops) its own local Ray, as `vgg demo` does
    process = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "paper_path.py"), str(out), "--tiny"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # its clean-up stops the Ray it started
        output, _ = process.communicate(timeout=120)
        pytest.fail(f"paper_path.py --tiny ran over 900 s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {} and result["skipped"] == [] and result["performance_figure"] is False

    data = result["data"]
    assert data["train_images"] == 60 and data["mean_jpeg_kb"] > 0  # 10 classes x 6 (--tiny's synth)
    assert {(row["decode"], row["scale"]) for row in result["loader"]} == {
        ("cpu", "40"), ("device", "40"), ("cpu", "56"), ("cpu", "40-72")}
    positive = lambda value: isinstance(value, (int, float)) and math.isfinite(value) and value > 0  # noqa: E731
    assert all(positive(row["steady_images_per_s"]) for row in result["loader"])
    assert positive(result["step"]["steady_images_per_s"]) and result["step"]["batch"] == 8
    assert set(result["train"]) == {"cpu", "device"}
    for row in result["train"].values():
        assert positive(row["images_per_s"]) and positive(row["wall_s"]) and row["backend"] == "gloo"
        assert row["epochs"] == 2 and row["epoch_images"] == 120  # the 60 images listed twice, 15 steps of 8
        assert math.isclose(row["tflops"], row["images_per_s"] * result["flops"]["train_gflop_per_image"] / 1e3)
    for decode in ("cpu", "device"):
        assert (out.parent / "paper_path-tiny" / f"D-{decode}.pt").is_file()
    evaluated = Posteriors.load(out.parent / "paper_path-tiny" / "D-dense-single.npz")
    assert len(evaluated.keys) == result["evaluate_command"]["images"] == 20  # 10 classes x 2 val images
    modes = {row["mode"]: row for row in result["evaluation"]}
    assert set(modes) == {"dense", "multicrop"} and modes["dense"]["q"] == 56  # scales.high's Q, as on a GPU: 384
    assert all(positive(row["seen_shapes_images_per_s"]) for row in modes.values())

    plan = result["projection"]
    assert plan["training_runs"] == 12 and len(plan["evaluation"]) == 14 and plan["epochs_per_run"] == 74
    assert positive(plan["total_hours"])
    assert math.isclose(plan["total_hours"], plan["training_hours"] + plan["evaluation_hours"])
    assert all(goal["met"] is None for goal in result["goal"].values())  # not a performance figure
    for line in ("vgg train (Ray Train) decode=cpu", "vgg evaluate --device ray", "projection, whole `dvc repro`",
                 "paper: 2-3 weeks per net", "goals (issue 23, one H100)"):
        assert line in output
