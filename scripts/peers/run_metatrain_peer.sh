#!/usr/bin/env bash
# Train + evaluate metatrain's SOAP-BPNN peer on data/cu-emt.
#   bash scripts/peers/run_metatrain_peer.sh NUM_EPOCHS [RUN_DIR]
# Needs the venv described in README.md (default /work/peers/metatrain-venv,
# override with METATRAIN_VENV).  Single-threaded and niced.
set -euo pipefail
EPOCHS=${1:?usage: run_metatrain_peer.sh NUM_EPOCHS [RUN_DIR]}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
RUN=${2:-/work/peers/cu-emt-run}
VENV=${METATRAIN_VENV:-/work/peers/metatrain-venv}
DATA=${CU_EMT_DATA:-$REPO/data/cu-emt}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONWARNINGS=ignore
. "$VENV/bin/activate"
mkdir -p "$RUN" && cd "$RUN"
md5sum "$DATA"/train.xyz "$DATA"/val.xyz "$DATA"/test.xyz | tee data_md5.txt
python "$HERE/prepare_metatrain_data.py" \
    "$DATA/train.xyz" train.xyz "$DATA/val.xyz" val.xyz "$DATA/test.xyz" test.xyz
start=$(date +%s)
nice -n 10 mtt train "$HERE/metatrain_soap_bpnn.yaml" -o model.pt \
    -r architecture.training.num_epochs="$EPOCHS" > train.log 2>&1
end=$(date +%s)
echo "training wall time: $((end - start)) s for $EPOCHS epochs" | tee timing.txt
grep -E "Epoch:" train.log | sed -E 's/^\[([^]]*)\].*Epoch: *([0-9]+).*/\1 \2/' > epoch_times.txt || true
# plain `mtt eval` would load the exported model without sphericart's Python-side
# autograd formulas and report wrong forces/stress (see README); import it first.
nice -n 10 python -c "import sys, sphericart.torch; from metatrain.__main__ import main; \
sys.argv = ['mtt'] + sys.argv[1:]; main()" eval model.pt "$HERE/metatrain_eval.yaml" \
    -e extensions -o test_predictions.xyz > eval.log 2>&1
grep "RMSE" eval.log | tail -1
nice -n 10 python "$HERE/eval_metatrain.py" model.pt test.xyz \
    --extensions-directory extensions --fd-check --json test_metrics.json 2>/dev/null
