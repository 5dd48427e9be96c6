"""Evaluation (§3.2): views, dense ≡ crop classifier, multi-crop, multi-scale, fusion, metrics, model loading."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from vgg.config import ModelConfig, ScaleRange
from vgg.data.preprocessing import Preprocess
from vgg.data.shard_format import read_stats
from vgg.data.transforms import decode_rgb
from vgg.errors import CheckpointError, ConfigError, DataError
from vgg.evaluate.metrics import errors, top_k_error
from vgg.evaluate.dense import dense_scores, pad_to, padded_shape
from vgg.evaluate.posteriors import EvalOptions, checkpoint_meta, compute_posteriors, scale_meta, score_samples
from vgg.evaluate.results import Posteriors, fuse
from vgg.evaluate.views import at_scale, dense_views, grid_positions, multicrop_views
from vgg.models import build, checkpoint
from vgg.models.io import load_model

from tests.conftest import BIN, ROOT

CROP, CLASSES = 32, 10
WNIDS = [f"n{i:08d}" for i in range(CLASSES)]


def tiny_model(name: str = "A", *, classes: int = CLASSES) -> torch.nn.Module:
    # Glorot init (all layers): logits differ clearly between images, so the comparisons below are not trivial.
    generator = torch.Generator().manual_seed(0)
    model = build(name, crop=CROP, width=0.125, fc_width=64, num_classes=classes, init="glorot", generator=generator)
    return model.eval()


def jpeg(width: int, height: int, *, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: JPEG keeps them close, and every position differs.
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, rng.uniform(0, 255, (height, width))], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_shards(root, images: dict[str, list[tuple[int, int, int]]]) -> None:
    """A shard directory per the on-disk contract (BRIEF): index.json, stats.json, WebDataset tars.

    `images`: split → [(width, height, label)], one shard per split."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, specs in images.items():
        shards = []
        if specs:
            name = f"{split}-000000.tar"
            with tarfile.open(root / name, "w") as tar:
                for i, (width, height, label) in enumerate(specs):
                    key = f"{split}_{i:05d}"
                    info = {"wnid": WNIDS[label], "source": f"{key}.JPEG", "size": [width, height]}
                    members = {
                        "jpg": jpeg(width, height, seed=i),
                        "cls": str(label).encode(),
                        "json": json.dumps(info).encode(),
                    }
                    for extension, data in members.items():
                        info = tarfile.TarInfo(f"{key}.{extension}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
            shards.append({"file": name, "count": len(specs), "sha256": digest})
        splits[split] = {"count": len(specs), "shards": shards}
    index = {
        "format": 1, "classes": WNIDS, "names": WNIDS, "max_side": 512, "source": {"kind": "test"},
        "splits": splits, "converted": [], "skipped": [],
    }  # fmt: skip
    (root / "index.json").write_text(json.dumps(index))
    stats = {"count": 1, "mean_rgb": [120.0, 110.0, 100.0], "eigval": [3.0, 2.0, 1.0], "eigvec": np.eye(3).tolist()}
    (root / "stats.json").write_text(json.dumps(stats))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    sizes = [(40, 32, 3), (45, 60, 1), (40, 32, 7), (50, 50, 0), (33, 47, 9)]  # repeated 40×32: a dense bucket
    write_shards(root, {"train": [], "val": sizes})
    return root


@pytest.fixture(scope="module")
def preprocess(shards):
    return Preprocess(read_stats(shards))


def samples_of(images: list[bytes]) -> list[SimpleNamespace]:
    return [SimpleNamespace(key=f"k{i}", jpeg=data, label=i % CLASSES) for i, data in enumerate(images)]


def softmax_dense(model, preprocess, image: torch.Tensor) -> torch.Tensor:
    """The paper's dense posterior of one image [3, H, W], computed directly: score map, mean, softmax, ± flip."""
    with torch.no_grad():
        maps = model.score_map(preprocess(dense_views(image)))
        return torch.softmax(maps.mean(dim=(2, 3)), dim=1).mean(dim=0)


def softmax_crops(model, preprocess, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(preprocess(multicrop_views(image, crop=CROP, grid=5))), dim=1).mean(dim=0)


# Views -------------------------------------------------------------------------------------------------------


def test_multicrop_geometry_corners_centre_and_flips():
    image = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = multicrop_views(image, crop=CROP, grid=5)
    assert views.shape == (50, 3, CROP, CROP) and views.dtype == torch.uint8
    assert grid_positions(70, crop=CROP, grid=5) == [0, 9, 19, 28, 38]  # evenly spaced, ends included
    h, w = 45 - CROP, 70 - CROP
    expected = {
        0: image[:, :CROP, :CROP],  # top-left
        4: image[:, :CROP, w:],  # top-right
        20: image[:, h:, :CROP],  # bottom-left
        24: image[:, h:, w:],  # bottom-right
        12: image[:, h // 2 : h // 2 + CROP, w // 2 : w // 2 + CROP],  # centre
        7: image[:, 3 : 3 + CROP, 19 : 19 + CROP],  # row 1 (top ⌊13·1/4⌋ = 3), column 2 (left ⌊38·2/4⌋ = 19)
    }
    for index, crop in expected.items():
        assert torch.equal(views[index], crop), index
    for index in range(25):
        assert torch.equal(views[25 + index], views[index].flip(-1))  # mirror images, same order
    assert not torch.equal(views[25], views[0])


def test_dense_views_are_the_image_and_its_mirror():
    image = torch.randint(0, 256, (3, 33, 41), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    views = dense_views(image)
    assert views.shape == (2, 3, 33, 41)
    assert torch.equal(views[0], image)
    assert torch.equal(views[1][:, :, 0], image[:, :, -1]) and torch.equal(views[1].flip(-1), image)


def test_crop_larger_than_the_image_is_a_config_error():
    with pytest.raises(ConfigError, match="Q >= crop"):
        grid_positions(30, crop=CROP, grid=5)


def test_at_scale_rescales_the_smallest_side_to_q():
    image = decode_rgb(jpeg(60, 45, seed=0), min_side=None)
    assert at_scale(image, q=36).shape == (3, 36, 48)


# Posteriors ---------------------------------------------------------------------------------------------------


def test_dense_at_q_equal_crop_is_the_crop_classifier(preprocess):
    """On a crop-sized image at Q = crop the score map is 1×1: dense evaluation = the FC classifier (§3.2)."""
    model = tiny_model()
    data = jpeg(CROP, CROP, seed=3)
    image = at_scale(decode_rgb(data, min_side=CROP), q=CROP)
    with torch.no_grad():
        classifier = torch.softmax(model(preprocess(dense_views(image))), dim=1).mean(dim=0)
    for mode in ("dense", "multicrop"):  # multi-crop too: all 25 crops are the whole image
        options = EvalOptions(mode=mode, scales=[CROP], batch_size=4)
        result = score_samples(model, samples_of([data]), options, preprocess=preprocess)
        assert result.probs.shape == (1, CLASSES)
        np.testing.assert_allclose(result.probs[0], classifier.numpy(), rtol=1e-5, atol=1e-6)
    assert classifier.max() > 0.2  # a real, non-uniform posterior


def test_batched_dense_and_multicrop_match_per_image_computation(preprocess):
    """Bucketing images by size and batching crops across images does not mix up whose view is whose."""
    model = tiny_model()
    images = [jpeg(w, h, seed=i) for i, (w, h) in enumerate([(40, 32), (45, 60), (40, 32), (33, 47)])]
    q = 36
    views = [at_scale(decode_rgb(data, min_side=q), q=q) for data in images]
    dense = score_samples(model, samples_of(images), EvalOptions(mode="dense", scales=[q], batch_size=3),
                          preprocess=preprocess)
    crops = score_samples(model, samples_of(images), EvalOptions(mode="multicrop", scales=[q], batch_size=7),
                          preprocess=preprocess)
    for i, view in enumerate(views):
        np.testing.assert_allclose(dense.probs[i], softmax_dense(model, preprocess, view).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(crops.probs[i], softmax_crops(model, preprocess, view).numpy(), rtol=1e-5, atol=1e-6)
    assert dense.keys == [f"k{i}" for i in range(4)] and list(dense.labels) == list(range(4))
    both = score_samples(model, samples_of(images), EvalOptions(mode="dense+multicrop", scales=[q], batch_size=5,
                                                                workers=2), preprocess=preprocess)
    np.testing.assert_allclose(both.probs, (dense.probs + crops.probs) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(dense.probs, crops.probs)  # the two modes really differ on non-square images


# Images of many aspect ratios, a few repeated, one (70×66) decoded in the DCT at 1/2 for Q=32: at each Q they
# fall into several shapes, and padding to a multiple of 8 or 32 px merges some of them.
MIXED = [(40, 32), (45, 60), (40, 32), (33, 47), (70, 40), (36, 80), (50, 50), (41, 33), (70, 66), (40, 32),
         (60, 45), (37, 52)]


@pytest.mark.parametrize("name", ["A", "A-LRN", "C"])
def test_padded_dense_scores_equal_each_image_alone(preprocess, name):
    """Masked padding (vgg.evaluate.dense) is exact: 3×3 and 1×1 convs, LRN, pools and the conv-ified head."""
    model = tiny_model(name)
    generator = torch.Generator().manual_seed(4)
    shapes = [(32, 32), (32, 45), (47, 32), (32, 63), (40, 40)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in shapes]
    target = (47, 64)
    batch = torch.cat([pad_to(image[None], target) for image in images])
    sizes = torch.tensor(shapes)
    with torch.no_grad():
        padded = dense_scores(model, preprocess(batch), sizes)
        alone = torch.cat([model.score_map(preprocess(image[None])).mean(dim=(2, 3)) for image in images])
        unmasked = dense_scores(model, preprocess(batch))
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked, alone, rtol=1e-3, atol=1e-3)  # padding without the mask would change them
    assert padded_shape((32, 45), 32) == (32, 64) and padded_shape((47, 32), 32) == (64, 32)
    assert padded_shape((40, 40), 32) == (40, 40) and padded_shape((32, 45), 1) == (32, 45)


@pytest.fixture(scope="module")
def mixed(preprocess):
    """MIXED's JPEGs and their per-image oracle posteriors, dense and multi-crop, at Q = 32 and 44."""
    model = tiny_model()
    images = [jpeg(w, h, seed=i) for i, (w, h) in enumerate(MIXED)]
    oracle = {}
    for q in (32, 44):
        views = [at_scale(decode_rgb(data, min_side=q), q=q) for data in images]
        oracle["dense", q] = torch.stack([softmax_dense(model, preprocess, view) for view in views]).numpy()
        oracle["multicrop", q] = torch.stack([softmax_crops(model, preprocess, view) for view in views]).numpy()
    return images, oracle


@pytest.mark.parametrize("mode, pad_multiple, batch_size, buffer_images, workers", [
    ("dense", 1, 4, 2048, 0),  # exact shapes only
    ("dense", 8, 6, 2048, 2),
    ("dense", 32, 4, 3, 0),  # a small buffer: groups leave before they are full
    ("dense+multicrop", 32, 64, 2048, 0),  # one padded batch per shape, padded to 64 views
])
@pytest.mark.parametrize("fixed_batches", [False, True])  # True: as on CUDA
def test_grouped_dense_posteriors_equal_the_per_image_oracle(preprocess, mixed, mode, pad_multiple, batch_size,
                                                             buffer_images, workers, fixed_batches):
    """Grouping images by padded shape before decoding, padding them (masked) and padding batches leaves every
    image's fp32 posteriors what the image alone gives, in the samples' order; multi-crop is unaffected."""
    images, oracle = mixed
    options = EvalOptions(mode=mode, scales=[32, 44], keep_scales=[44], batch_size=batch_size,
                          pad_multiple=pad_multiple, fixed_batches=fixed_batches, buffer_images=buffer_images,
                          workers=workers)
    result = score_samples(tiny_model(), samples_of(images), options, preprocess=preprocess)
    assert result.keys == [f"k{i}" for i in range(len(images))]
    assert list(result.labels) == [i % CLASSES for i in range(len(images))]
    parts = mode.split("+")
    at = {q: sum(oracle[part, q] for part in parts) / len(parts) for q in (32, 44)}
    np.testing.assert_allclose(result.probs, (at[32] + at[44]) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.at_scale(44).probs, at[44], rtol=1e-5, atol=1e-6)


def test_bf16_channels_last_padded_dense_stays_within_tolerance_of_the_fp32_oracle(preprocess, mixed):
    """bf16 autocast with channels_last on padded batches: every posterior within 0.02 (absolute) of the fp32
    per-image oracle, and the top-1 class unchanged where the oracle's margin exceeds that."""
    images, oracles = mixed
    options = EvalOptions(mode="dense", scales=[44], batch_size=8, precision="bf16", channels_last=True,
                          pad_multiple=32, fixed_batches=True)
    result = score_samples(tiny_model(), samples_of(images), options, preprocess=preprocess)
    oracle = oracles["dense", 44]
    assert result.meta["precision"] == "bf16"
    np.testing.assert_allclose(result.probs, oracle, atol=BF16_ATOL)
    assert not np.array_equal(result.probs, oracle)  # autocast really ran in bf16
    top2 = np.sort(oracle, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * BF16_ATOL
    assert clear.any()
    np.testing.assert_array_equal(result.probs[clear].argmax(axis=1), oracle[clear].argmax(axis=1))


BF16_ATOL = 0.02  # absolute, on softmax probabilities: bf16 keeps 8 bits of mantissa through 8+ layers


def test_multi_scale_is_the_mean_of_single_scales_and_keeps_them(preprocess):
    model = tiny_model()
    # 70×66 is decoded in the DCT at 1/2 for Q=32 but at full size for Q=48: each Q sees what a single-scale
    # pass at that Q sees. 40×33 and 50×60 are never reduced.
    samples = samples_of([jpeg(w, h, seed=i) for i, (w, h) in enumerate([(40, 33), (50, 60), (70, 66)])])
    options = dict(mode="dense+multicrop", batch_size=64, channels_last=True)
    multi = score_samples(model, samples, EvalOptions(scales=[32, 48], keep_scales=[48, 32], **options),
                          preprocess=preprocess)
    singles = [score_samples(model, samples, EvalOptions(scales=[q], **options), preprocess=preprocess)
               for q in (32, 48)]
    np.testing.assert_allclose(multi.probs, np.mean([s.probs for s in singles], axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(multi.probs.sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(singles[0].probs, singles[1].probs, atol=1e-3)  # the scales really differ
    assert multi.meta["scales"] == [32, 48] and multi.meta["mode"] == "dense+multicrop"
    for q, single in zip((32, 48), singles):  # Table 3 from Table 4's pass
        kept = multi.at_scale(q)
        np.testing.assert_allclose(kept.probs, single.probs, rtol=1e-5, atol=1e-6)
        assert kept.meta == single.meta and kept.keys == single.keys
    with pytest.raises(ConfigError, match="Q=40 px: no single-scale posteriors kept"):
        multi.at_scale(40)
    with pytest.raises(ConfigError, match=r"keep_scales: \[40\] must be among the test scales \[32, 48\]"):
        EvalOptions(scales=[32, 48], keep_scales=[40], **options)


def test_bf16_autocast_and_channels_last_stay_close_to_fp32(preprocess):
    samples = samples_of([jpeg(40, 36, seed=i) for i in range(2)])
    options = EvalOptions(mode="dense+multicrop", scales=[32])
    fp32 = score_samples(tiny_model(), samples, options, preprocess=preprocess)
    nhwc = score_samples(tiny_model(), samples, dataclasses.replace(options, channels_last=True), preprocess=preprocess)
    np.testing.assert_allclose(nhwc.probs, fp32.probs, rtol=1e-4, atol=1e-5)
    bf16 = score_samples(tiny_model(), samples, dataclasses.replace(options, precision="bf16"), preprocess=preprocess)
    assert bf16.meta["precision"] == "bf16" and fp32.meta["precision"] == "fp32"
    assert bf16.probs.dtype == np.float32
    np.testing.assert_allclose(bf16.probs, fp32.probs, atol=0.03)
    assert not np.array_equal(bf16.probs, fp32.probs)  # autocast really ran in bf16


def test_compute_posteriors_over_shards_saves_and_loads(shards, tmp_path):
    model = tiny_model()
    result = compute_posteriors(
        model, shards, "val", EvalOptions(mode="dense", scales=[32, 40], batch_size=4), progress=True,
        meta={"train_scale": scale_meta(ScaleRange(32, 48), kind="jitter")},
    )  # fmt: skip
    assert result.keys == [f"val_{i:05d}" for i in range(5)]
    assert list(result.labels) == [3, 1, 7, 0, 9]
    assert result.meta["config"] == "A" and result.meta["split"] == "val"
    assert result.meta["train_scale"] == {"label": "32-48", "s_min": 32, "s_max": 48, "kind": "jitter"}
    path = result.save(tmp_path / "sub" / "A.npz")
    loaded = Posteriors.load(path)
    assert loaded.keys == result.keys and loaded.meta == result.meta
    np.testing.assert_array_equal(loaded.probs, result.probs)
    np.testing.assert_array_equal(loaded.labels, result.labels)
    assert loaded.probs.dtype == np.float32 and loaded.labels.dtype == np.int64
    assert [p.name for p in path.parent.iterdir()] == ["A.npz"]  # no temporary file left behind


def test_bad_evaluation_input_is_a_one_line_error(shards, tmp_path):
    model = tiny_model()
    with pytest.raises(ConfigError, match="Q=24 px is smaller than the crop"):
        compute_posteriors(model, shards, "val", EvalOptions(mode="dense", scales=[24, 32]))
    with pytest.raises(ConfigError, match="unknown evaluation mode 'tencrop'"):
        EvalOptions(mode="tencrop", scales=[32])
    with pytest.raises(DataError, match="'train' has no images"):
        compute_posteriors(model, shards, "train", EvalOptions(mode="dense", scales=[32]))
    with pytest.raises(ConfigError, match="crop: 64 px, but VGG-A was built for 32 px crops"):
        compute_posteriors(model, shards, "val", EvalOptions(mode="multicrop", scales=[64], crop=64))
    with pytest.raises(DataError, match="model has 3 classes but the shards have 10"):
        compute_posteriors(tiny_model(classes=3), shards, "val", EvalOptions(mode="dense", scales=[32]))
    for bad, message in [
        (dict(scales=[]), "give at least one test scale Q"),
        (dict(batch_size=0), "grid, batch_size must be >= 1"),
        (dict(precision="fp16"), "precision: must be auto, fp32 or bf16, got 'fp16'"),
        (dict(pad_multiple=0), "pad_multiple, buffer_images: must be >= 1"),
        (dict(device="gpu7"), "device: not a torch device: 'gpu7'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            EvalOptions(**{"mode": "dense", "scales": [32], **bad})
    with pytest.raises(DataError, match="posteriors file not found"):
        Posteriors.load(tmp_path / "missing.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"corrupt\.npz: not a readable posteriors file"):
        Posteriors.load(tmp_path / "corrupt.npz")


def test_single_out_without_multi_scale_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [str(BIN / "vgg"), "evaluate", str(tmp_path / "model.pt"), "--shards", str(tmp_path), "--out",
         str(tmp_path / "out.npz"), "--single-out", str(tmp_path / "single.npz"), "--scales", "single"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --single-out: only with --scales multi (the single-scale Q is one of the three)"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda: this machine has no CUDA device; use cpu, or ray to evaluate on a GPU of the Ray cluster"),
    ("gpu", "--device: expected one of auto, cpu, cuda, ray, got 'gpu'"),
])
def test_an_unusable_device_is_a_one_line_error_before_any_work(tmp_path, device, message):
    result = subprocess.run(
        [str(BIN / "vgg"), "evaluate", str(tmp_path / "model.pt"), "--shards", str(tmp_path), "--out",
         str(tmp_path / "out.npz"), "--scales", "40", "--device", device],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert (result.returncode, result.stderr.strip()) == (2, f"error: {message}")


# Fusion -------------------------------------------------------------------------------------------------------


def posteriors(probs, *, keys=None, config="D", labels=None) -> Posteriors:
    probs = np.asarray(probs, dtype=np.float32)
    keys = keys or [f"k{i}" for i in range(len(probs))]
    labels = np.zeros(len(probs), dtype=np.int64) if labels is None else labels
    meta = {"config": config, "models": [config], "mode": "dense"}
    return Posteriors(keys=keys, labels=labels, probs=probs, meta=meta)


def test_fusion_is_the_mean_of_posteriors():
    a = posteriors([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], config="D")
    b = posteriors([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]], config="E")
    fused = fuse([a, b])
    np.testing.assert_allclose(fused.probs, [[0.4, 0.4, 0.2], [0.2, 0.2, 0.6]], rtol=1e-6)
    assert fused.meta["models"] == ["D", "E"] and fused.meta["config"] == "D+E" and fused.meta["mode"] == "dense"
    itself = fuse([a, a])
    np.testing.assert_array_equal(itself.probs, a.probs)
    assert itself.keys == a.keys


def test_fusion_of_a_model_with_itself_is_the_model(preprocess):
    model = tiny_model()
    samples = samples_of([jpeg(40, 36, seed=i) for i in range(3)])
    single = score_samples(model, samples, EvalOptions(mode="multicrop", scales=[32]), preprocess=preprocess)
    fused = fuse([single, single])
    np.testing.assert_allclose(fused.probs, single.probs, rtol=1e-6)
    assert errors(fused) == errors(single)


def test_fusion_of_mismatched_posteriors_names_the_files(tmp_path):
    a = posteriors([[0.5, 0.5], [0.2, 0.8]], keys=["x", "y"])
    b = posteriors([[0.5, 0.5], [0.2, 0.8]], keys=["x", "z"])
    a.save(tmp_path / "a.npz")
    b.save(tmp_path / "b.npz")
    with pytest.raises(DataError, match=r"a\.npz and .*b\.npz are not over the same images .*#1: 'y' vs 'z'"):
        fuse([Posteriors.load(tmp_path / "a.npz"), Posteriors.load(tmp_path / "b.npz")])
    with pytest.raises(DataError, match="2 vs 1 images"):
        fuse([a, posteriors([[0.5, 0.5]], keys=["x"])])
    with pytest.raises(DataError, match="probs"):
        fuse([a, posteriors([[0.5, 0.3, 0.2], [0.2, 0.4, 0.4]], keys=["x", "y"])])
    with pytest.raises(DataError, match="no posteriors"):
        fuse([])


# Metrics ------------------------------------------------------------------------------------------------------


def test_top_k_error_on_hand_made_posteriors():
    probs = np.array(
        [
            [0.50, 0.20, 0.10, 0.10, 0.05, 0.03, 0.02],  # label 0: top-1 hit
            [0.50, 0.20, 0.10, 0.10, 0.05, 0.03, 0.02],  # label 1: 2nd → top-1 miss, top-5 hit
            [0.50, 0.20, 0.10, 0.10, 0.05, 0.03, 0.02],  # label 6: 7th → top-5 miss
            [0.02, 0.03, 0.05, 0.10, 0.10, 0.20, 0.50],  # label 4: 4th (ties 0.10 with class 3, lower index first)
        ]
    )
    labels = np.array([0, 1, 6, 4])
    assert top_k_error(probs, labels, 1) == 75.0
    assert top_k_error(probs, labels, 3) == 50.0  # label 4 is 4th: class 3 wins the tie
    assert top_k_error(probs, labels, 5) == 25.0
    assert top_k_error(probs, labels, 7) == 0.0


def test_ties_are_broken_by_class_index():
    uniform = np.full((3, 10), 0.1)
    labels = np.array([0, 4, 5])
    assert top_k_error(uniform, labels, 1) == pytest.approx(100 * 2 / 3)  # only class 0 is first
    assert top_k_error(uniform, labels, 5) == pytest.approx(100 / 3)  # classes 0..4 are the top 5
    with pytest.raises(DataError, match="k must be in"):
        top_k_error(uniform, labels, 11)


def test_errors_reports_top1_and_top5():
    probs = np.eye(6)[[0, 1, 2, 3]] * 0.5 + 0.5 / 6
    p = posteriors(probs, labels=np.array([0, 1, 4, 3]))  # #2: class 4 is 5th (after 2, then 0, 1, 3 by index)
    assert errors(p) == {"top1_err": 25.0, "top5_err": 0.0}


# Model loading ------------------------------------------------------------------------------------------------


def test_torchvision_vgg11_weights_load_as_config_a(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.vgg11(weights=None).eval()
    path = tmp_path / "vgg11.pth"
    torch.save(reference.state_dict(), path)
    model = load_model(path, name="A")
    assert model.name == "A" and model.crop == 224 and model.num_classes == 1000 and not model.training
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
        np.testing.assert_allclose(model(x).numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
        # Dense evaluation of a 224 image is the same classifier (the FC ≡ conv identity at full size).
        np.testing.assert_allclose(model.score_map(x)[:, :, 0, 0].numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match="looks like torchvision VGG weights"):
        load_model(path)


def test_our_checkpoint_loads_with_its_own_model_config(tmp_path):
    trained = tiny_model("C")
    config = ModelConfig(num_classes=CLASSES, width=0.125, fc_width=64, crop=CROP, dropout=0.5, lrn="alexnet",
                         init="kaiming", warm_init="kaiming", init_std=0.01)  # fmt: skip
    payload = {
        "format": checkpoint.FORMAT, "config": "C", "model_config": dataclasses.asdict(config),
        "model": trained.state_dict(), "scale": {"s_min": 56, "s_max": 56},
        "profile": {"scales": {"low": {"s_min": 40, "s_max": 40}, "high": {"s_min": 56, "s_max": 56},
                               "jitter": {"s_min": 40, "s_max": 72}}},
    }  # fmt: skip
    path = tmp_path / "C.pt"
    checkpoint.save(path, payload)
    model = load_model(path, model_config=config)
    x = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))
    high = {"label": "56", "s_min": 56, "s_max": 56, "kind": "high"}
    assert checkpoint_meta(path) == {"config": "C", "train_scale": high}
    with pytest.raises(CheckpointError, match="model.crop=32 but the profile says 224"):
        load_model(path, model_config=dataclasses.replace(config, crop=224))
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt")
