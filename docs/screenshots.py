"""Pictures of what a user sees in the MLflow UI after `make demo`: the runs table, two runs compared, a registered
model. Starts `mlflow ui` on a store (127.0.0.1, a free port), opens each page in headless Chromium (Debian's
`chromium` package), saves a PNG of each, and stops the server it started.

    python docs/screenshots.py                       # ./mlflow.db of the project → docs/images/mlflow-*.png
    python docs/screenshots.py --store /tmp/run/mlflow.db --out /tmp/pictures
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from pipelines.tracking import runs_page  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WINDOWS = {"runs": "1600,1000", "compare": "1600,2000", "model": "1600,900"}  # px: the compare page is long
RENDER_BUDGET_MS = 20_000  # Chromium's virtual time for the single-page app to fetch and draw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / "mlflow.db", help="the SQLite store `make demo` wrote")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="folder for the PNGs")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("error: chromium not found; install it (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    if not args.store.is_file():
        print(f"error: {args.store}: no MLflow store; run `make demo` first or pass --store", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with mlflow_ui(args.store) as url:
        for name, page in pages(url).items():
            path = args.out / f"mlflow-{name}.png"
            screenshot(browser, page, path, window=WINDOWS[name])
            print(f"{path}: {page}")
    return 0


def pages(url: str) -> dict[str, str]:
    """The three pages, found through MLflow's REST API: the profile's experiment, its two jittered models' runs
    (D and E: the paper's best single models), the champion registered model."""
    experiment = _get(url, "experiments/search", {"max_results": 10})["experiments"]
    experiment = next(e for e in experiment if e["name"].startswith("vgg-"))
    runs = _post(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                      "filter": "tags.scale_kind = 'jitter'", "max_results": 50})["runs"]
    tags = [{tag["key"]: tag["value"] for tag in run["data"].get("tags", [])} for run in runs]
    ids = [run["info"]["run_id"] for run, tag in zip(runs, tags) if tag.get("config") in ("D", "E")][:2]
    champion = next((model["name"] for model in _get(url, "registered-models/search", {})["registered_models"]
                     if any(alias.get("alias") == "champion" for alias in model.get("aliases", []))), "vgg-A")
    compare = urllib.parse.quote(json.dumps(ids)), urllib.parse.quote(json.dumps([experiment["experiment_id"]]))
    return {
        "runs": runs_page(url, experiment["experiment_id"],
                          tags={tag["key"]: tag["value"] for tag in experiment.get("tags", [])}),
        "compare": f"{url}/#/compare-runs?runs={compare[0]}&experiments={compare[1]}&workflowType=machine_learning",
        "model": f"{url}/#/models/{champion}",
    }


def screenshot(browser: str, page: str, path: Path, *, window: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                        f"--window-size={window}", f"--virtual-time-budget={RENDER_BUDGET_MS}", "--hide-scrollbars",
                        f"--screenshot={path}", page], check=True, capture_output=True, timeout=180)


class mlflow_ui:
    """`mlflow ui` on `store` for the duration of the block; stopped by its own process group."""

    def __init__(self, store: Path) -> None:
        self.store = store

    def __enter__(self) -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.log = tempfile.NamedTemporaryFile(prefix="mlflow-ui-", suffix=".log")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri",
             f"sqlite:///{self.store.resolve()}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, cwd=self.store.resolve().parent)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    return url
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.5)
        self.__exit__()
        raise SystemExit(f"error: mlflow ui did not start; see {self.log.name}")

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def _get(url: str, endpoint: str, query: dict) -> dict:
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.load(r)


def _post(url: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


if __name__ == "__main__":
    sys.exit(main())
