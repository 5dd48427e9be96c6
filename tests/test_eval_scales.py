"""The test scales Q (§3.2) an evaluation picks from the training S its checkpoint records."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.params import load_profile
from vgg.errors import CheckpointError, ConfigError
from vgg.evaluate.scales import EvalScales, choose_scales
from vgg.models import checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROFILE = load_profile(ROOT / "params.yaml", profile="small")  # low S 40, high 56, jittered [40; 72]; offset 8


def _model(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pt"
    header = checkpoint.header(config="C", profile=PROFILE, scale=PROFILE.scale(kind), kind=kind)
    checkpoint.save(path, {**header, "model": {}})
    return path


@pytest.mark.parametrize(("kind", "single", "multi"), [
    ("low", (40,), (32, 40, 48)),  # Q = S; {S - 8, S, S + 8}
    ("high", (56,), (48, 56, 64)),
    ("jitter", (56,), (40, 56, 72)),  # Q = ½(Smin + Smax); {Smin, ½(Smin + Smax), Smax}
])
def test_single_and_multi_follow_the_recorded_training_scale(tmp_path, kind, single, multi):
    model = _model(tmp_path, kind)
    assert choose_scales("single", model=model, q_offset=8) == EvalScales(scales=single, single=single[0])
    assert choose_scales("multi", model=model, q_offset=8) == EvalScales(scales=multi, single=single[0])


def test_an_explicit_list_reads_no_checkpoint_and_bad_specs_are_one_line(tmp_path):
    assert choose_scales("256,384,512", model=tmp_path / "absent.pt", q_offset=8) == EvalScales((256, 384, 512), None)
    assert choose_scales("224", model=None, q_offset=8) == EvalScales((224,), None)
    with pytest.raises(ConfigError, match=r"^--scales: torchvision weights carry no training scale; give the Q list"):
        choose_scales("multi", model=None, q_offset=8)
    with pytest.raises(ConfigError, match=r"^--scales: expected single, multi or a list of px .* got 'many'$"):
        choose_scales("many", model=None, q_offset=8)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        choose_scales("single", model=tmp_path / "absent.pt", q_offset=8)
