"""The reading side of the shard contract, on real JPEGs in real WebDataset tars (written with
`webdataset.TarWriter`): index/stats parsing, rank × worker splitting, epoch seeding, exact mid-epoch resume,
validation batches, `Preprocess`, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vgg.config import ScaleRange
from vgg.data.batch import Batch
from vgg.data.batch_buffers import POOL, BatchBuffers, Leased
from vgg.data.loader import Batches, batches_per_epoch, train_batches, val_batches
from vgg.data.preprocessing import ALPHA_STD, Preprocess
from vgg.data.samples import iter_samples
from vgg.data.shard_format import ColourStats, read_index, read_stats
from vgg.data.transforms import CentreCrop
from vgg.errors import ConfigError, DataError

SCALE = ScaleRange(40, 56)
CROP = 32
STATS = {
    "count": 100,
    "mean_rgb": [123.5, 116.25, 103.75],
    "eigval": [60.0, 12.0, 3.0],
    "eigvec": [[-0.58, -0.81, 0.05], [-0.58, 0.36, -0.73], [-0.57, 0.47, 0.68]],
}


def jpeg(seed: int) -> tuple[bytes, tuple[int, int]]:
    """A small smooth RGB JPEG of varied size and aspect (smallest side 36–80 px)."""
    rng = np.random.default_rng(seed)
    short, long = int(rng.integers(36, 81)), int(rng.integers(80, 110))
    size = (long, short) if seed % 2 else (short, long)
    cells = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    image = Image.fromarray(cells).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue(), size


def write_shards(root: Path, splits: dict[str, list[int]], *, classes: int | None = None) -> Path:
    """A shards directory per the contract: split → shard sample counts. Sample i of a split (in index order)
    has key `{split}_{i:05d}` and label i (so labels identify samples) unless `classes` is given (then i % classes)."""
    root.mkdir(parents=True, exist_ok=True)
    total = max(sum(counts) for counts in splits.values())
    classes = classes or total
    index = {
        "format": 1,
        "classes": [f"n{i:08d}" for i in range(classes)],
        "names": [f"class {i}" for i in range(classes)],
        "max_side": 110,
        "source": {"kind": "test"},
        "splits": {},
        "converted": [],
        "skipped": [],
    }
    for split, counts in splits.items():
        entries, i = [], 0
        for number, count in enumerate(counts):
            file = f"{split}-{number:06d}.tar"
            with wds.TarWriter(str(root / file), mtime=0) as writer:
                for _ in range(count):
                    data, size = jpeg(hash((split, i)) % 10_000)
                    label = i % classes
                    writer.write({
                        "__key__": f"{split}_{i:05d}",
                        "jpg": data,
                        "cls": str(label).encode(),
                        "json": json.dumps({"wnid": f"n{label:08d}", "source": f"{split}_{i:05d}.JPEG",
                                            "size": list(size)}).encode(),
                    })
                    i += 1
            digest = hashlib.sha256((root / file).read_bytes()).hexdigest()
            entries.append({"file": file, "count": count, "sha256": digest})
        index["splits"][split] = {"count": sum(counts), "shards": entries}
    (root / "index.json").write_text(json.dumps(index))
    (root / "stats.json").write_text(json.dumps(STATS))
    return root


def break_jpeg(shards: Path, file: str, key: str) -> None:
    """Overwrite the first bytes of one sample's JPEG (same length: only the JPEG is broken) and record the new
    sha256, as if ingest had written the bad JPEG: the loader's own decode error is what is tested."""
    tar = shards / file
    data = tar.read_bytes()
    at = data.index(b"\xff\xd8\xff", data.index(f"{key}.jpg".encode()))
    tar.write_bytes(data[:at] + b"\x00" * 4 + data[at + 4 :])
    index = json.loads((shards / "index.json").read_text())
    for entry in index["splits"]["train"]["shards"]:
        if entry["file"] == file:
            entry["sha256"] = hashlib.sha256(tar.read_bytes()).hexdigest()
    (shards / "index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # 48 train samples in 5 uneven shards; 23 val samples in 3 shards.
    return write_shards(tmp_path_factory.mktemp("shards"), {"train": [10, 7, 13, 8, 10], "val": [9, 9, 5]})


def epoch(shards: Path, **overrides) -> list[Batch]:
    args = dict(scale=SCALE, crop=CROP, batch_size=4, rank=0, world_size=1, workers=0, epoch=0, seed=7)
    args.update(overrides)
    return list(train_batches(shards, **args))


def epoch_iter(shards: Path) -> Batches:
    """An epoch's batches through two workers, not yet iterated."""
    return train_batches(shards, scale=SCALE, crop=CROP, batch_size=4, rank=0, world_size=1, workers=2, epoch=3, seed=7)


def by_label(batches: list[Batch]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {int(label): (batch.images[i], batch.colour[i]) for batch in batches for i, label in enumerate(batch.labels)}


def test_index_stats_and_samples_follow_the_contract(shards):
    index = read_index(shards, verify=True)
    assert index.split("train").count == 48 and [s.count for s in index.split("train").shards] == [10, 7, 13, 8, 10]
    assert index.split("val").shards[0].path == shards / "val-000000.tar"
    assert index.classes[3] == "n00000003"
    stats = read_stats(shards)
    assert stats.mean_rgb == tuple(STATS["mean_rgb"]) and stats.count == STATS["count"]  # exact: float64 as written
    assert [len(row) for row in stats.eigvec] == [3, 3, 3] and stats.eigvec[1][2] == -0.73
    samples = list(iter_samples(shards, "val"))
    assert [s.key for s in samples] == [f"val_{i:05d}" for i in range(23)]
    assert [s.label for s in samples] == list(range(23))
    first = samples[0]
    assert Image.open(io.BytesIO(first.jpeg)).size == tuple(first.meta["size"])
    assert first.meta["wnid"] == "n00000000"


def test_every_sample_once_across_two_ranks_and_two_workers(shards):
    ranks = [epoch(shards, rank=rank, world_size=2, workers=2) for rank in range(2)]
    index = read_index(shards)
    assert batches_per_epoch(index, batch_size=4, world_size=2) == 6
    assert [len(batches) for batches in ranks] == [6, 6]
    loader = train_batches(shards, scale=SCALE, crop=CROP, batch_size=4, rank=1, world_size=2, workers=2, epoch=0,
                           seed=7)
    assert len(loader) == 6
    labels = [int(label) for batches in ranks for batch in batches for label in batch.labels]
    assert sorted(labels) == list(range(48))  # 48 = 2 ranks × 6 batches × 4: every sample exactly once
    batch = ranks[0][0]
    assert batch.images.shape == (4, 3, CROP, CROP) and batch.images.dtype == torch.uint8
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.labels.dtype == torch.int64 and batch.colour.shape == (4, 3) and batch.colour.dtype == torch.float32


def test_indivisible_counts_give_equal_disjoint_ranks(shards):
    # 48 samples over 3 ranks of 5-image batches: 16 per rank → 3 batches each; 1 sample per rank dropped.
    ranks = [epoch(shards, rank=rank, world_size=3, workers=2, batch_size=5) for rank in range(3)]
    assert [len(batches) for batches in ranks] == [3, 3, 3]
    labels = [int(label) for batches in ranks for batch in batches for label in batch.labels]
    assert len(labels) == len(set(labels)) == 45


def test_augmentation_does_not_depend_on_the_layout(shards):
    single = by_label(epoch(shards))
    split = {}
    for rank in range(2):
        split.update(by_label(epoch(shards, rank=rank, world_size=2, workers=2)))
    assert split.keys() == single.keys()
    for label, (image, colour) in single.items():
        assert torch.equal(split[label][0], image) and torch.equal(split[label][1], colour)


def test_epochs_are_seeded(shards):
    first, again = epoch(shards, workers=2, epoch=1), epoch(shards, workers=2, epoch=1)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.colour, b.colour)
    other = epoch(shards, workers=2, epoch=2)
    order = [int(label) for batch in first for label in batch.labels]
    assert order != [int(label) for batch in other for label in batch.labels]
    one, two = by_label(first), by_label(other)
    assert not torch.equal(one[5][0], two[5][0]) and not torch.equal(one[5][1], two[5][1])
    assert order != [int(label) for batch in epoch(shards, workers=2, epoch=1, seed=8) for label in batch.labels]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_start_batch_resumes_exactly(shards, workers):
    full = epoch(shards, workers=workers, epoch=3)
    assert len(full) == 12
    for start in (1, 5, 11, 12):
        resumed = list(train_batches(shards, scale=SCALE, crop=CROP, batch_size=4, rank=0, world_size=1,
                                     workers=workers, epoch=3, seed=7, start_batch=start))
        assert len(resumed) == 12 - start
        for a, b in zip(full[start:], resumed, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_colour_alpha_is_normal_with_std_0_1(tmp_path):
    shards = write_shards(tmp_path / "many", {"train": [100, 100, 100, 100]}, classes=10)
    alphas = torch.cat([batch.colour for batch in epoch(shards, batch_size=50)])
    assert alphas.shape == (400, 3)
    assert alphas.mean().abs() < 0.02 and abs(alphas.std().item() - ALPHA_STD) < 0.015


def test_val_batches_cover_every_sample_once(shards):
    ranks = [list(val_batches(shards, q=48, crop=CROP, batch_size=4, rank=rank, world_size=2, workers=2))
             for rank in range(2)]
    assert [len(b) for b in ranks] == [3, 3]  # 11 and 12 samples: 4+4+3 and 4+4+4
    assert len(val_batches(shards, q=48, crop=CROP, batch_size=4, rank=0, world_size=2, workers=2)) == 3
    labels = [int(label) for batches in ranks for batch in batches for label in batch.labels]
    assert sorted(labels) == list(range(23))
    expected = {s.label: CentreCrop(q=48, crop=CROP)(s.jpeg) for s in iter_samples(shards, "val")}
    for batch in (b for batches in ranks for b in batches):
        assert torch.count_nonzero(batch.colour) == 0
        for image, label in zip(batch.images, batch.labels):
            assert torch.equal(image, expected[int(label)])


def test_workers_refill_an_image_buffer_only_once_nothing_views_it(shards):
    # Workers build batches in pooled shared-memory buffers (12 batches, 2 workers, a pool of 4 each) and refill one
    # only after the consuming process has given it back. What every consumer sees: the batches as a consumer that
    # copies each one on arrival sees them, whether it drops each batch at once, keeps every batch (the pools run
    # out: one-off buffers), or keeps every other one.
    def copied(batch: Batch) -> Batch:
        return Batch(*(tensor.clone() for tensor in batch))

    arrived = [copied(batch) for batch in epoch_iter(shards)]
    kept = list(epoch_iter(shards))
    every_other = [batch if i % 2 else copied(batch) for i, batch in enumerate(epoch_iter(shards))]
    for consumer in (kept, every_other):
        for a, b in zip(arrived, consumer, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(arrived) == 12

    # The workers' side: what they ship names the pooled slot; slots given back are refilled.
    batches = epoch_iter(shards)
    in_use = batches._buffers.renew()
    shipped = []
    for item in batches._loader:
        assert isinstance(item, Leased) and 0 <= item.slot < POOL
        shipped.append(((item.worker, item.slot), copied(item.batch)))
        BatchBuffers.give_back(item, in_use)
    assert len({slot for slot, _ in shipped}) < len(shipped)
    for a, (_, b) in zip(arrived, shipped, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b))

    # Two iterations of one loader at once, each with its own workers: one that drops its batches gives back only its
    # own workers' buffers, never those that the other (which keeps its batches) still holds.
    batches = epoch_iter(shards)
    first = iter(batches)
    kept = [next(first)]
    for _ in batches:  # the second iteration, to its end
        pass
    kept += list(first)
    for a, b in zip(arrived, kept, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_forked_workers_inherit_the_jpeg_decoder(shards):
    # Each epoch forks new loader workers: a decoder loaded only inside them would cost every epoch a load of it
    # (torchvision's import: ~2.5 s on 2 cores). The loader loads it in its own process first (here, a fresh
    # interpreter): libturbojpeg, or torchvision where libturbojpeg is missing.
    script = (
        "import sys\n"
        "from vgg.config import ScaleRange\n"
        "from vgg.data import turbojpeg\n"
        "from vgg.data.loader import train_batches\n"
        "assert 'torchvision' not in sys.modules and turbojpeg.decoder.cache_info().currsize == 0\n"
        f"batches = train_batches({str(shards)!r}, scale=ScaleRange(40, 56), crop=32, batch_size=4, rank=0, "
        "world_size=1, workers=1, epoch=0, seed=0)\n"
        "assert turbojpeg.decoder.cache_info().currsize == 1\n"
        "assert ('torchvision' in sys.modules) == (turbojpeg.decoder() is None)\n"
        "assert len(list(batches)) == 12\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[1])


def test_preprocess_subtracts_the_mean_exactly_and_keeps_channels_last():
    stats = ColourStats(mean_rgb=torch.tensor(STATS["mean_rgb"]), eigval=torch.tensor(STATS["eigval"]),
                        eigvec=torch.tensor(STATS["eigvec"]))
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    out = Preprocess(stats)(images)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, images.float() - stats.mean_rgb.view(1, 3, 1, 1))
    alpha = torch.tensor([[0.1, -0.2, 0.05], [0.0, 0.0, 0.0]])
    shifted = Preprocess(stats)(images, alpha)
    offset = stats.eigvec @ (alpha[0] * stats.eigval / 255)  # AlexNet's [0, 1]-scale offset, in 0–255 units
    assert torch.allclose(shifted[0], out[0] + offset.view(3, 1, 1), atol=1e-4)
    assert torch.equal(shifted[1], out[1])


def test_pca_shift_has_the_alexnet_covariance():
    # AlexNet lighting on [0, 1] pixels, in 0–255 units: offset = eigvec @ (alpha · λ₂₅₅ / 255), alpha ~ N(0, 0.1)
    # → Cov = V diag((0.1·λ₂₅₅/255)²) Vᵀ.
    eigvec = torch.linalg.qr(torch.tensor(STATS["eigvec"], dtype=torch.float64))[0].float()
    stats = ColourStats(mean_rgb=torch.zeros(3), eigval=torch.tensor(STATS["eigval"]), eigvec=eigvec)
    alpha = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(0)) * ALPHA_STD
    offsets = Preprocess(stats)(torch.zeros(20_000, 3, 1, 1, dtype=torch.uint8), alpha)[:, :, 0, 0]
    expected = eigvec @ torch.diag((ALPHA_STD * stats.eigval / 255) ** 2) @ eigvec.T
    assert torch.allclose(torch.cov(offsets.T), expected, atol=0.03 * expected.abs().max().item())


def test_missing_or_corrupt_inputs_give_one_line_data_errors(tmp_path, shards):
    def message(call) -> str:
        with pytest.raises(DataError) as error:
            call()
        text = str(error.value)
        assert "\n" not in text
        return text

    assert "does not exist" in message(lambda: read_index(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "index.json is missing" in message(lambda: read_index(tmp_path / "empty"))
    assert "vgg ingest" in message(lambda: read_stats(tmp_path / "empty"))
    broken = write_shards(tmp_path / "broken", {"train": [4], "val": [2]})
    (broken / "index.json").write_text('{"format": 1, "classes": [')
    assert "corrupt JSON" in message(lambda: train_batches(broken, scale=SCALE, crop=CROP, batch_size=2, rank=0,
                                                           world_size=1, workers=0, epoch=0, seed=0))
    (broken / "stats.json").write_text(json.dumps({**STATS, "eigvec": [[1, 0], [0, 1]]}))
    assert "'eigvec' must be 3x3" in message(lambda: read_stats(broken))

    bad = write_shards(tmp_path / "bad", {"train": [4, 4], "val": [2]})
    tar = bad / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[: 4 * 1024])  # cut short: fewer samples than the index says
    assert "sha256" in message(lambda: read_index(bad, verify=True))
    text = message(lambda: list(train_batches(bad, scale=SCALE, crop=CROP, batch_size=2, rank=0, world_size=1,
                                              workers=2, epoch=0, seed=0)))
    assert "train-000001.tar" in text and "vgg ingest" in text
    tar.unlink()
    assert "is missing" in message(lambda: read_index(bad))
    index = read_index(shards)
    assert "fewer than batch_size" in message(lambda: batches_per_epoch(index, batch_size=25, world_size=2))
    with pytest.raises(DataError, match="no split 'test'"):
        list(iter_samples(shards, "test"))
    with pytest.raises(ConfigError, match="start_batch"):
        epoch(shards, start_batch=13)


def test_reads_what_vgg_ingest_writes(tmp_path):
    from vgg.config import SynthConfig
    from vgg.data.ingest import ingest
    from vgg.data.synthetic import synthesize

    config = SynthConfig(classes=3, train_per_class=12, val_per_class=4, min_side=48, max_side=120, seed=0)
    synthesize(tmp_path / "raw", config)
    ingest(tmp_path / "raw", tmp_path / "out", max_side=72, shard_size=8, workers=1)
    index = read_index(tmp_path / "out", verify=True)
    assert index.split("train").count == 36 and len(index.classes) == 3
    assert read_stats(tmp_path / "out").eigval[0] >= read_stats(tmp_path / "out").eigval[2] > 0
    ranks = [list(train_batches(tmp_path / "out", scale=ScaleRange(40, 72), crop=CROP, batch_size=6, rank=rank,
                                world_size=2, workers=2, epoch=0, seed=0)) for rank in range(2)]
    assert [len(batches) for batches in ranks] == [3, 3]
    labels = Counter(int(label) for batches in ranks for batch in batches for label in batch.labels)
    assert sum(labels.values()) == 36 and set(labels) == {0, 1, 2}
    samples = list(iter_samples(tmp_path / "out", "val"))
    assert len(samples) == 12 and samples[0].key == "ILSVRC2012_val_00000001"
    assert sum(len(b.labels) for b in val_batches(tmp_path / "out", q=56, crop=CROP, batch_size=5, workers=2)) == 12


def test_resume_does_not_decode_skipped_samples(tmp_path):
    # One sample's JPEG is garbage: the uninterrupted epoch fails at the batch holding it; resuming after that
    # batch succeeds, so the skipped samples were read but never decoded.
    shards = write_shards(tmp_path / "s", {"train": [12, 12]})
    break_jpeg(shards, "train-000001.tar", "train_00015")
    args = dict(scale=SCALE, crop=CROP, batch_size=4, rank=0, world_size=1, workers=0, epoch=0, seed=1)
    good = []
    with pytest.raises(DataError, match="train_00015"):
        for batch in train_batches(shards, **args):
            good.append(batch)
    rest = list(train_batches(shards, **args, start_batch=len(good) + 1))
    assert len(good) + 1 + len(rest) == 6
    assert 15 not in {int(label) for batch in good + rest for label in batch.labels}


@pytest.mark.parametrize("workers", [0, 2])
def test_device_decode_makes_the_same_batches(shards, workers):
    # `decode_device` (here the CPU: libjpeg-turbo, float resampling) moves the decode and crop out of the
    # workers; the per-sample draws are the same, so labels and alphas are equal and crops agree to rounding.
    cpu = torch.device("cpu")
    on_host = epoch(shards, workers=workers)
    on_device = epoch(shards, workers=workers, decode_device=cpu)
    assert len(on_device) == len(on_host) == 12
    for host, device in zip(on_host, on_device):
        assert torch.equal(device.labels, host.labels) and torch.equal(device.colour, host.colour)
        assert device.images.dtype == torch.uint8 and device.images.shape == host.images.shape
        assert device.images.is_contiguous(memory_format=torch.channels_last)
        difference = (device.images.int() - host.images.int()).abs()
        assert difference.float().mean() < 0.5 and difference.max() <= 8
    resumed = epoch(shards, workers=workers, decode_device=cpu, start_batch=5)
    assert all(torch.equal(a.images, b.images) for a, b in zip(resumed, on_device[5:], strict=True))


def test_device_decode_stops_its_thread_and_reports_bad_jpegs_in_one_line(tmp_path, shards):
    cpu = torch.device("cpu")

    def decoding() -> list[threading.Thread]:
        return [thread for thread in threading.enumerate() if thread.name == "device-decode"]

    for batch in train_batches(shards, scale=SCALE, crop=CROP, batch_size=4, rank=0, world_size=1, workers=1,
                               epoch=0, seed=0, decode_device=cpu):
        assert decoding()
        break  # the consumer stops early: the decode thread must not be left behind
    assert not decoding()
    broken = write_shards(tmp_path / "s", {"train": [8]})
    break_jpeg(broken, "train-000000.tar", "train_00005")
    with pytest.raises(DataError, match="cannot decode a JPEG") as error:
        list(train_batches(broken, scale=SCALE, crop=CROP, batch_size=4, rank=0, world_size=1, workers=1, epoch=0,
                           seed=0, decode_device=cpu))
    assert "\n" not in str(error.value)
    assert not decoding()


def test_verify_checks_the_sample_count(tmp_path):
    shards = write_shards(tmp_path / "s", {"train": [5, 4]})
    index = json.loads((shards / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["count"] = 6
    index["splits"]["train"]["count"] = 10
    (shards / "index.json").write_text(json.dumps(index))
    read_index(shards)  # counts are only checked against the tars when verifying (that reads every byte)
    with pytest.raises(DataError, match="holds 5 samples, the index says 6"):
        read_index(shards, verify=True)


def test_pca_shift_matches_alexnet_on_the_unit_scale():
    # Oracle: the widely used ImageNet lighting constants are given for pixels in [0, 1] (eigenvalues 0.2175,
    # 0.0188, 0.0045). The same statistics on our 0–255 scale have eigenvalues 255² times larger; the shift we add
    # must be exactly 255 × the unit-scale shift — a few grey levels, not hundreds.
    unit_eigval = torch.tensor([0.2175, 0.0188, 0.0045])
    eigvec = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
    stats = ColourStats(mean_rgb=torch.zeros(3), eigval=unit_eigval * 255**2, eigvec=eigvec)
    alpha = torch.tensor([[0.1, -0.1, 0.1]])
    shifted = Preprocess(stats)(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), alpha)[0, :, 0, 0]
    assert torch.allclose(shifted, 255 * (eigvec @ (alpha[0] * unit_eigval)), rtol=1e-5)
    assert shifted.abs().max() < 10  # grey levels


def test_a_damaged_shard_is_named_before_any_batch(tmp_path):
    """A bit flipped inside a JPEG (the shard keeps its size and may still decode): every reader checks the sha256
    recorded at ingest before reading, and names the shard in one line. A shard cut short is named from its
    recorded size by `read_index` itself (a stat)."""
    shards = write_shards(tmp_path / "s", {"train": [6, 6, 6, 6], "val": [5, 5]})
    for split, file in (("train", "train-000002.tar"), ("val", "val-000001.tar")):
        tar = shards / file
        data = tar.read_bytes()
        at = data.index(b"\xff\xd8\xff") + 700  # inside the first JPEG's data
        tar.write_bytes(data[:at] + bytes([data[at] ^ 0x08]) + data[at + 1 :])
    args = dict(scale=SCALE, crop=CROP, batch_size=2, workers=0, epoch=0, seed=0)
    with pytest.raises(DataError, match=r"train-000002\.tar: damaged shard: its sha256 .* re-run `vgg ingest RAW"):
        train_batches(shards, rank=0, world_size=1, **args)  # before the first batch: when the epoch is set up
    # Two ranks share the hashing: rank 0 checks shards 0 and 2, rank 1 shards 1 and 3.
    with pytest.raises(DataError, match=r"train-000002\.tar: damaged shard"):
        train_batches(shards, rank=0, world_size=2, **args)
    train_batches(shards, rank=1, world_size=2, **args)  # its share is intact; rank 0's error ends the whole run
    with pytest.raises(DataError, match=r"val-000001\.tar: damaged shard") as error:
        val_batches(shards, q=40, crop=CROP, batch_size=4)
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match=r"val-000001\.tar: damaged shard"):
        next(iter_samples(shards, "val"))

    index = json.loads((shards / "index.json").read_text())
    for entry in index["splits"]["val"]["shards"]:
        entry["bytes"] = (shards / entry["file"]).stat().st_size
    (shards / "index.json").write_text(json.dumps(index))
    tar = shards / "val-000000.tar"
    tar.write_bytes(tar.read_bytes()[:-2048])
    with pytest.raises(DataError, match=rf"val-000000\.tar: damaged shard: {tar.stat().st_size} bytes, index\.json "
                                        rf"says {tar.stat().st_size + 2048} \(truncated or overwritten\)"):
        read_index(shards)
