"""Bad inputs and faults where the user meets them, through the `vgg` binary: each refusal is exit status 2 and one
`error:` line that says what to change, and loses nothing; each file ingest cannot use is skipped, listed in
index.json and named in the summary line, and the ingest goes on. Real files throughout: JPEG, PNG, EPS and TIFF
written with Pillow, tar archives, symbolic links, FIFOs, truncated and bit-flipped shards, a full and a read-only
file system (tmpfs, mounted when the tests run as root). docs/errors.md lists every case and its line."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import BIN, ROOT
from vgg.config import SynthConfig
from vgg.data.synthetic import synthesize

CONFIG = SynthConfig(classes=3, train_per_class=8, val_per_class=3, min_side=32, max_side=64, seed=5)
TRAIN, VAL, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
META = "ILSVRC2012_devkit_t12/data/meta.mat"


def vgg(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vgg"), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run ended with status 2 and exactly one `error:` line, the last one on stderr (a progress bar may come
    before it), holding every fragment; no traceback. Returns the line."""
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def ingest(raw: Path, out: Path, *extra: str, params: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return vgg("ingest", raw, "--out", out, "--workers", "1", "--params", params, *extra, env=env)


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("archives") / "raw"
    synthesize(out, CONFIG, workers=1)
    return out


def extract(archives: Path, root: Path) -> Path:
    """The extracted layout of `archives`: train/nXXXXXXXX/*.JPEG, val/*.JPEG, and the devkit archive."""
    with tarfile.open(archives / TRAIN) as outer:
        for inner_member in outer:
            with tarfile.open(fileobj=outer.extractfile(inner_member)) as inner:
                folder = root / "train" / inner_member.name[: -len(".tar")]
                folder.mkdir(parents=True)
                for member in inner:
                    (folder / member.name).write_bytes(inner.extractfile(member).read())
    (root / "val").mkdir()
    with tarfile.open(archives / VAL) as val:
        for member in val:
            (root / "val" / member.name).write_bytes(val.extractfile(member).read())
    shutil.copyfile(archives / DEVKIT, root / DEVKIT)
    return root


def copy_archives(archives: Path, root: Path) -> Path:
    root.mkdir(parents=True)
    for name in (TRAIN, VAL, DEVKIT):
        shutil.copyfile(archives / name, root / name)
    return root


def index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) claims `width` x `height`: what a decompression bomb looks like."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), (200, 30, 30)), "JPEG"))
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@contextlib.contextmanager
def tmpfs(path: Path, *, size: str, read_only: bool = False):
    """A real small file system at `path` (tmpfs), unmounted afterwards; the test is skipped where mounting is not
    allowed (not root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(directory: Path, leave: int) -> Path:
    """Fill the file system of `directory` until about `leave` bytes are free; returns the filler file."""
    filler = directory / "filler"
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    filler.write_bytes(bytes(max(0, free - leave)))
    return filler


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".vgg-probe"))


# ---- ingest: files Pillow must not decode, or cannot; decoders and caps -----------------------------------------


def test_files_ingest_cannot_use_are_skipped_listed_and_named(archives, tmp_path, tiny_params):
    """One extracted train class gets nine bad files named .JPEG; the ingest finishes (status 0) without them, lists
    each with its reason in index.json, names them in the summary line, and never runs another decoder (a `gs` on
    PATH would leave a mark) nor lets libjpeg print to stderr."""
    root = extract(archives, tmp_path / "raw")
    folder = sorted((root / "train").iterdir())[0]
    wnid = folder.name
    picture = Image.new("RGB", (40, 30), (20, 120, 220))
    png = encoded(picture, "PNG")
    tail = png.index(b"IEND") - 4
    sparse = folder / f"{wnid}_90009.JPEG"
    bad = {
        f"{wnid}_90001.JPEG": (encoded(picture, "EPS"), "not a JPEG or PNG file (it begins b'%!PS-Ado"),
        f"{wnid}_90002.JPEG": (encoded(picture, "TIFF"), "not a JPEG or PNG file"),
        f"{wnid}_90003.JPEG": (encoded(picture, "BMP"), "not a JPEG or PNG file"),
        # A real PNG, valid CRCs, whose iCCP chunk after the image data lacks its compression byte: Pillow's decoder
        # raises IndexError, not one of the exception types the ingest used to expect.
        f"{wnid}_90004.JPEG": (png[:tail] + png_chunk(b"iCCP", b"icc\x00") + png[tail:], "IndexError"),
        f"{wnid}_90005.JPEG": (jpeg_claiming(9000, 8000), "9000x8000 px, over the cap of 67108864 pixels"),
        f"{wnid}_90006.JPEG": (jpeg_claiming(10000, 10000), "DecompressionBombWarning"),  # Pillow's own cap, kept on
        f"{wnid}_90007.JPEG": (jpeg_claiming(60000, 60000), "DecompressionBombError"),
        f"{wnid}_90008.JPEG": (encoded(Image.new("RGB", (70000, 2), (9, 9, 9)), "PNG"), "too large to re-encode as JPEG"),
    }
    for name, (data, _) in bad.items():
        (folder / name).write_bytes(data)
    with open(sparse, "wb") as file:  # over the per-file byte cap; sparse, so the test writes nothing
        file.truncate(129 * 2**20)
    bad[sparse.name] = (b"", "over the per-file cap of 134217728 (MAX_FILE_BYTES)")
    marker = tmp_path / "ghostscript-ran"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (fake / "gs").chmod(0o755)

    out = tmp_path / "out"
    result = ingest(root, out, params=tiny_params, env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists(), "a non-JPEG/PNG decoder ran (Ghostscript for EPS)"
    assert "Maximum supported image dimension" not in result.stderr and "Traceback" not in result.stderr
    reasons = {item["name"]: item["reason"] for item in index(out)["skipped"]}
    assert set(reasons) == set(bad)
    for name, (_, why) in bad.items():
        assert why in reasons[name], (name, reasons[name])
    summary = result.stdout.strip().splitlines()[-1]
    assert "9 skipped: " in summary and "and 4 more, reasons in" in summary and f"{wnid}_90001.JPEG" in summary
    assert index(out)["splits"]["train"]["count"] == 24  # every good image is in


def test_a_split_with_no_usable_image_is_one_line(archives, tmp_path, tiny_params):
    root = extract(archives, tmp_path / "raw")
    for path in (root / "val").iterdir():
        path.write_bytes(encoded(Image.new("RGB", (40, 30)), "TIFF"))
    out = tmp_path / "out"
    one_error(ingest(root, out, params=tiny_params), f"no images left in val of {root}: all 9 were skipped, e.g. "
              "ILSVRC2012_val_00000001.JPEG (cannot decode: not a JPEG or PNG file")
    assert sorted(p.name for p in out.iterdir()) == [".ingest.lock"] and (out / ".ingest.lock").read_bytes() == b""


# ---- ingest: the extracted layout -------------------------------------------------------------------------------


def test_links_and_special_files_inside_the_layout_are_refused(archives, tmp_path, tiny_params):
    root = extract(archives, tmp_path / "raw")
    folder = sorted((root / "train").iterdir())[0]
    secret = tmp_path / "elsewhere.JPEG"
    secret.write_bytes((next(folder.iterdir())).read_bytes())
    link = folder / f"{folder.name}_90001.JPEG"
    link.symlink_to(secret)
    out = tmp_path / "out"
    one_error(ingest(root, out, params=tiny_params),
              f"train/{folder.name}/{link.name} is a symbolic link; links inside train/ and val/ are not followed")
    link.unlink()
    (root / "train" / "n99999999").symlink_to(folder, target_is_directory=True)  # a linked class folder
    one_error(ingest(root, out, params=tiny_params), "train/n99999999 is a symbolic link")
    (root / "train" / "n99999999").unlink()
    os.mkfifo(root / "val" / "ILSVRC2012_val_00000010.JPEG")  # opening it would wait for a writer forever
    one_error(ingest(root, out, params=tiny_params), "val/ILSVRC2012_val_00000010.JPEG is a FIFO, not a regular "
              "file or folder; remove it")
    assert not out.exists()  # refused before anything was created


def test_a_special_file_in_place_of_an_archive_is_refused(archives, tmp_path, tiny_params):
    root = copy_archives(archives, tmp_path / "raw")
    (root / VAL).unlink()
    os.mkfifo(root / VAL)
    one_error(ingest(root, tmp_path / "out", params=tiny_params),
              f"{root / VAL} is not a regular file or a directory (a FIFO)")
    (root / VAL).unlink()
    (root / VAL).symlink_to("/dev/zero")
    one_error(ingest(root, tmp_path / "out", params=tiny_params), "(a character device)")
    (root / VAL).unlink()
    (root / VAL).symlink_to(tmp_path / "not-there.tar")
    one_error(ingest(root, tmp_path / "out", params=tiny_params), "is a symbolic link to", "which does not exist")
    (root / VAL).unlink()
    (root / VAL).symlink_to(archives / VAL)  # a link to a real archive (a shared copy, say) is fine
    assert ingest(root, tmp_path / "out", params=tiny_params).returncode == 0


# ---- ingest: the devkit ----------------------------------------------------------------------------------------


def with_meta(archives: Path, root: Path, meta: bytes) -> Path:
    """A copy of the archives whose devkit holds `meta` as data/meta.mat."""
    copy_archives(archives, root)
    with tarfile.open(archives / DEVKIT) as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar]
    with tarfile.open(root / DEVKIT, "w:gz") as tar:
        for member, data in members:
            if member.name == META:
                data = meta
                member.size = len(meta)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return root


def real_meta(archives: Path) -> bytes:
    with tarfile.open(archives / DEVKIT) as tar:
        return tar.extractfile(META).read()


@pytest.mark.parametrize("case, fragment", [
    ("garbage", "is not a readable MAT file (ValueError: Unknown mat file type"),
    ("truncated", "is not a readable MAT file"),
    ("hdf5", "is a MAT v7.3 (HDF5) file, which is not read"),
    ("no-synsets", "holds no 'synsets' variable"),
    ("numbers", "lacks synset fields ILSVRC2012_ID, WNID, words, num_children"),
])
def test_a_corrupt_or_unsupported_devkit_is_one_line(archives, tmp_path, tiny_params, case, fragment):
    import scipy.io

    meta = real_meta(archives)
    if case == "garbage":
        meta = b"<html>503 Service Unavailable</html>" * 10
    elif case == "truncated":
        meta = meta[: len(meta) // 3]
    elif case == "hdf5":  # what MATLAB's -v7.3 writes: the v5 text header, version 0x0200, then HDF5
        meta = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + bytes(8) + b"\x00\x02IM"
        meta += b"\x89HDF\r\n\x1a\n" + bytes(512)
    else:
        buffer = io.BytesIO()
        scipy.io.savemat(buffer, {"synsets" if case == "numbers" else "leaves": np.arange(5)})
        meta = buffer.getvalue()
    root = with_meta(archives, tmp_path / "raw", meta)
    line = one_error(ingest(root, tmp_path / "out", params=tiny_params), f"{DEVKIT}:data/meta.mat", fragment)
    assert "expected the ILSVRC-2012 devkit's meta.mat (a MAT v5 file with a 'synsets' struct array)" in line


# ---- ingest: the output directory ------------------------------------------------------------------------------


def test_a_second_ingest_into_the_same_out_is_refused_while_one_runs(archives, tmp_path, tiny_params):
    """This test holds OUT's lock as a running `vgg ingest` does (flock on OUT/.ingest.lock, its pid recorded)."""
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".ingest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(json.dumps({"pid": os.getpid()}))
        lock.flush()
        one_error(ingest(archives, out, params=tiny_params),
                  f"another `vgg ingest` (pid {os.getpid()}) is using {out}; wait for it to finish, or choose another OUT")
        assert sorted(p.name for p in out.iterdir()) == [".ingest.lock"]
    assert ingest(archives, out, params=tiny_params).returncode == 0  # once it is released


def test_two_ingests_at_once_leave_one_complete_output(archives, tmp_path, tiny_params):
    """Two real `vgg ingest` into one OUT, started together: whatever the interleaving, each either succeeds or
    is refused by the lock in one line, and OUT ends complete and verified."""
    from vgg.data.shard_format import read_index

    out = tmp_path / "out"
    command = [str(BIN / "vgg"), "ingest", str(archives), "--out", str(out), "--workers", "1", "--params", str(tiny_params)]
    runs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    assert any(code == 0 for code, _, _ in results)
    for code, _, stderr in results:
        assert code == 0 or (code == 2 and stderr.strip().splitlines()[-1].startswith("error: another `vgg ingest`"))
    read_index(out, verify=True)


def test_files_the_project_did_not_write_are_never_replaced_or_deleted(archives, tmp_path, tiny_params):
    out = tmp_path / "out"
    out.mkdir()
    foreign = b"someone else's tar"
    (out / "train-000000.tar").write_bytes(foreign)
    one_error(ingest(archives, out, params=tiny_params), f"{out} is not empty and not an ingest output (e.g. "
              "'train-000000.tar'); choose an empty or new OUT, or pass overwrite (--overwrite)")
    one_error(ingest(archives, out, "--overwrite", params=tiny_params),
              f"{out / 'train-000000.tar'} would be replaced, but no index.json or ingest record of {out} lists them "
              "(not written by `vgg ingest` there), so they are not touched; move them away or choose another OUT")
    assert sorted(p.name for p in out.iterdir()) == [".ingest.lock", "train-000000.tar"]
    assert (out / "train-000000.tar").read_bytes() == foreign

    (out / "train-000000.tar").rename(tmp_path / "moved.tar")
    assert ingest(archives, out, params=tiny_params).returncode == 0  # 24 train images at 16 per shard: 2 shards
    (out / "train-000099.tar").write_bytes(foreign)  # a shard-named file beside a complete output
    result = ingest(archives, out, "--overwrite", "--set", "data.shard_size=5", params=tiny_params)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "train-000099.tar").read_bytes() == foreign  # not listed by the old index: left alone
    result = ingest(archives, out, "--overwrite", "--set", "data.shard_size=16", params=tiny_params)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "train-000004.tar").exists()  # the project's own shard of the old output is gone
    assert (out / "train-000099.tar").read_bytes() == foreign


@pytest.mark.parametrize("damage", ["bit flip", "truncated"])
def test_a_damaged_shard_is_noticed_and_rewritten_by_ingest(archives, tmp_path, tiny_params, damage):
    out = tmp_path / "out"
    assert ingest(archives, out, params=tiny_params).returncode == 0
    shard = out / "train-000001.tar"
    good = shard.read_bytes()
    if damage == "bit flip":
        shard.write_bytes(good[:2000] + bytes([good[2000] ^ 1]) + good[2001:])
        why = "rewritten because train-000001.tar does not match its sha256 in index.json (damaged)"
    else:
        shard.write_bytes(good[: len(good) // 2])
        why = f"rewritten because train-000001.tar has {len(good) // 2} bytes, not the {len(good)} recorded"
    result = ingest(archives, out, params=tiny_params)
    assert result.returncode == 0 and why in result.stdout, result.stdout + result.stderr[-2000:]
    assert shard.read_bytes() == good
    assert "up to date" in ingest(archives, out, params=tiny_params).stdout


# ---- training and evaluation on damaged shards ------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_file(tiny_params, tmp_path_factory) -> Path:
    """A real (untrained) `vgg train` output of the tiny profile: what `vgg evaluate` reads."""
    from pipelines.params import load_profile
    from vgg.models import checkpoint, from_config

    profile = load_profile(tiny_params)
    model = from_config("A", profile.model, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("model") / "A-low.pt"
    header = checkpoint.header(config="A", profile=profile, scale=profile.scale("low"))
    checkpoint.save(path, checkpoint.final({**header, "model": model.state_dict()}))
    return path


@pytest.mark.parametrize("damage", ["bit flip", "truncated"])
def test_evaluate_names_a_damaged_shard_in_one_line(tiny_shards, checkpoint_file, tiny_params, tmp_path, damage):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    shard = shards / "val-000001.tar"
    data = shard.read_bytes()
    if damage == "bit flip":  # inside a JPEG: would decode to wrong pixels, silently
        shard.write_bytes(data[:3000] + bytes([data[3000] ^ 0x10]) + data[3001:])
        fragment = f"{shard}: damaged shard: its sha256"
    else:
        shard.write_bytes(data[: len(data) - 1536])
        fragment = f"{shard}: damaged shard: {len(data) - 1536} bytes, index.json says {len(data)}"
    out = tmp_path / "A.npz"
    result = vgg("evaluate", checkpoint_file, "--shards", shards, "--out", out, "--device", "cpu",
                 "--params", tiny_params)
    one_error(result, fragment, f"re-run `vgg ingest RAW {shards}` (it rewrites damaged shards)")
    assert not out.exists()


# ---- outputs: vgg synth and vgg report ------------------------------------------------------------------------


def test_synth_into_a_read_only_or_unusable_location_is_one_line(tmp_path, tiny_params):
    with tmpfs(tmp_path / "ro", size="1M", read_only=True) as ro:
        result = vgg("synth", ro / "raw", "--params", tiny_params)
        one_error(result, f"cannot write OUT {ro / 'raw'}: Read-only file system; choose a location you can write to")
        assert result.stderr.count("\n") == 1 and not list(ro.iterdir())
    (tmp_path / "file").write_text("not a directory")
    one_error(vgg("synth", tmp_path / "file", "--params", tiny_params),
              f"OUT {tmp_path / 'file'} exists and is not a directory; choose a directory")


def test_synth_on_a_full_disk_leaves_nothing_and_succeeds_once_space_is_freed(tmp_path, tiny_params):
    with tmpfs(tmp_path / "disk", size="2M") as disk:
        filler = fill(disk, leave=96 * 1024)  # room for the probe, not for the archives
        result = vgg("synth", disk / "raw", "--params", tiny_params)
        one_error(result, f"cannot write {disk / 'raw'}/ILSVRC2012_img_", "No space left on device; free space there")
        assert list((disk / "raw").iterdir()) == []  # no archive, no temporary file
        filler.unlink()
        result = vgg("synth", disk / "raw", "--params", tiny_params)
        assert result.returncode == 0, result.stderr[-2000:]
        assert sorted(p.name for p in (disk / "raw").iterdir()) == sorted([TRAIN, VAL, DEVKIT])


@pytest.fixture()
def results(tmp_path) -> Path:
    from vgg.evaluate.results import Posteriors

    directory = tmp_path / "results"
    directory.mkdir()
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), 64).astype(np.float32)
    meta = {"config": "A", "models": ["A"], "mode": "dense", "scales": [40],
            "train_scale": {"label": "40", "s_min": 40, "s_max": 40, "kind": "low"}}
    Posteriors(keys=[f"k{i}" for i in range(64)], labels=rng.integers(0, 4, 64), probs=probs, meta=meta).save(
        directory / "A.npz")
    return directory


def report(results: Path, out: Path, tiny_params: Path) -> subprocess.CompletedProcess:
    return vgg("report", results, "--out", out, "--no-show", "--no-track", "--params", tiny_params)


def test_report_into_a_read_only_location_is_one_line(results, tmp_path, tiny_params):
    with tmpfs(tmp_path / "ro", size="1M", read_only=True) as ro:
        result = report(results, ro / "report", tiny_params)
        one_error(result, f"cannot write --out {ro / 'report'}: Read-only file system")
        assert result.stderr.count("\n") == 1


def test_report_on_a_full_disk_is_one_line_and_succeeds_once_space_is_freed(results, tmp_path, tiny_params):
    with tmpfs(tmp_path / "disk", size="1M") as disk:
        (disk / "report").mkdir()
        filler = fill(disk, leave=0)
        one_error(report(results, disk / "report", tiny_params),
                  f"cannot write --out {disk / 'report'}: No space left on device; free space there")
        assert temporaries(disk) == [] and list((disk / "report").iterdir()) == []
        filler.unlink()
        filler = fill(disk, leave=40 * 1024)  # the probe passes; a plot does not fit
        one_error(report(results, disk / "report", tiny_params), f"cannot write {disk / 'report'}/",
                  "No space left on device; free space there")
        assert temporaries(disk) == []
        filler.unlink()
        result = report(results, disk / "report", tiny_params)
        assert result.returncode == 0, result.stderr[-2000:]
        assert {"report.md", "metrics.json"} <= {p.name for p in (disk / "report").iterdir()}


# ---- weights ---------------------------------------------------------------------------------------------------


def small_torchvision_vgg11(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """torchvision's vgg11 state_dict with a narrow head (4 classes, FC width 8; the conv layers are full size, as
    torchvision's), in `dtype`."""
    import torchvision

    state = torchvision.models.vgg11(weights=None, num_classes=4).state_dict()
    state["classifier.0.weight"], state["classifier.0.bias"] = state["classifier.0.weight"][:8], state["classifier.0.bias"][:8]
    state["classifier.3.weight"], state["classifier.3.bias"] = state["classifier.3.weight"][:8, :8], state["classifier.3.bias"][:8]
    state["classifier.6.weight"] = state["classifier.6.weight"][:, :8]
    return {key: value.to(dtype) for key, value in state.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_torchvision_weights_are_cast_to_float32(tmp_path, dtype):
    from vgg.models.io import load_model

    torch.manual_seed(0)
    state = small_torchvision_vgg11(dtype)
    torch.save(state, tmp_path / "vgg11.pth")
    torch.save({key: value.float() for key, value in state.items()}, tmp_path / "vgg11-fp32.pth")
    model, reference = load_model(tmp_path / "vgg11.pth", name="A"), load_model(tmp_path / "vgg11-fp32.pth", name="A")
    assert all(p.dtype == torch.float32 for p in model.state_dict().values())
    for (key, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), key  # exact: float32 holds every fp16 and bf16 value
    with torch.no_grad():
        assert model(torch.rand(1, 3, 224, 224)).dtype == torch.float32


def test_integer_torchvision_weights_are_one_line(tmp_path, tiny_shards):
    torch.save(small_torchvision_vgg11(torch.int8), tmp_path / "vgg11-int8.pth")
    out = tmp_path / "tv.npz"
    result = vgg("evaluate", tmp_path / "vgg11-int8.pth", "--torchvision", "A", "--scales", "224", "--shards",
                 tiny_shards, "--out", out, "--device", "cpu")
    one_error(result, "the torchvision weights hold features.0.weight as torch.int8, not floating point (quantized?); "
              "use the float weights of torchvision's vgg11")
    assert not out.exists()
