"""Ingest: raw archives → WebDataset shards + index.json + stats.json, checked against the raw reader and the
webdataset library; determinism, conversions, skips, re-runs, refusals and a real write failure."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vgg.config import SynthConfig
from vgg.data.imagenet import open_raw
from vgg.data.ingest import ingest
from vgg.data.synthetic import synthesize
from vgg.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = SynthConfig(classes=3, train_per_class=8, val_per_class=3, min_side=32, max_side=64, seed=5)
MAX_SIDE, SHARD_SIZE = 48, 5
ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("raw") / "raw"
    return out, synthesize(out, CONFIG).quirks


@pytest.fixture(scope="module")
def shards(raw, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("shards") / "out"
    return out, ingest(raw[0], out, max_side=MAX_SIDE, shard_size=SHARD_SIZE, workers=1)


def index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def read_split(out: Path, split: str) -> list[dict]:
    """Samples as the webdataset library reads them, in index order."""
    urls = [str(out / shard["file"]) for shard in index(out)["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_round_trip_counts_keys_labels_and_bytes(raw, shards):
    raw_dir, _ = raw
    out, report = shards
    dataset = open_raw(raw_dir)
    meta = index(out)
    assert meta["format"] == 1 and meta["classes"] == list(dataset.classes) and meta["names"] == list(dataset.names)
    assert meta["max_side"] == MAX_SIDE and meta["skipped"] == []
    assert report.counts == {"train": 24, "val": 9} and not report.up_to_date
    assert report.shards == {"train": 5, "val": 2}  # ⌈24/5⌉, ⌈9/5⌉ shards, sizes differing by at most one
    assert [s["count"] for s in meta["splits"]["train"]["shards"]] == [5, 5, 5, 5, 4]
    for split in ("train", "val"):
        raw_images = {image.key: image for image in dataset.iter_split(split)}
        samples = read_split(out, split)
        assert meta["splits"][split]["count"] == len(samples) == len(raw_images)
        assert {s["__key__"] for s in samples} == set(raw_images)
        for shard in meta["splits"][split]["shards"]:
            assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
        for sample in samples:
            source = raw_images[sample["__key__"]]
            info = json.loads(sample["json"])
            assert int(sample["cls"].decode("ascii")) == source.label
            assert info["wnid"] == source.wnid == meta["classes"][source.label] and info["source"] == source.name
            original = Image.open(io.BytesIO(source.data))
            stored = Image.open(io.BytesIO(sample["jpg"]))
            assert info["size"] == list(original.size)
            assert stored.format == "JPEG" and stored.mode == "RGB"
            if min(original.size) > MAX_SIDE:
                assert min(stored.size) == MAX_SIDE and abs(stored.size[0] / stored.size[1] - original.size[0] / original.size[1]) < 0.05
            elif original.format == "JPEG" and original.mode == "RGB":
                assert sample["jpg"] == source.data  # kept as downloaded
    val_keys = [s["__key__"] for s in read_split(out, "val")]
    assert val_keys == sorted(val_keys)  # val in file-name order
    train_labels = [int(s["cls"]) for s in read_split(out, "train")]
    assert train_labels != sorted(train_labels)  # train shuffled once, so shards mix classes


def test_quirks_are_converted_to_rgb_jpeg_and_listed(raw, shards):
    _, quirks = raw
    out, report = shards
    converted = {item["name"]: item["reason"] for item in index(out)["converted"]}
    assert set(converted) == set(quirks) and report.converted == len(quirks)
    for name, kind in quirks.items():
        assert {"png": "PNG file, not a JPEG", "cmyk": "CMYK JPEG", "gray": "grayscale JPEG"}[kind] in converted[name]


def test_stats_match_the_stored_training_pixels(shards):
    out, _ = shards
    stats = json.loads((out / "stats.json").read_text())
    pixels = np.concatenate([
        np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), np.float64)[::4, ::4].reshape(-1, 3)
        for s in read_split(out, "train")
    ])
    assert stats["count"] == 24
    np.testing.assert_allclose(stats["mean_rgb"], pixels.mean(0), rtol=1e-12)
    covariance = np.cov(pixels.T, bias=True)
    eigval = np.linalg.eigvalsh(covariance)
    np.testing.assert_allclose(stats["eigval"], eigval[::-1], rtol=1e-9)  # descending
    vectors = np.array(stats["eigvec"])  # column j belongs to eigval[j]
    np.testing.assert_allclose(vectors @ np.diag(stats["eigval"]) @ vectors.T, covariance, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(3), atol=1e-9)


def test_output_is_byte_identical_for_identical_input(raw, shards, tmp_path):
    """Another synth of the same config (byte-identical archives) ingested with 2 workers: same bytes everywhere."""
    out, _ = shards
    again = tmp_path / "raw"
    synthesize(again, CONFIG)
    for name in ARCHIVES:
        assert (again / name).read_bytes() == (raw[0] / name).read_bytes()
    second = tmp_path / "out"
    ingest(again, second, max_side=MAX_SIDE, shard_size=SHARD_SIZE, workers=2)
    assert (second / "index.json").read_bytes() == (out / "index.json").read_bytes()
    assert (second / "stats.json").read_bytes() == (out / "stats.json").read_bytes()
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (second / name).read_bytes() == (out / name).read_bytes(), name


def test_rerun_with_the_same_input_is_a_noop(raw, shards):
    out, _ = shards
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    report = ingest(raw[0], out, max_side=MAX_SIDE, shard_size=SHARD_SIZE, workers=1)
    assert report.up_to_date and report.counts == {"train": 24, "val": 9}
    assert "up to date" in report.summary()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_out_with_a_different_input_is_refused_unless_overwrite(raw, shards, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(shards[0], out)
    with pytest.raises(DataError, match=r"already holds shards made with max_side 48 \(now 40\).*overwrite"):
        ingest(raw[0], out, max_side=40, shard_size=SHARD_SIZE, workers=1)
    other = tmp_path / "other-raw"
    synthesize(other, SynthConfig(**{**CONFIG.__dict__, "seed": 6}))
    with pytest.raises(DataError, match="already holds shards of different raw images"):
        ingest(other, out, max_side=MAX_SIDE, shard_size=SHARD_SIZE, workers=1)

    report = ingest(raw[0], out, max_side=MAX_SIDE, shard_size=12, workers=1, overwrite=True)
    assert report.shards == {"train": 2, "val": 1} and not report.up_to_date
    assert sorted(p.name for p in out.iterdir()) == [  # the old output's extra shards are gone
        ".ingest.lock", "index.json", "stats.json", "train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert (out / ".ingest.lock").read_bytes() == b""  # nothing left to recover


def test_out_with_foreign_files_is_refused(raw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("do not touch")
    with pytest.raises(DataError, match=r"not empty and not an ingest output \(e\.g\. 'thesis\.tex'\)"):
        ingest(raw[0], out, max_side=MAX_SIDE, shard_size=SHARD_SIZE, workers=1)
    ingest(raw[0], out, max_side=MAX_SIDE, shard_size=SHARD_SIZE, workers=1, overwrite=True)
    assert (out / "thesis.tex").read_text() == "do not touch" and (out / "index.json").exists()


def test_undecodable_image_is_skipped_and_listed(raw, tmp_path):
    """An extracted layout where one train JPEG is cut short and one val file is not an image at all."""
    root = tmp_path / "raw"
    with tarfile.open(raw[0] / ARCHIVES[0]) as outer:
        for inner_member in outer:
            with tarfile.open(fileobj=outer.extractfile(inner_member)) as inner:
                for member in inner:
                    path = root / "train" / inner_member.name[:-4] / member.name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(inner.extractfile(member).read())
    with tarfile.open(raw[0] / ARCHIVES[1]) as val:
        for member in val:
            (root / "val").mkdir(exist_ok=True)
            (root / "val" / member.name).write_bytes(val.extractfile(member).read())
    shutil.copyfile(raw[0] / ARCHIVES[2], root / ARCHIVES[2])
    victim = next(p for p in sorted((root / "train").rglob("*.JPEG")) if Image.open(p).format == "JPEG")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (root / "val" / "ILSVRC2012_val_00000002.JPEG").write_bytes(b"not an image at all")

    out = tmp_path / "out"
    report = ingest(root, out, max_side=MAX_SIDE, shard_size=SHARD_SIZE, workers=1)
    skipped = {item["name"]: item["reason"] for item in index(out)["skipped"]}
    assert set(skipped) == {victim.name, "ILSVRC2012_val_00000002.JPEG"} and report.skipped == 2
    assert all(reason.startswith("cannot decode: ") for reason in skipped.values())
    assert report.counts == {"train": 23, "val": 8} and index(out)["splits"]["train"]["count"] == 23
    assert victim.stem not in {s["__key__"] for s in read_split(out, "train")}


def test_extracted_and_archive_inputs_give_the_same_shards(raw, shards, tmp_path):
    root = tmp_path / "raw"
    (root / "val").mkdir(parents=True)
    with tarfile.open(raw[0] / ARCHIVES[0]) as outer:
        for inner_member in outer:
            with tarfile.open(fileobj=outer.extractfile(inner_member)) as inner:
                (root / "train" / inner_member.name[:-4]).mkdir(parents=True)
                for member in inner:
                    (root / "train" / inner_member.name[:-4] / member.name).write_bytes(inner.extractfile(member).read())
    with tarfile.open(raw[0] / ARCHIVES[1]) as val:
        for member in val:
            (root / "val" / member.name).write_bytes(val.extractfile(member).read())
    shutil.copyfile(raw[0] / ARCHIVES[2], root / ARCHIVES[2])
    out = tmp_path / "out"
    ingest(root, out, max_side=MAX_SIDE, shard_size=SHARD_SIZE, workers=1)
    assert (out / "index.json").read_bytes() == (shards[0] / "index.json").read_bytes()


FAILING_INGEST = """
import resource, signal, sys
from vgg.data.ingest import ingest
from vgg.errors import DataError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
try:
    ingest(sys.argv[1], sys.argv[2], max_side=int(sys.argv[4]), shard_size=5, workers=int(sys.argv[5]), overwrite=True)
except DataError as error:
    print(error)
    sys.exit(3)
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_write_publishes_nothing_and_keeps_the_previous_output(raw, shards, tmp_path, workers):
    """A real write failure (file-size limit: the kernel refuses the write, as with a full disk) while replacing a
    complete output: DataError, no temporary files left, the previous output intact."""
    out = tmp_path / "out"
    shutil.copytree(shards[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    limit = 2 * 1024  # bytes: smaller than any shard
    result = subprocess.run(
        [sys.executable, "-c", FAILING_INGEST, str(raw[0]), str(out), str(limit), "40", str(workers)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert "no space left while writing" in result.stdout and "nothing was published" in result.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder, no temp file, no change


def test_a_killed_run_is_recovered_from_its_record_and_nothing_else_is_touched(raw, shards, tmp_path):
    """What a run killed while publishing leaves (as `_publish` orders it): its staging folder, the new shards moved
    in, no index.json, and the lock file's record of both. The next run removes exactly what is recorded."""
    out = tmp_path / "out"
    shutil.copytree(shards[0], out)
    (out / "index.json").unlink()
    staging = out / ".ingest-4242-0123abcd"
    staging.mkdir()
    (staging / "val-000001.tar").write_bytes(b"half written")
    (out / "train-000007.tar").write_bytes(b"moved in before the kill")
    (out / ".ingest.lock").write_text(json.dumps({"pid": 4242, "staging": staging.name, "files": [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar", "train-000004.tar",
        "train-000007.tar", "val-000000.tar", "val-000001.tar"]}))
    (out / ".ingest-not-ours").mkdir()  # the project's prefix, but not recorded: never removed
    report = ingest(raw[0], out, max_side=MAX_SIDE, shard_size=SHARD_SIZE, workers=1, overwrite=True)
    assert not report.up_to_date and report.counts == {"train": 24, "val": 9}
    assert not staging.exists() and not (out / "train-000007.tar").exists() and (out / ".ingest-not-ours").is_dir()
    assert (out / ".ingest.lock").read_bytes() == b""
    for name in ("index.json", "stats.json", *(f"train-{i:06d}.tar" for i in range(5)), "val-000000.tar"):
        assert (out / name).read_bytes() == (shards[0] / name).read_bytes(), name


def test_a_second_ingest_is_refused_while_the_lock_is_held(raw, shards, tmp_path):
    """The lock is held for the whole run, including the up-to-date check: a second ingest is refused at once."""
    import fcntl

    out = tmp_path / "out"
    shutil.copytree(shards[0], out)
    with open(out / ".ingest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(DataError, match=rf"another `vgg ingest` is using {out}; wait for it to finish"):
            ingest(raw[0], out, max_side=MAX_SIDE, shard_size=SHARD_SIZE, workers=1)
    assert ingest(raw[0], out, max_side=MAX_SIDE, shard_size=SHARD_SIZE, workers=1).up_to_date
