"""The report: the paper's tables filled from saved posteriors (ours beside the paper's), findings, plots, JSON."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from vgg.errors import DataError
from vgg.evaluate.metrics import errors
from vgg.evaluate.results import Posteriors, fuse
from vgg.evaluate.statistics import holm, mcnemar, paired_difference, wilson
from vgg.report import TABLE3, TABLE4, TABLE5, TABLE6, Scored, findings, paper_cells, write_report

COUNT, CLASSES = 50_000, 10  # the paper's validation set: an error of 29.6 % is exactly 14,800 of its images
# The small profile's training scales (S=40 / 56 / [40;72]) and test scales (Q offset 8).
SCALES = {
    "low": ({"label": "40", "s_min": 40, "s_max": 40}, [40], [32, 40, 48]),
    "high": ({"label": "56", "s_min": 56, "s_max": 56}, [56], [48, 56, 64]),
    "jitter": ({"label": "40-72", "s_min": 40, "s_max": 72}, [56], [40, 56, 72]),
}
# Our fake errors are the paper's shifted by these (so the two columns differ but every finding holds).
SHIFT1, SHIFT5 = 10.0, 5.0


LABELS = np.random.default_rng(0).integers(0, CLASSES, COUNT)  # one validation set: every model sees these


def fake_posteriors(top1: float, top5: float, meta: dict, *, seed: int = 0) -> Posteriors:
    """Posteriors whose top-1 / top-5 errors are exactly `top1` / `top5` percent of COUNT images. The images a
    model gets wrong are the first ones (nested: a model with a lower error is right wherever a worse one is)."""
    rng = np.random.default_rng(seed)
    miss5, miss1 = round(top5 * COUNT / 100), round(top1 * COUNT / 100)
    index = np.arange(COUNT)
    rank = np.where(index < miss5, 5, np.where(index < miss1, 1, 0))  # the label's place: 6th, 2nd or 1st
    keys = rng.random((COUNT, CLASSES))
    keys[index, LABELS] = np.inf
    others = np.argsort(keys, axis=1)[:, :-1]  # the other classes, in random order
    order = np.empty((COUNT, CLASSES), dtype=np.int64)
    for place in (0, 1, 5):
        rows = rank == place
        order[rows] = np.concatenate([others[rows, :place], LABELS[rows, None], others[rows, place:]], axis=1)
    values = np.linspace(0.3, 0.01, CLASSES, dtype=np.float32)  # distinct, descending: position = rank
    probs = np.zeros((COUNT, CLASSES), dtype=np.float32)
    probs[index[:, None], order] = values
    probs /= probs.sum(axis=1, keepdims=True)
    return Posteriors(keys=[f"img{i:05d}" for i in range(COUNT)], labels=LABELS, probs=probs, meta=meta)


def meta_for(row, *, with_kind: bool) -> dict:
    scale, single, multi = SCALES[row.kind]
    train_scale = {**scale, "kind": row.kind} if with_kind else dict(scale)
    models = row.config.split("+")
    return {
        "config": row.config,
        "models": models,
        "train_scale": train_scale,
        "mode": row.mode,
        "scales": single if row.scales == "single" else multi,
    }


def write_all(directory, rows, *, with_kind: bool = True) -> None:
    written = set()
    for i, row in enumerate(rows):
        if row.cell in written:  # Table 5's dense rows are Table 4's D/E jitter rows
            continue
        written.add(row.cell)
        name = f"{row.config}_{row.kind}_{row.scales}_{row.mode}.npz".replace("+", "-")
        meta = meta_for(row, with_kind=with_kind)
        posteriors = fake_posteriors(row.paper[0] + SHIFT1, row.paper[1] + SHIFT5, meta, seed=i)
        posteriors.save(directory / name)


def test_fake_posteriors_have_the_intended_errors():
    result = errors(fake_posteriors(29.6, 10.4, {}))
    assert result == pytest.approx({"top1_err": 29.6, "top5_err": 10.4})


def test_every_cell_filled_from_saved_results(tmp_path):
    results, out = tmp_path / "results", tmp_path / "report"
    results.mkdir()
    write_all(results, [*TABLE3, *TABLE4, *TABLE5, *TABLE6])

    paths = write_report(results, out)

    markdown = paths.markdown.read_text()
    metrics = json.loads(paths.metrics.read_text())
    for row in [*TABLE3, *TABLE4, *TABLE5, *TABLE6]:
        ours = metrics[row.table][row.name]
        top1, top5 = row.paper[0] + SHIFT1, row.paper[1] + SHIFT5
        assert {key: ours[key] for key in ("top1_err", "top5_err")} == pytest.approx({"top1_err": top1,
                                                                                      "top5_err": top5})
        low1, high1 = wilson(round(top1 * COUNT / 100), COUNT)
        low5, high5 = wilson(round(top5 * COUNT / 100), COUNT)
        assert (ours["top1_ci_low"], ours["top1_ci_high"]) == pytest.approx((low1, high1), abs=1e-4)
        assert low1 < top1 < high1 and high1 - low1 < 1.0  # 50,000 images: under a point wide
        # The row shows our number with its interval, and the paper's, side by side.
        cells = (f"{top1:.1f} | {low1:.1f}–{high1:.1f} | {row.paper[0]:.1f} | {top5:.1f} | {low5:.1f}–{high5:.1f} | "
                 f"{row.paper[1]:.1f} |")
        assert cells in markdown, f"{row.table} {row.name}"
    table_lines = [line for line in markdown.split("## Findings")[0].splitlines() if line.startswith("|")]
    assert len(table_lines) == 31 + 4 * 2  # 31 rows, 4 headers
    assert not [line for line in table_lines if "—" in line]  # no empty cell
    assert metrics["findings"] == dict.fromkeys(FINDINGS, "reproduced")
    assert markdown.count("— reproduced.") == len(FINDINGS) and "Verdicts: 7 reproduced." in markdown
    depth = metrics["finding_tests"]["depth_helps"]["B_vs_A"]
    assert depth["difference"] == pytest.approx(29.6 - 28.7) and depth["only_better"] == 450 and depth["p_holm"] < 1e-9
    # Small-profile rows line up with the paper's by kind: S=56 sits in the paper's S=384 row.
    assert re.search(r"\| D \| high \| 56 \| 56 \| 384 \| 384 \|", markdown)
    assert re.search(r"\| D \| jitter \| 40-72 \| 40,56,72 \| \[256;512\] \| 256,384,512 \|", markdown)
    for plot in paths.plots:
        assert plot.read_bytes().startswith(b"\x89PNG") and plot.name in markdown


def test_a_training_scale_without_its_kind_is_one_line_not_a_guess(tmp_path):
    """The kind comes from the checkpoint (`checkpoint_meta`): a file without it is not placed by guessing from S
    (a profile whose `high` S is below another's `low` would land in the wrong row)."""
    results = tmp_path / "results"
    results.mkdir()
    write_all(results, TABLE3[:2])
    (results / "sub").mkdir()
    write_all(results / "sub", TABLE3[2:3], with_kind=False)
    with pytest.raises(DataError) as raised:
        write_report(results, tmp_path / "report")
    assert str(raised.value) == (
        f"{results / 'sub' / 'B_low_single_dense.npz'}: meta train_scale.kind is None; expected one of low, high, "
        "jitter: re-create it with `vgg evaluate`")
    assert not (tmp_path / "report" / "report.md").exists()


FINDINGS = ["lrn_does_not_help", "depth_helps", "conv3_beats_conv1", "scale_jitter_helps", "multi_scale_test_helps",
            "dense_plus_multicrop_best", "fusion_helps"]


def nested(top1: float, count: int = COUNT) -> Scored:
    """A model right on all but the first `top1` percent of `count` images (a lower error: right on a superset)."""
    return Scored(np.arange(count) >= round(top1 * count / 100), images="val")


def test_findings_hold_on_the_papers_own_numbers():
    """The paper's 50,000 images and its numbers, each better model right wherever a worse one is: every finding is
    significant (its smallest gap, 0.1 point, is 50 images all one way)."""
    cells = {cell: nested(top1) for cell, (top1, _) in paper_cells().items()}
    assert {f.name: f.status for f in findings(cells)} == dict.fromkeys(FINDINGS, "reproduced")


def test_the_same_numbers_on_three_hundred_images_are_not_significant():
    """The small profile's old validation set: the paper's own gaps are one to five images there."""
    cells = {cell: nested(top1, 300) for cell, (top1, _) in paper_cells().items()}
    status = {f.name: f.status for f in findings(cells)}
    assert status["dense_plus_multicrop_best"] == "same direction, not significant"
    assert status["fusion_helps"] == "same direction, not significant"


def _models(seed: int, *, gain: float, count: int = 1000, base: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of a model and of a second one that is the first with `gain` of its wrong images
    made right and as many of its right images made wrong by chance as right ones made wrong (no effect: gain 0)."""
    rng = np.random.default_rng(seed)
    first = rng.random(count) < base
    second = first.copy()
    flips = rng.random(count) < 0.08  # disagreements that cancel in expectation
    second[flips] = rng.random(int(flips.sum())) < base
    wrong = np.flatnonzero(~second)
    second[rng.choice(wrong, size=round(gain * wrong.size), replace=False)] = True
    return first, second


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_planted_effect_is_detected_on_every_seed(seed):
    a, b = _models(seed, gain=0.15)  # B right on 15% of the images it would get wrong: ~4.5 points better
    found = {f.name: f for f in findings({("single", "A", "low", "dense"): Scored(a, "val"),
                                          ("single", "B", "low", "dense"): Scored(b, "val")})}
    assert found["depth_helps"].status == "reproduced", found["depth_helps"].detail
    assert found["depth_helps"].comparisons[0].p_holm < 0.05
    # The other way round it is significant against the paper.
    swapped = findings({("single", "A", "low", "dense"): Scored(b, "val"),
                        ("single", "B", "low", "dense"): Scored(a, "val")})
    assert {f.name: f.status for f in swapped}["depth_helps"] == "contradicted"


def test_no_effect_is_rarely_significant():
    """Twenty seeds of two models that differ only by chance: an exact test at 5% calls few of them significant."""
    significant = 0
    for seed in range(20):
        a, b = _models(seed, gain=0.0)
        comparison = findings({("single", "A", "low", "dense"): Scored(a, "val"),
                               ("single", "B", "low", "dense"): Scored(b, "val")})[1].comparisons[0]
        significant += comparison.p_holm < 0.05
    assert significant <= 3  # expected 1 of 20; P(more than 3) < 2% for a test of the right size


def test_lrn_is_judged_by_its_interval_against_the_margin():
    same = nested(29.6)
    assert findings({("single", "A", "low", "dense"): same, ("single", "A-LRN", "low", "dense"): nested(29.7)}
                    )[0].status == "reproduced"
    better = findings({("single", "A", "low", "dense"): same, ("single", "A-LRN", "low", "dense"): nested(27.0)})[0]
    assert better.status == "contradicted" and better.interval[1] > 0
    other = findings({("single", "A", "low", "dense"): same,
                      ("single", "A-LRN", "low", "dense"): Scored(same.correct, "test")})[0]
    assert other.status == "not measured"  # different images: no paired comparison


def test_exact_tests_against_scipy_and_hand_values():
    from scipy.stats import binomtest

    for only_a, only_b in [(0, 0), (0, 5), (5, 0), (3, 9), (40, 60), (1200, 1311)]:
        a = np.array([True] * only_a + [False] * only_b + [True] * 7)
        b = np.array([False] * only_a + [True] * only_b + [True] * 7)
        expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert mcnemar(a, b).p == pytest.approx(expected, rel=1e-9)
    assert mcnemar(np.array([False] * 5), np.array([True] * 5)).p == pytest.approx(2 / 32)
    assert wilson(0, 10) == pytest.approx((0.0, 27.753), abs=1e-3)  # Wilson's interval, textbook values
    assert wilson(5, 10) == pytest.approx((23.659, 76.341), abs=1e-3)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    difference, low, high = paired_difference(np.array([True] * 90 + [False] * 10), np.array([True] * 100))
    assert difference == pytest.approx(10.0) and 0 < low < 10 < high


def test_partial_results_show_dashes_and_not_measured(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    a, a_lrn = TABLE3[0], TABLE3[1]
    # A-LRN better than A by 5 points: LRN "helps" here, against the paper.
    fake_posteriors(30.0, 10.0, meta_for(a, with_kind=True)).save(results / "a.npz")
    fake_posteriors(25.0, 9.0, meta_for(a_lrn, with_kind=True)).save(results / "a_lrn.npz")

    paths = write_report(results, tmp_path / "report")

    markdown = paths.markdown.read_text()
    metrics = json.loads(paths.metrics.read_text())
    assert {row: {key: value[key] for key in ("top1_err", "top5_err")} for row, value in metrics["table3"].items()
            } == {"A/low": {"top1_err": 30.0, "top5_err": 10.0}, "A-LRN/low": {"top1_err": 25.0, "top5_err": 9.0}}
    assert metrics["table6"] == {}
    assert "| B | low | — | — | 256 | 256 | — | — | 28.7 | — | — | 9.9 |" in markdown
    status = metrics["findings"]
    assert status["lrn_does_not_help"] == "contradicted"  # 5 points on 50,000 images: LRN helps here
    assert "err(A) − err(A-LRN) = +5.00 points" in markdown
    assert {status[name] for name in status if name != "lrn_does_not_help"} == {"not measured"}


def test_fusion_file_from_fuse_lands_in_table6(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    d, e = (row for row in TABLE5 if row.mode == "multicrop")
    p_d = fake_posteriors(30.0, 10.0, meta_for(d, with_kind=True), seed=1)
    p_e = fake_posteriors(30.0, 10.0, meta_for(e, with_kind=True), seed=1)  # same keys and labels
    p_d.save(results / "d.npz")
    p_e.save(results / "e.npz")
    fused = fuse([Posteriors.load(results / "d.npz"), Posteriors.load(results / "e.npz")])
    fused.save(results / "fused.npz")

    metrics = json.loads(write_report(results, tmp_path / "report").metrics.read_text())

    ours = metrics["table6"]["D+E/multicrop"]
    assert {key: ours[key] for key in ("top1_err", "top5_err")} == errors(fused)
    assert metrics["findings"]["fusion_helps"] == "not the paper's direction, not significant"  # same model twice


def test_results_without_training_scale_are_listed_but_placed_nowhere(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    meta = {"config": "D", "models": ["D"], "mode": "dense", "scales": [224]}  # e.g. torchvision's weights
    fake_posteriors(30.0, 10.0, meta).save(results / "torchvision_vgg16.npz")
    fake_posteriors(31.0, 11.0, meta_for(TABLE3[0], with_kind=True)).save(results / "a.npz")
    fake_posteriors(32.0, 12.0, meta_for(TABLE3[0], with_kind=True)).save(results / "b.npz")

    paths = write_report(results, tmp_path / "report")

    markdown = paths.markdown.read_text()
    assert json.loads(paths.metrics.read_text())["table3"]["A/low"]["top1_err"] == 31.0
    assert list(json.loads(paths.metrics.read_text())["table3"]) == ["A/low"]
    assert "| torchvision_vgg16.npz | D | — | dense | 224 | 30.00 | 10.00 |" in markdown
    assert "`torchvision_vgg16.npz` is in no table" in markdown
    assert "`b.npz` repeats the table cell of `a.npz`" in markdown


def test_missing_results_dir_and_bad_meta_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="results directory not found"):
        write_report(tmp_path / "nope", tmp_path / "out")
    results = tmp_path / "results"
    results.mkdir()
    fake_posteriors(30.0, 10.0, {"config": "A", "scales": [40]}).save(results / "x.npz")
    with pytest.raises(DataError, match=r"x\.npz: meta has no 'mode'"):
        write_report(results, tmp_path / "out")
    assert not (tmp_path / "out" / "report.md").exists()
