"""Configuration: both shipped profiles load, and every invalid case gives one clear line naming the key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipelines.params import load_profile
from vgg.config import Profile, ScaleRange, from_mapping
from vgg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.mark.parametrize("name", ["small", "paper"])
def test_shipped_profiles_load(name):
    profile = load_profile(PARAMS, profile=name)
    assert profile.name == name
    assert profile.train.batch_size % (profile.train.micro_batch * profile.train.workers) == 0


def test_paper_profile_carries_the_papers_numbers():
    paper = load_profile(PARAMS, profile="paper")
    assert (paper.model.crop, paper.model.fc_width, paper.model.num_classes) == (224, 4096, 1000)
    assert (paper.train.batch_size, paper.train.lr, paper.train.momentum) == (256, 0.01, 0.9)
    assert (paper.train.weight_decay, paper.model.dropout, paper.train.max_decays) == (5e-4, 0.5, 3)
    assert (paper.train.max_epochs, paper.train.fine_tune_epochs, paper.eval.q_offset, paper.eval.grid) == (74, 74, 32, 5)
    assert paper.scales.low == ScaleRange(256, 256) and paper.scales.high == ScaleRange(384, 384)
    assert paper.scales.jitter == ScaleRange(256, 512)
    text = PARAMS.read_text()
    paper_section = text[text.index("  paper:"):]
    for line in ("lr: 0.01", "momentum: 0.9", "weight_decay: 0.0005", "crop: 224", "batch_size: 256"):
        assert f"{line}" in paper_section and "§" in paper_section.split(line, 1)[1].splitlines()[0], line


def test_q_sets_follow_section_3_2():
    assert ScaleRange(256, 256).multi_q(32) == (224, 256, 288)
    assert ScaleRange(256, 512).multi_q(32) == (256, 384, 512)
    assert ScaleRange(256, 512).single_q == 384 and ScaleRange(384, 384).single_q == 384


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=0", "profiles.small.train.lr: must be > 0"),
        ("train.bogus=1", "profiles.small.train.bogus: unknown key"),
        ("train.lr=fast", "profiles.small.train.lr: must be a number"),
        ("train.micro_batch=48", "profiles.small.train.batch_size: 32 is not divisible"),
        ("model.crop=48", "profiles.small.model.crop: must be a multiple of 32"),
        ("scales.low={s_min: 24, s_max: 24}", "profiles.small.scales.low.s_min: the crop (32 px) must fit"),
        ("scales.jitter={s_min: 80, s_max: 64}", "profiles.small.scales.jitter.s_min: must be <= s_max"),
        ("scales.jitter={s_min: 40}", "profiles.small.scales.jitter.s_max: missing key"),
        ("eval.q_offset=16", "profiles.small.eval.q_offset: multi-scale Q=24"),
        ("data.max_side=64", "profiles.small.data.max_side: 64 px is below the largest scale used"),
        ("model.init=xavier", "profiles.small.model.init: must be one of normal, glorot, kaiming"),
        ("model.warm_init=he", "profiles.small.model.warm_init: must be one of normal, glorot, kaiming"),
        ("train.channels_last=1", "profiles.small.train.channels_last: must be true or false"),
        ("train.label_smoothing=1", "profiles.small.train.label_smoothing: must be in [0, 1), got 1.0"),
        ("train.label_smoothing=-0.1", "profiles.small.train.label_smoothing: must be in [0, 1), got -0.1"),
        ("train.label_smoothing=.nan", "profiles.small.train.label_smoothing: must be a finite number, got nan"),
        ("train.label_smoothing=some", "profiles.small.train.label_smoothing: must be a number, got 'some'"),
        ("train.fine_tune_epochs=0", "profiles.small.train.fine_tune_epochs: must be > 0"),
        ("train.decay_at=0.6", "profiles.small.train.decay_at: must be a list, got 0.6"),
        ("train.decay_at=[0.9, 0.6]", "profiles.small.train.decay_at: must increase strictly, got [0.9, 0.6]"),
        ("train.decay_at=[0.5, 1]", "train.decay_at: every entry must be a fraction of the run in (0, 1), got [0.5, 1"),
        ("train.decay_at=[soon]", "profiles.small.train.decay_at[0]: must be a number, got 'soon'"),
        ("train.lr", "expected section.key=value"),
    ],
)
def test_invalid_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_profile(PARAMS, overrides=[override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_and_unknown_sections(tmp_path):
    params = yaml.safe_load(PARAMS.read_text())
    del params["profiles"]["small"]["eval"]
    params["profiles"]["small"]["extra"] = {}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"profiles.small.extra: unknown key"):
        load_profile(path)
    del params["profiles"]["small"]["extra"]
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"profiles.small.eval: missing key"):
        load_profile(path)


def test_bad_params_files(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_profile(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("profiles: {small: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(broken)
    with pytest.raises(ConfigError, match="choose one of small, paper"):
        load_profile(PARAMS, profile="huge")


def test_paper_profile_without_imagenet_path_says_what_to_set():
    paper = load_profile(PARAMS, profile="paper")
    with pytest.raises(ConfigError, match=r"profiles.paper.data.raw: set it to the directory holding ILSVRC2012"):
        paper.require_raw_source()
    load_profile(PARAMS, profile="small").require_raw_source()


@pytest.mark.parametrize("name", ["small", "paper"])
def test_label_smoothing_is_off_as_in_the_vgg_paper(name):
    assert load_profile(PARAMS, profile=name).train.label_smoothing == 0.0
    comments = [line for line in PARAMS.read_text().splitlines() if line.strip().startswith("label_smoothing:")]
    assert len(comments) == 2 and all("Szegedy et al. 2016, §7" in line for line in comments)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_label_smoothing_is_in_the_training_loss(smoothing):
    """`fit`'s reported training loss of a one-step epoch is the loss at the initial weights: it must be
    cross-entropy against the smoothed target (1 - ε) one-hot + ε / K, as torch computes it."""
    import copy

    import torch
    from torch import nn

    from vgg.train.loop import fit

    class ToFloat(nn.Module):
        def forward(self, images, colour=None):
            return images.float() / 255

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8, generator=generator)
    labels = torch.randint(3, (8,), generator=generator)
    colour = torch.zeros(8, 3)  # the PCA colour shift, which ToFloat ignores
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    initial = copy.deepcopy(model)
    train = load_profile(PARAMS, profile="small").train
    config = dataclasses.replace(train, batch_size=8, micro_batch=8, workers=1, max_epochs=1, precision="fp32",
                                 channels_last=False, compile=False, use_gpu=False, label_smoothing=smoothing)
    result = fit(model=model, config=config, lr=0.01, batches=lambda epoch, start: [(images, labels, colour)],
                 steps_per_epoch=1, validate=lambda core: (50.0, 10.0), preprocess=ToFloat(),
                 device=torch.device("cpu"), header={})
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(initial(images.float() / 255), labels, label_smoothing=smoothing)
    assert result.history[0]["train/loss"] == pytest.approx(float(expected), rel=1e-6)


def test_fine_tuning_caps_the_epochs_and_changes_nothing_else():
    train = load_profile(PARAMS, overrides=["train.max_epochs=10", "train.fine_tune_epochs=4"]).train
    tuned = train.fine_tuning()
    assert tuned.max_epochs == 4 and dataclasses.replace(tuned, max_epochs=10) == train
    assert load_profile(PARAMS, overrides=["train.max_epochs=3", "train.fine_tune_epochs=4"]).train.fine_tuning().max_epochs == 3


def test_a_resolved_profile_is_plain_data_that_reads_back():
    """What `vgg profile` prints and MLflow logs is YAML's own data (a list, not a Python tuple), so it can be pasted
    back into params.yaml."""
    profile = load_profile(PARAMS)
    data = profile.to_dict()
    assert data["train"]["decay_at"] == [0.6, 0.9]
    assert from_mapping(Profile, yaml.safe_load(yaml.safe_dump(data))) == profile
