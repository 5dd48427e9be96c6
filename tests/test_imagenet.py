"""The raw ILSVRC-2012 reader on real archives (the generated ones): labels as torchvision gives them, the same
samples from the extracted layout, and one clear DataError for each kind of bad input."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torchvision.datasets.imagenet as tv_imagenet

from vgg.config import SynthConfig
from vgg.data.imagenet import open_raw
from vgg.data.synthetic import synthesize
from vgg.errors import DataError

CONFIG = SynthConfig(classes=3, train_per_class=5, val_per_class=3, min_side=32, max_side=56, seed=11)
TRAIN, VAL, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
TRUTH = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw") / "raw"
    synthesize(out, CONFIG)
    return out


def copy_raw(raw: Path, to: Path) -> Path:
    to.mkdir()
    for name in (TRAIN, VAL, DEVKIT):
        shutil.copyfile(raw / name, to / name)
    return to


def samples(path: Path, split: str) -> list[tuple]:
    return [(image.key, image.name, image.label, image.wnid, image.data) for image in open_raw(path).iter_split(split)]


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_reader_indexes_the_archives_in_sorted_order_with_sorted_wnid_labels(raw):
    dataset = open_raw(raw)
    assert dataset.layout == {"train": TRAIN, "val": VAL, "devkit": DEVKIT}
    assert list(dataset.classes) == sorted(dataset.classes) and len(dataset.classes) == CONFIG.classes
    assert dataset.names[0] == "tench, Tinca tinca"
    assert dataset.counts == {"train": 15, "val": 9}
    train = dataset.refs("train")
    assert [(r.wnid, r.name) for r in train] == sorted((r.wnid, r.name) for r in train)
    assert all(r.label == dataset.classes.index(r.wnid) and r.name.startswith(r.wnid) for r in train)
    val = dataset.refs("val")
    assert [r.name for r in val] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 10)]
    assert [r.key for r in val] == [r.name[:-5] for r in val]
    assert {r.label for r in val} == {0, 1, 2}
    first = next(dataset.iter_split("train"))
    assert first.data == dataset.read(train[0]) and first.data[:2] in (b"\xff\xd8", b"\x89P")


def test_labels_agree_with_torchvision_imagenet(raw, tmp_path, monkeypatch):
    """torchvision.datasets.ImageNet on a copy of the archives (it extracts them); only its MD5 check is bypassed."""
    root = copy_raw(raw, tmp_path / "tv")
    monkeypatch.setattr(tv_imagenet, "_verify_archive", lambda *args, **kwargs: None)
    ours = open_raw(raw)
    for split in ("train", "val"):
        theirs = tv_imagenet.ImageNet(str(root), split=split)
        assert {Path(path).stem: label for path, label in theirs.samples} == {r.key: r.label for r in ours.refs(split)}
        assert theirs.wnids == list(ours.classes)

    # What torchvision left behind (train/nXXX/, val/nXXX/ folders) is an accepted extracted layout too.
    for name in (TRAIN, VAL):
        (root / name).unlink()
    assert open_raw(root).layout == {"train": "train/", "val": "val/", "devkit": DEVKIT}
    for split in ("train", "val"):
        assert samples(root, split) == samples(raw, split)


def test_extracted_layout_gives_the_same_samples_as_the_archives(raw, tmp_path):
    root = tmp_path / "extracted"
    (root / "val").mkdir(parents=True)
    for inner_name, inner in tar_members(raw / TRAIN):
        folder = root / "train" / inner_name[: -len(".tar")]
        folder.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
            for member in tar:
                (folder / member.name).write_bytes(tar.extractfile(member).read())
    for name, data in tar_members(raw / VAL):
        (root / "val" / name).write_bytes(data)
    with tarfile.open(raw / DEVKIT) as tar:
        for member in tar:
            if member.isreg():
                (root / member.name).parent.mkdir(parents=True, exist_ok=True)
                (root / member.name).write_bytes(tar.extractfile(member).read())
    (root / "train" / ".DS_Store").write_bytes(b"hidden files are ignored")
    assert open_raw(root).layout == {"train": "train/", "val": "val/", "devkit": "ILSVRC2012_devkit_t12/"}
    for split in ("train", "val"):
        assert samples(root, split) == samples(raw, split)

    # RAW assembled from links to a shared copy: the parts directly under RAW may be links (not what is inside them).
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("train", "val", "ILSVRC2012_devkit_t12"):
        (linked / name).symlink_to(root / name, target_is_directory=True)
    for split in ("train", "val"):
        assert samples(linked, split) == samples(raw, split)


@pytest.mark.parametrize("make, message", [
    (lambda path: path / "nothing-here", "does not exist"),
    (lambda path: path, "no ILSVRC-2012 data in"),
    (lambda path: (path / "file.txt").write_text("x") and path / "file.txt", "is not a directory"),
])
def test_missing_or_empty_directory_names_the_expected_files(tmp_path, make, message):
    with pytest.raises(DataError, match=message) as error:
        open_raw(make(tmp_path))
    assert "ILSVRC2012_img_train.tar" in str(error.value) and "\n" not in str(error.value)


def test_incomplete_directory_names_what_is_missing(raw, tmp_path):
    root = copy_raw(raw, tmp_path / "raw")
    (root / VAL).unlink()
    with pytest.raises(DataError, match=r"missing ILSVRC2012_img_val\.tar \(or val/\)"):
        open_raw(root)


@pytest.mark.parametrize("cut", ["mid-member", "at-a-header"])
def test_truncated_train_archive(raw, tmp_path, cut):
    root = copy_raw(raw, tmp_path / "raw")
    data = (raw / TRAIN).read_bytes()
    with tarfile.open(raw / TRAIN) as tar:
        second = tar.getmembers()[1]
    end = second.offset + 600 if cut == "mid-member" else second.offset  # a cut between members too
    (root / TRAIN).write_bytes(data[:end])
    with pytest.raises(DataError, match=r"ILSVRC2012_img_train\.tar is truncated"):
        open_raw(root).refs("train")


def test_not_a_tar(raw, tmp_path):
    root = copy_raw(raw, tmp_path / "raw")
    (root / VAL).write_bytes(b"<html>404 Not Found</html>" * 40)
    with pytest.raises(DataError, match=r"ILSVRC2012_img_val\.tar is not a tar archive"):
        open_raw(root).refs("val")
    (root / VAL).write_bytes(b"")
    with pytest.raises(DataError, match=r"ILSVRC2012_img_val\.tar is empty"):
        open_raw(root).refs("val")
    (root / DEVKIT).write_bytes((raw / DEVKIT).read_bytes()[:500])
    with pytest.raises(DataError, match=r"ILSVRC2012_devkit_t12\.tar\.gz is truncated or corrupt"):
        open_raw(root).classes


def test_ground_truth_count_must_match_the_val_images(raw, tmp_path):
    root = copy_raw(raw, tmp_path / "raw")
    members = tar_members(raw / DEVKIT)
    members = [(name, b"".join(data.splitlines(keepends=True)[:-1]) if name == TRUTH else data) for name, data in members]
    with tarfile.open(root / DEVKIT, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"ground truth .* lists 8 val labels but ILSVRC2012_img_val\.tar holds 9 images"):
        open_raw(root).refs("val")


@pytest.mark.parametrize("inner, message", [
    ("goldfish.tar", r"'goldfish\.tar' in ILSVRC2012_img_train\.tar is not named after a WNID"),
    ("n00015388.tar", r"WNID n00015388 is not a leaf class"),  # "animal": an internal synset of meta.mat
    ("n09999999.tar", r"WNID n09999999 is not a leaf class"),
])
def test_inner_tar_must_be_a_leaf_wnid(raw, tmp_path, inner, message):
    root = copy_raw(raw, tmp_path / "raw")
    members = tar_members(raw / TRAIN)
    write_tar(root / TRAIN, [(inner, members[0][1]), *members[1:]])
    with pytest.raises(DataError, match=message):
        open_raw(root).classes


@pytest.mark.parametrize("name", ["../n01440764.tar", "/etc/n01440764.tar", "./../../x.tar"])
def test_member_paths_escaping_the_archive_are_refused(raw, tmp_path, name):
    root = copy_raw(raw, tmp_path / "raw")
    members = tar_members(raw / TRAIN)
    write_tar(root / TRAIN, [(name, members[0][1]), *members[1:]])
    with pytest.raises(DataError, match=r"refusing member .* absolute path or '\.\.'"):
        open_raw(root).classes
    assert not (tmp_path / "n01440764.tar").exists()


def test_dotdot_inside_an_inner_tar_is_refused(raw, tmp_path):
    root = copy_raw(raw, tmp_path / "raw")
    members = tar_members(raw / TRAIN)
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as tar:
        info = tarfile.TarInfo("../../evil.JPEG")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    write_tar(root / TRAIN, [(members[0][0], inner.getvalue()), *members[1:]])
    with pytest.raises(DataError, match=r"refusing member '\.\./\.\./evil\.JPEG' of ILSVRC2012_img_train\.tar:n0"):
        open_raw(root).classes
