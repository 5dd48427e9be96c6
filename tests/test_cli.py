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
