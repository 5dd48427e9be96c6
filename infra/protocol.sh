#!/usr/bin/env bash
# The whole protocol (dvc.yaml) with the paper profile, on a Ray cluster: the entrypoint of the RayJob
# (infra/kuberay/rayjob.yaml) and of `ray job submit` on a launcher cluster (infra/README.md). It runs on the Ray
# head as a job driver, so RAY_ADDRESS is set and every `vgg train` stage that DVC starts joins this cluster.
#
# DVC needs a git workspace and its outputs must outlive pods: the workspace is a clone of the source checkout at
# its commit, on the shared volume, one per commit. The DVC cache (with its run-cache) is shared by all of them, on
# the same volume so files are hard links, not copies of ~150 GB of shards; a new commit's workspace restores the
# stages whose code and params did not change instead of recomputing them.
#
# Ray Train's checkpoints go to VGG_RAY_STORAGE, which on a cluster of several nodes must be a directory every node
# mounts, declared with VGG_RAY_STORAGE_SHARED=1 (the manifests set both on the head; pipelines/cluster.py). That is
# checked here, before the hours of ingest that precede the first training stage.
set -euo pipefail

source_repo="${VGG_SOURCE:-/app}"       # a git checkout of this project: the image's copy by default
profile="${VGG_PROFILE:-paper}"         # the params.yaml profile to run
raw="${VGG_RAW-/data/imagenet}"         # the three ILSVRC-2012 archives; set empty for a profile's generated data
work_root="${VGG_WORK_ROOT:-/data/work}"
cache="${VGG_DVC_CACHE:-/data/dvc-cache}"

overrides=(-S "profile=$profile")
if [[ -n "$raw" ]]; then
    for archive in ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar ILSVRC2012_devkit_t12.tar.gz; do
        if [[ ! -f "$raw/$archive" ]]; then
            echo "error: $raw/$archive is missing: copy the three ILSVRC-2012 archives to $raw (infra/README.md)" >&2
            exit 2
        fi
    done
    overrides+=(-S "profiles.$profile.data.raw=$raw")
fi

commit="$(git -C "$source_repo" rev-parse HEAD)"
workspace="$work_root/${commit:0:12}"
if [[ ! -d "$workspace/.git" ]]; then
    mkdir -p "$work_root" "$cache"
    staging="$(mktemp -d "$work_root/.clone-XXXXXX")"
    git clone --quiet --no-checkout "$source_repo" "$staging"
    git -C "$staging" checkout --quiet --detach "$commit"
    git -C "$staging" config user.name "vgg protocol"   # `dvc exp run` commits experiments to hidden refs
    git -C "$staging" config user.email "vgg-protocol@localhost"
    (cd "$staging" && dvc config --local cache.dir "$cache" && dvc config --local cache.type "hardlink,symlink")
    mv "$staging" "$workspace"          # a rename: a half-made clone is never taken for a workspace
fi

cd "$workspace"
python -m pipelines.cluster check-storage   # one line and exit 2 if node-local on a cluster of several nodes
echo "workspace $workspace (commit $commit), profile $profile, raw data ${raw:-generated}," \
     "Ray storage ${VGG_RAY_STORAGE:-ray_results (in the workspace)}, RAY_ADDRESS=${RAY_ADDRESS:-unset}"
exec dvc exp run "${overrides[@]}"
