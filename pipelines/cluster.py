"""The one home of Ray's connection: join the cluster in RAY_ADDRESS, or start a local Ray this process owns; the
placement checks; Ray's storage; what a Ray error means to the user.

Token authentication stays on (Ray 2.60's default), and nothing is written to the user's home: every Ray this
project starts gets a fresh token in its own temporary directory, handed to its clients through Ray's documented
settings (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH`). A user's own token-protected cluster is joined with the
user's settings (`RAY_ADDRESS`, `RAY_AUTH_MODE=token` and the token: `RAY_AUTH_TOKEN_PATH`, `RAY_AUTH_TOKEN` or
`~/.ray/auth_token`). Clusters started here are stopped by their own process groups, never by `ray stop` (which
stops every Ray on the machine).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from vgg.errors import VGGError

RAY = Path(sys.executable).with_name("ray")
TOKEN_FILE = "auth_token"
# glibc malloc tuning for CPU training processes (the step is ~1.2-1.5x faster on a 2-core AVX2 host:
# benchmarks/train_step.py).
WORKER_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
GCS_PROBE_TIMEOUT_S = 5.0  # a closed or filtered GCS port fails here, not after ray.init's ~20 s of retries
JOIN_HINT = ("start the cluster (`ray start --head`), fix the address, and for a cluster with token authentication "
             "set RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN_PATH=<file> or RAY_AUTH_TOKEN); or unset "
             "RAY_ADDRESS to run on a local Ray")


class ClusterError(VGGError):
    """The Ray cluster cannot be reached or cannot host the requested work."""


# Ray's storage: where Ray Train (and Tune) keep a run's checkpoints and state, and where a rerun resumes from.
# Set by `--storage` or VGG_RAY_STORAGE (what DVC's stages and `ray job submit` pass on). The default, a folder in
# the working directory, is right on one machine. On a cluster of several nodes every worker writes its
# checkpoints there and the driver reads the last one back, so it must be a directory every node mounts (NFS, EFS,
# a ReadWriteMany volume): only the user knows whether a path is, and says so with `--storage-shared`
# (VGG_RAY_STORAGE_SHARED=1).
STORAGE_ENV = "VGG_RAY_STORAGE"
STORAGE_SHARED_ENV = "VGG_RAY_STORAGE_SHARED"
DEFAULT_STORAGE = "ray_results"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def storage_path(value: str) -> Path:
    """`--storage` as a directory path. A URI (s3://, gs://) is refused: the run lock beside the run needs a file
    system (flock), and pathlib would quietly make `s3://b/x` the local folder `s3:/b/x`."""
    if _URI.match(value):
        raise ClusterError(
            f"--storage {value}: Ray storage must be a directory path; on a cluster use a file system every node "
            f"mounts (e.g. an NFS or EFS mount) with --storage-shared ({STORAGE_SHARED_ENV}=1)"
        )
    return Path(value)


def check_storage(storage: Path, *, shared: bool) -> None:
    """Before a run starts on the connected cluster: refuse a `storage` not declared shared when the cluster has
    more than one live node (Ray itself finds out only once every worker has started, as a page-long error that
    its failure handling retries)."""
    import ray

    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if not shared and nodes > 1:
        raise ClusterError(
            f"--storage {storage}: the Ray cluster has {nodes} nodes and each writes checkpoints there, but the "
            f"path is not declared shared; set {STORAGE_ENV} (or --storage) to a directory every node mounts and "
            f"{STORAGE_SHARED_ENV}=1 (or --storage-shared)"
        )


def token_env(token: Path) -> dict[str, str]:
    """What a client of a cluster started here needs in its environment, set before it imports Ray (Ray reads
    RAY_AUTH_MODE once, when it is imported)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def client_env(base: Mapping[str, str], *, address: str, token: Path) -> dict[str, str]:
    """`base` with this cluster's address and token; a RAY_AUTH_TOKEN value there would win over the file."""
    env = {key: value for key, value in base.items() if key != "RAY_AUTH_TOKEN"}
    return {**env, "RAY_ADDRESS": address, **token_env(token)}


def write_token(directory: Path) -> Path:
    """A fresh token (256 random bits, as `ray get-auth-token --generate` makes) in `directory`, readable by this
    user only."""
    path = directory / TOKEN_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))
    return path


def temp_dir() -> Path:
    """A private directory for one Ray's session files and token. Short (under /tmp, not $TMPDIR): Ray's socket
    paths have a length limit."""
    return Path(tempfile.mkdtemp(prefix="vgg-ray-", dir="/tmp"))


@dataclass(frozen=True)
class LocalCluster:
    address: str  # GCS address for RAY_ADDRESS, 127.0.0.1:PORT
    dashboard: str  # job server / dashboard URL (`ray job submit --address`)
    temp: Path  # Ray's session files
    token: Path  # the cluster's token file (RAY_AUTH_TOKEN_PATH for its clients)
    groups: tuple[int, ...]  # process groups of the `ray start` calls

    def client_env(self, base: Mapping[str, str]) -> dict[str, str]:
        return client_env(base, address=self.address, token=self.token)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], log: Path, *, token: Path) -> int:
    """Run `ray start ARGS` in a new session with `token`; returns the process group its daemons live in."""
    # Jobs submitted to the cluster inherit this PATH: put this environment's `vgg` and `dvc` on it.
    env = {**client_env(os.environ, address="", token=token), "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    del env["RAY_ADDRESS"]
    for attempt in (1, 2):  # on a loaded machine a daemon can miss one of Ray's start-up deadlines: retry once
        with open(log, "w") as output:
            process = subprocess.Popen([str(RAY), "start", *args, "--disable-usage-stats"], stdout=output,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                code = process.wait(timeout=180)
            except BaseException:  # interrupted: what it started so far must not outlive us
                stop(process.pid)
                raise
        if code == 0:
            return process.pid
        stop(process.pid)
    reason = next((line for line in reversed(log.read_text().splitlines()) if "Error" in line), f"exit {code}")
    raise ClusterError(f"`ray start` failed twice: {reason.strip()[:300]}")


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
def local_cluster(*, nodes: int = 1, cpus_per_node: int | None = None, token: Path | None = None
                  ) -> Iterator[LocalCluster]:
    """A head (and `nodes - 1` joined nodes) on 127.0.0.1 for the duration of the block, with `token` (default: a
    fresh one in the cluster's temporary directory, deleted with it)."""
    temp = temp_dir()
    groups: list[int] = []
    try:
        token = token or write_token(temp)
        cpus = str(cpus_per_node or os.cpu_count() or 1)
        port, dashboard = free_port(), free_port()
        # Each node's dashboard agent on a port of its own: Ray's fixed default (52365) is taken by the first
        # node of any Ray on the machine, and a head whose agent cannot bind accepts no `ray job submit`.
        groups.append(start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host",
                             "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", cpus,
                             "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(temp)],
                            temp / "head.log", token=token))
        for node in range(1, nodes):
            groups.append(start(["--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                                 "--num-cpus", cpus, "--dashboard-agent-listen-port", str(free_port())],
                                temp / f"node-{node}.log", token=token))
        yield LocalCluster(address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard}", temp=temp,
                           token=token, groups=tuple(groups))
    finally:
        for group in reversed(groups):
            stop(group)
        shutil.rmtree(temp, ignore_errors=True)


def connect() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray owned by this process (stopped when it exits); one
    clear line when the address is unreachable or refuses us."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    env = dict(WORKER_ENV)
    options: dict = {}
    if address:
        where = f"RAY_ADDRESS={address}"
        _probe_gcs(address, where=where)
        # Ray Train's placement-group cleaner asks the state API for "the" cluster; with several Ray instances on one
        # machine it finds them all and dies unless RAY_ADDRESS names this one in the actors' environment too.
        env["RAY_ADDRESS"] = address
    else:
        where = "a local Ray instance"
        # On a known loopback address, named to its actors as RAY_ADDRESS as above: Ray Train's placement-group
        # cleaner otherwise dies (a traceback in the output) wherever another Ray runs on the machine.
        port = free_port()
        env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        options.update(_temp_dir=str(_local_ray_dir()), _node_ip_address="127.0.0.1")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by Ray's node start-up only
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, configure_logging=True,
                 logging_level="WARNING", **options)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as error:
        reason = str(error).splitlines()[0][:200]
        if "auth" in repr(error).lower() or "auth" in repr(error.__cause__).lower():
            reason = "the cluster refused this client's authentication token"
        raise ClusterError(f"cannot connect to {where} ({reason}); {JOIN_HINT}") from None
    finally:
        # ray.init replaces the SIGTERM handler with `sys.exit` (and a local node with one that kills its processes
        # and exits): the caller's handler (`vgg`'s raises an interrupt) is the one that runs the clean-up.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def _local_ray_dir() -> Path:
    """The session directory of the local Ray that `connect` starts: private, with a fresh token unless the
    environment already names one; deleted at exit, after Ray's own shutdown (atexit runs handlers last-in,
    first-out, and `ray.init` registers its shutdown after this)."""
    directory = temp_dir()
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        # Ray reads these when it starts a local cluster; with neither set it would write ~/.ray/auth_token.
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(write_token(directory))
    # Ray announces that it turned token authentication on for a new local cluster: that is what we want.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    return directory


def _probe_gcs(address: str, *, where: str) -> None:
    """Fail fast on a GCS address nobody listens on (`host:port`, or `ray://host:port` for Ray Client)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: ray.init resolves them
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=GCS_PROBE_TIMEOUT_S):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ClusterError(f"cannot connect to {where} (nothing answers at {host}:{port}: {reason}); {JOIN_HINT}"
                           ) from None


def placeable(bundle: dict[str, float]) -> int:
    """How many of `bundle` (e.g. {"CPU": 1, "GPU": 1}) the live nodes of the Ray cluster hold at once. Ray puts a
    task, actor or worker on one node, so the cluster's totals overstate it (a GPU on a node with no CPU to spare
    takes no GPU worker), and a request no node can hold waits forever rather than failing."""
    import ray

    return sum(min(int(node["Resources"].get(name, 0.0) // amount) for name, amount in bundle.items() if amount > 0)
               for node in ray.nodes() if node["Alive"])


def user_error(error: BaseException) -> VGGError | None:
    """The VGGError a worker or task raised, if that is what ended the run (Ray re-raises it wrapped)."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, VGGError):
            return type(current)(str(current))
        for attribute in ("cause", "__cause__", "__context__"):
            nested = getattr(current, attribute, None)
            if isinstance(nested, BaseException):
                pending.append(nested)
        for nested in getattr(current, "worker_failures", {}).values() if hasattr(current, "worker_failures") else ():
            if isinstance(nested, BaseException):
                pending.append(nested)
    return None


def _check_storage_here() -> int:
    """`python -m pipelines.cluster check-storage`: `check_storage` for the storage the environment names (what
    `vgg train` would use), for scripts that run long stages before the first training (infra/protocol.sh).
    Without RAY_ADDRESS a run starts its own local Ray, one node: nothing to check."""
    import click

    try:
        shared = click.BOOL.convert(os.environ.get(STORAGE_SHARED_ENV) or "0", None, None)
    except click.BadParameter as error:
        print(f"error: {STORAGE_SHARED_ENV}: {error.message}", file=sys.stderr)
        return 2
    try:
        storage = storage_path(os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE).absolute()
        if os.environ.get("RAY_ADDRESS") and not shared:
            connect()
            check_storage(storage, shared=False)
    except VGGError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["check-storage"]:
        print("usage: python -m pipelines.cluster check-storage", file=sys.stderr)
        sys.exit(2)
    sys.exit(_check_storage_here())
