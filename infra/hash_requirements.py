"""Write the sha256 of every file PyPI has for each pinned version into requirements files, in place.

    python infra/hash_requirements.py requirements.lock infra/docker/requirements-server.txt

Each requirement line is `name==version` with an optional `; marker`; the pins are kept as they are (this never
resolves anything) and the lines of `--hash=sha256:...` under each are replaced by the hashes PyPI's simple API
(PEP 691, https://pypi.org/simple/<name>/) lists for that version: every wheel and the sdist, so one file serves
every platform. Comment lines are kept. `pip install --require-hashes -r FILE` then refuses any file whose hash is
not listed, from any index or local wheel directory. Run it after changing a pin: tests/test_infra.py fails on a
requirement without hashes.
"""

import json
import re
import sys
import time
import urllib.request
from pathlib import Path

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

SIMPLE = "https://pypi.org/simple/{}/"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?P<marker>;[^\\]*)?$")


def _version(filename: str) -> Version | None:
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        return parse_sdist_filename(filename)[1]
    except (ValueError, InvalidVersion):  # packaging's Invalid*Filename are ValueErrors
        return None


def pypi_hashes(name: str, version: str) -> list[str]:
    """sha256 of every file of `name` `version` on PyPI, sorted; an error when there is none."""
    request = urllib.request.Request(
        SIMPLE.format(canonicalize_name(name)), headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    for attempt in range(4):
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                files = json.load(response)["files"]
            break
        except OSError:
            if attempt == 3:
                raise
            time.sleep(2**attempt)
    wanted = Version(version)
    hashes = sorted({f["hashes"]["sha256"] for f in files if _version(f["filename"]) == wanted})
    if not hashes:
        raise SystemExit(f"PyPI lists no file of {name}=={version}")
    return hashes


def logical_lines(text: str) -> list[str]:
    """The file's lines with backslash continuations joined, as pip reads them."""
    return re.sub(r"\\\n", " ", text).splitlines()


def rewrite(path: Path) -> int:
    out: list[str] = []
    count = 0
    for line in logical_lines(path.read_text()):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            out.append(line)
            continue
        requirement = re.split(r"\s+--hash[= ]", stripped)[0].strip()
        match = PIN.match(requirement)
        if not match:
            raise SystemExit(f"{path}: not a `name==version [; marker]` pin: {stripped}")
        marker = f" {match['marker'].strip()}" if match["marker"] else ""
        head = f"{match['name']}=={match['version']}{marker}"
        hashes = pypi_hashes(match["name"], match["version"])
        out.append(" \\\n".join([head, *(f"    --hash=sha256:{h}" for h in hashes)]))
        count += 1
    path.write_text("\n".join(out) + "\n")
    return count


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: {rewrite(Path(arg))} requirements hashed")
