#!/usr/bin/env bash
# The GPU evidence issues 8-10 owe, as two device calls of under 10 minutes each (a lease has 15
# minutes of device time in all, machine start included). Logs go to $OUT (the device tool's
# folder that comes back), else bench/out.
#   bash bench/gpu_evidence.sh speed   eval speed (3M random tokens: flat, sliding, mixer) and
#                                      training throughput of the default model (~3 min)
#   KIT=.gpu bash bench/gpu_evidence.sh p1
#                                      protocol P1 (bench/p1.sh): train 240 s, artifact, every
#                                      default eval mode; pre/post-quant val_bpb, quant_gap, bytes
# Wheels for zstandard and brotli (absent from the device image) are installed from .whl/ when
# it was carried: see /work/.library/device/README.md for how to download them.
set -uo pipefail
STAGE=${1:?usage: bash bench/gpu_evidence.sh speed|p1}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$OUT/gpu.csv" 2>&1
case "$STAGE" in
  speed)
    timeout 240 python bench/eval_speed.py --tokens 3000000 --passes flat,sliding,ngram 2>&1 \
      | tee "$OUT/eval_speed.log"
    timeout 180 python bench/throughput.py 2>&1 | tee "$OUT/throughput.log"
    ;;
  p1)
    # The artifact comes back too (~15 MB): a trained model's bytes to study compression on CPU.
    # EVAL_BUDGET_S keeps the call inside the tool's 10 minutes (tokenize ~1 min, compile, 240 s of
    # training, export); a pass that would overrun it is skipped and logged, never cut short.
    LOG_DIR=$OUT ARTIFACT_DIR=$OUT RUN_ID=${RUN_ID:-p1_seed1337} EVAL_BUDGET_S=${EVAL_BUDGET_S:-180} \
      timeout 580 bash bench/p1.sh 2>&1 | tee "$OUT/p1_console.log"
    ;;
  *)
    echo "unknown stage $STAGE: use speed or p1" >&2
    exit 2
    ;;
esac
