"""A local Ray cluster owned by one caller: `ray start` on 127.0.0.1, stopped by its own process group.

`vgg demo` runs every training stage of `dvc repro` against one such head instead of starting Ray per stage, and
the tests build their two-node cluster from the same pieces. Never `ray stop`: it stops every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vgg.errors import VGGError

RAY = Path(sys.executable).with_name("ray")
AUTH_ENV = {"RAY_AUTH_MODE": "token"}  # what a client of these clusters needs in its environment


@dataclass(frozen=True)
class LocalCluster:
    address: str  # GCS address for RAY_ADDRESS, 127.0.0.1:PORT
    dashboard: str  # job server / dashboard URL (`ray job submit --address`)
    temp: Path  # Ray's session files
    groups: tuple[int, ...]  # process groups of the `ray start` calls


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], log: Path) -> int:
    """Run `ray start ARGS` in a new session; returns the process group its daemons live in."""
    # Jobs submitted to the cluster inherit this PATH: put this environment's `vgg` and `dvc` on it.
    # Token authentication, explicitly: Ray 2.60 turns it on for a head whenever ~/.ray/auth_token exists, and a
    # joining node (or client) then needs RAY_AUTH_MODE=token too; clients use AUTH_ENV.
    env = {**os.environ, **AUTH_ENV, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for attempt in (1, 2):  # on a loaded machine a daemon can miss one of Ray's start-up deadlines: retry once
        with open(log, "w") as output:
            process = subprocess.Popen([str(RAY), "start", *args, "--disable-usage-stats"], stdout=output,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
            code = process.wait(timeout=180)
        if code == 0:
            return process.pid
        stop(process.pid)
    reason = next((line for line in reversed(log.read_text().splitlines()) if "Error" in line), f"exit {code}")
    raise VGGError(f"`ray start` failed twice: {reason.strip()[:300]}")


def stop(group: int) -> None:
    """Stop the daemons of one `ray start` by their process group: TERM, then KILL what is left.

    The grace after TERM is short: the GCS and the dashboard take 15 s or more to exit on it, and these clusters
    hold nothing to save (models and checkpoints are on disk; Ray's session files are deleted next)."""
    for sig, grace_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 15)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.3)


@contextlib.contextmanager
def local_cluster(*, nodes: int = 1, cpus_per_node: int | None = None) -> Iterator[LocalCluster]:
    """A head (and `nodes - 1` joined nodes) on 127.0.0.1 for the duration of the block."""
    temp = Path(tempfile.mkdtemp(prefix="vgg-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    cpus = str(cpus_per_node or os.cpu_count() or 1)
    port, dashboard = free_port(), free_port()
    groups: list[int] = []
    try:
        groups.append(start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host",
                             "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", cpus,
                             "--temp-dir", str(temp)], temp / "head.log"))
        for node in range(1, nodes):
            groups.append(start(["--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                                 "--num-cpus", cpus], temp / f"node-{node}.log"))
        yield LocalCluster(address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard}", temp=temp,
                           groups=tuple(groups))
    finally:
        for group in reversed(groups):
            stop(group)
        shutil.rmtree(temp, ignore_errors=True)
