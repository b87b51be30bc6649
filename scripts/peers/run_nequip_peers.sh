#!/usr/bin/env bash
# Train + evaluate nequip's NequIP and nequip-allegro's Allegro on data/cu-emt, one
# after the other, with the sizes, split, losses, schedule and epoch budgets of
# models/cu-emt-nequip.yaml and models/cu-emt-allegro.yaml (40 epochs, lr 0.004: the
# shipped Allegro's run). See the nequip section of scripts/peers/README.md.
#
#   bash scripts/peers/run_nequip_peers.sh [RUN_ROOT] [nequip|allegro ...]
#
# Needs the venv of README.md (default /work/peers/nequip-venv, override with
# NEQUIP_VENV). Single-threaded and niced. Per model, RUN_ROOT/<model>/ gets
# train.log (nequip-train's stdout: timer lines), best.ckpt / last.ckpt,
# csv/version_0/metrics.csv (per-epoch train/val metrics) and eval.json
# (eval_nequip.py on test.xyz and hot.xyz, with a finite-difference check).
# Our side of the table: pes-calc eval (main environment) into RUN_ROOT/ours-eval/.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROOT=${1:-/work/peers/runs}
shift || true
MODELS=${*:-nequip allegro}
VENV=${NEQUIP_VENV:-/work/peers/nequip-venv}
DATA=${CU_EMT_DATA:-$REPO/data/cu-emt}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"   # nequip_timing.WallTimer
export NEQUIP_DATA_DIR="$ROOT/data"
mkdir -p "$ROOT/data"
md5sum "$DATA"/train.xyz "$DATA"/val.xyz "$DATA"/test.xyz "$DATA"/hot.xyz | tee "$ROOT/data/md5.txt"
# nequip collates every frame's stress: the clusters get a NaN stress, which
# `ignore_nan: {stress: true}` masks in the loss and metrics
"$VENV/bin/python" "$HERE/prepare_metatrain_data.py" \
    "$DATA/train.xyz" "$NEQUIP_DATA_DIR/train.xyz" "$DATA/val.xyz" "$NEQUIP_DATA_DIR/val.xyz" \
    "$DATA/test.xyz" "$NEQUIP_DATA_DIR/test.xyz" "$DATA/hot.xyz" "$NEQUIP_DATA_DIR/hot.xyz"

for model in $MODELS; do
    run="$ROOT/$model"
    mkdir -p "$run"
    start=$(date +%s)
    nice -n 10 "$VENV/bin/nequip-train" -cp "$HERE" -cn "${model}_cu_emt" \
        hydra.run.dir="$run" > "$run/train.log" 2>&1
    echo "training wall time: $(( $(date +%s) - start )) s" | tee "$run/timing.txt"
    nice -n 10 "$VENV/bin/python" "$HERE/eval_nequip.py" "$run/best.ckpt" \
        "$DATA/test.xyz" "$DATA/hot.xyz" --fd-check --json "$run/eval.json" | tee "$run/eval.txt"
done

# ours, in the same units (main environment)
mkdir -p "$ROOT/ours-eval"
for model in nequip allegro; do
    for set in test hot; do
        nice -n 10 pes-calc eval "$REPO/models/cu-emt-$model.safetensors" "$DATA/$set.xyz" \
            --json > "$ROOT/ours-eval/$model-$set.json"
    done
done
