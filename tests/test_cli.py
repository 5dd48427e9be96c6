"""The `vgg` entry point: exit statuses, one-line errors, and its fast exit that still runs every exit handler."""

import subprocess
import sys

from tests.conftest import BIN, ROOT


def test_exit_now_runs_exit_handlers_and_threads_then_exits_with_the_status():
    script = (
        "import atexit, sys, threading, time\n"
        "from pipelines.cli import exit_now\n"
        "atexit.register(lambda: print('handler ran', flush=False))\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), print('thread finished', flush=False))).start()\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "ThreadPoolExecutor(1).submit(print, end='')  # an idle pool left open must not hang the exit\n"
        "sys.stdout.write('buffered, not flushed')\n"
        "exit_now(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stdout == "buffered, not flushedthread finished\nhandler ran\n"


def test_user_errors_are_one_line_and_status_2(tmp_path):
    missing = tmp_path / "missing.npz"
    result = subprocess.run([str(BIN / "vgg"), "fuse", str(missing), "--out", str(tmp_path / "out.npz")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    expected = f"error: {missing}: posteriors file not found; create it with `vgg evaluate ... --out {missing}`\n"
    assert result.stderr == expected
    usage = subprocess.run([str(BIN / "vgg"), "no-such-command"], capture_output=True, text=True)
    assert usage.returncode == 2 and "No such command 'no-such-command'" in usage.stderr
    assert subprocess.run([str(BIN / "vgg"), "--help"], capture_output=True, text=True).returncode == 0


def test_ingest_without_raw_names_the_directory_a_generated_profile_needs(tmp_path):
    # The small profile generates its data (data.raw is ""): without RAW, ingest must not read the current directory.
    result = subprocess.run([str(BIN / "vgg"), "ingest", "--out", str(tmp_path / "shards")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == (f"error: RAW: profile small sets no data.raw; pass the directory to read, e.g. `vgg synth "
                             f"data/small/raw` then `vgg ingest data/small/raw --out {tmp_path / 'shards'}`\n")
    assert not (tmp_path / "shards").exists()


BAD_PARAMS = {  # --set value → the one line `vgg` prints (after "error: profiles.small.")
    "train.lr=.nan": "train.lr: must be a finite number, got nan",
    "train.lr=-.inf": "train.lr: must be a finite number, got -inf",
    "train.momentum=.inf": "train.momentum: must be a finite number, got inf",
    "train.seed=-1": "train.seed: must be in [0, 2^32) (numpy's and torch's seeds), got -1",
    "synth.seed=4294967296": "synth.seed: must be in [0, 2^32) (numpy's and torch's seeds), got 4294967296",
    "scales.high.s_max=100000": "scales.high.s_max: must be <= 4096 (px; the paper's largest S is 512), got 100000",
    "eval.q_offset=99999": "eval.q_offset: must be <= 4096 (px), got 99999",
    "model.width=1000": "model.width: must be <= 4 (x the paper's conv widths), got 1000.0",
    "model.fc_width=1000000": "model.fc_width: must be <= 16384 (4x the paper's 4096), got 1000000",
    "train.lr=1e3": "train.lr: must be <= 10 (an SGD lr above 10 only diverges), got 1000.0",
    "train.label_smoothing=1.5": "train.label_smoothing: must be in [0, 1), got 1.5",
}


def test_bad_params_are_one_line_each():
    for override, line in BAD_PARAMS.items():
        result = subprocess.run([str(BIN / "vgg"), "profile", "--set", override], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert (result.returncode, result.stderr) == (2, f"error: profiles.small.{line}\n"), override


def test_a_learning_rate_in_exponent_notation_is_a_number():
    # YAML 1.1 (PyYAML) reads 1e-3 as a string (it wants 1.0e-3); the most common way to write an lr must work.
    result = subprocess.run([str(BIN / "vgg"), "profile", "--set", "train.lr=1e-3", "--set", "train.fine_tune_lr=5E-4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "  lr: 0.001\n" in result.stdout and "  fine_tune_lr: 0.0005\n" in result.stdout
