#!/usr/bin/env bash
# GPU evidence in ONE command of at most 9 minutes on one GPU, from a bare image (Python, torch with
# CUDA, Triton, numpy, sentencepiece): protocol P1 end to end (tokenize, train 240 s, export, score
# every default eval mode), then training throughput if time is left. Every line is printed as soon
# as it exists and appended to $OUT/evidence.log at once, so a stage cut short by its timeout still
# leaves its step lines, the artifact numbers and every finished eval pass; the key lines are
# gathered into $OUT/summary.txt at the end. Run from anywhere: paths given in the settings below are
# relative to where you call it from; .whl/ and .gpu/ are looked up in the repository root.
#
#   bash bench/gpu_evidence.sh                  the document kit in .gpu/ if there, else the bundled sample
#   EVIDENCE_DOCS="a.jsonl.xz b.jsonl" bash bench/gpu_evidence.sh           your documents
#   EVIDENCE_SHARDS=data/datasets/fineweb10B_sp1024 \
#     EVIDENCE_TOKENIZER=data/tokenizers/fineweb_1024_bpe.model bash bench/gpu_evidence.sh   built shards
#   EVIDENCE_SMOKE=1 bash bench/gpu_evidence.sh   CPU rehearsal: the same stages on a tiny model
#
# Settings of this script. They are read and then unset, so train_gpt.py (which refuses unknown
# knob-like names) never sees them; train_gpt.py knobs in the environment pass through (SEED, ...).
#   OUT                 folder for the logs, the artifact and the summary (default bench/out, ignored by git)
#   PYTHON              the interpreter (default python3)
#   EVIDENCE_DOCS       JSON-lines files with a "text" field (plain, .gz, .xz, .zst), space-separated;
#                       the first EVIDENCE_VAL_DOCS documents form the val split
#   EVIDENCE_VAL_DOCS   val documents (default 4194, the kit's val file; 100 for the bundled sample)
#                       The kit is the document set P1 was defined on (.gpu/docs_val.jsonl.xz, the
#                       first 4194 documents, then .gpu/docs_train.jsonl.xz); it is not part of
#                       this repository: with your own data, use EVIDENCE_DOCS or EVIDENCE_SHARDS.
#   EVIDENCE_SHARDS     a folder of fineweb_{train,val}_*.bin shards: no tokenization
#   EVIDENCE_TOKENIZER  SentencePiece model (default data/sample/fineweb_1024_bpe.model, P1's sp1024)
#   EVIDENCE_WORK       where tokenized shards are written (default data/datasets)
#   EVIDENCE_BUDGET_S   the whole command's budget in seconds (default 540: 9 of the 10 minutes)
#   EVIDENCE_SMOKE=1    tiny model, few steps, no GPU needed: checks the script, measures nothing
#
# zstandard and brotli are not in a bare image: wheels in .whl/ (Python 3.12, manylinux x86_64) are
# installed into /tmp/site first; without them the artifact is compressed with lzma alone, and the
# log says so loudly. Files in $OUT (at most 6): evidence.log, summary.txt, manifest.json (the
# tokenized data), <RUN_ID>.txt (train_gpt.py's log), final_model_<RUN_ID>.ptz (the artifact).
set -uo pipefail

abspath() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac }

PY=${PYTHON:-python3}
OUT=$(abspath "${OUT:-bench/out}")
SMOKE=${EVIDENCE_SMOKE:-}
DOCS=()
for f in ${EVIDENCE_DOCS:-}; do DOCS+=("$(abspath "$f")"); done
VAL_DOCS=${EVIDENCE_VAL_DOCS:-}
SHARDS=${EVIDENCE_SHARDS:+$(abspath "$EVIDENCE_SHARDS")}
TOKENIZER=${EVIDENCE_TOKENIZER:+$(abspath "$EVIDENCE_TOKENIZER")}
WORK=$(abspath "${EVIDENCE_WORK:-data/datasets}")
BUDGET_S=${EVIDENCE_BUDGET_S:-540}
unset "${!EVIDENCE_@}"
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
TOKENIZER=${TOKENIZER:-$PWD/data/sample/fineweb_1024_bpe.model}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
LOG=$OUT/evidence.log
: >"$LOG"

# Stage budget (seconds of the 540; planning figures, not yet measured on a GPU):
#   setup       cap 60    wheel install, software and GPU versions
#   tokenize    cap 120   the kit (42 MB of xz) on 16 cores; none for EVIDENCE_SHARDS or reused shards
#   train       the rest  P1: start-up and val load ~20, compile priming ~60, the export dry run that
#                         measures the export reserve ~60, 240 of training + export (one clock), flat
#                         evals of the live and the EMA weights ~20 (together PRE_EVAL_S), then the
#                         artifact's eval passes under EVAL_BUDGET_S = what is left after those
#   throughput  only when THROUGHPUT_MIN_S are left after training; cap: what is left
#   summary     TAIL_S kept back for it at every stage
PRE_EVAL_S=400
TAIL_S=15
THROUGHPUT_MIN_S=120

say() { printf '%s\n' "$*" | tee -a "$LOG"; }

# stage NAME CAP_S CMD...: CMD under `timeout`, at most CAP_S and never into the summary's TAIL_S;
# its output streams to stdout and into the log line by line. Returns CMD's exit status.
stage() {
  local name=$1 cap=$2 left limit rc t0=$SECONDS
  shift 2
  left=$((BUDGET_S - SECONDS - TAIL_S))
  limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    say "stage:$name skipped reason:no_time_left left_s:$left"
    return 124
  fi
  say "stage:$name start limit_s:$limit left_s:$left"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  say "stage:$name rc:$rc seconds:$((SECONDS - t0))$( ((rc == 124 || rc == 137)) && echo ' timed_out:yes')"
  return "$rc"
}

setup() {
  if [ -n "$SMOKE" ]; then
    say "mode:smoke (CPU rehearsal: a tiny model; no number here is a measurement)"
  elif compgen -G ".whl/*.whl" >/dev/null; then
    stage wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  stage versions 60 "$PY" -c "
import importlib.util as u, platform, torch
print(f'python:{platform.python_version()} torch:{torch.__version__} cuda:{torch.version.cuda}')
gpus = [torch.cuda.get_device_name(i).replace(' ', '_') for i in range(torch.cuda.device_count())]
print(f'gpus:{len(gpus)} gpu:{gpus[0] if gpus else \"none\"}')
mods = dict(zstandard='zstd', brotli='brotli')
print('compressors:' + ','.join([v for k, v in mods.items() if u.find_spec(k)] + ['lzma']))
" || return 1
  if ! grep -q "^compressors:.*brotli" "$LOG"; then
    say "NOTE !!! zstandard/brotli not importable (no wheels in .whl/, or their install failed): the"
    say "NOTE !!! artifact is compressed with lzma alone, so bytes_total is lzma's, not what"
    say "NOTE !!! COMPRESSOR=auto would pick with all three."
  fi
  if [ -z "$SMOKE" ] && grep -q "^gpus:0" "$LOG"; then
    say "NOTE !!! no CUDA GPU visible: this script measures one (EVIDENCE_SMOKE=1 rehearses it on CPU)"
    return 1
  fi
  command -v nvidia-smi >/dev/null && stage nvidia-smi 20 nvidia-smi \
    --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
  return 0
}

# Sets DATA (the shards folder) from EVIDENCE_SHARDS, or tokenizes EVIDENCE_DOCS / the kit / the
# bundled sample into WORK (a folder named after the inputs, reused when it is complete).
prepare_data() {
  local inputs=() label extra=() key
  if [ -n "$SHARDS" ]; then
    DATA=$SHARDS
    compgen -G "$DATA/fineweb_val_*.bin" >/dev/null || {
      say "NOTE !!! EVIDENCE_SHARDS=$DATA holds no fineweb_val_*.bin: point it at a folder of shards"
      return 1
    }
    say "data:shards path:$DATA tokenizer:$TOKENIZER"
    return 0
  fi
  if ((${#DOCS[@]})); then
    inputs=("${DOCS[@]}") label=docs VAL_DOCS=${VAL_DOCS:-4194}
  elif [ -f .gpu/docs_val.jsonl.xz ] && [ -f .gpu/docs_train.jsonl.xz ]; then
    inputs=(.gpu/docs_val.jsonl.xz .gpu/docs_train.jsonl.xz) label=kit VAL_DOCS=${VAL_DOCS:-4194}
  else
    inputs=(data/sample/sample_wiki.jsonl.xz) label=sample VAL_DOCS=${VAL_DOCS:-100}
    [ -n "$SMOKE" ] || {
      say "NOTE !!! no EVIDENCE_DOCS and no kit in .gpu/: training on the bundled sample (1.6M train tokens,"
      say "NOTE !!! repeated many times in 240 s): speed and pipeline evidence, no comparable val_bpb."
    }
  fi
  [ -n "$SMOKE" ] && extra=(--max-docs 150 --workers 1)
  key=$(printf '%s\n' "${inputs[@]}" "$VAL_DOCS" "$TOKENIZER" "${extra[@]}" | sha1sum | cut -c1-10)
  DATA=$WORK/evidence_${label}_$key
  if [ -f "$DATA/manifest.json" ]; then
    say "data:reused path:$DATA"
  else
    stage tokenize 120 "$PY" -m data.tokenize_docs --input "${inputs[@]}" --val-docs "$VAL_DOCS" \
      --tokenizer "$TOKENIZER" --output "$DATA" "${extra[@]}" || return 1
  fi
  cp "$DATA/manifest.json" "$OUT/manifest.json"
  "$PY" -c "
import json, sys
m = json.load(open(sys.argv[1]))
v, t = m['splits']['val'], m['splits']['train']
print(f'data:{sys.argv[2]} val_docs:{v[\"documents\"]} val_tokens:{v[\"tokens\"]}',
      f'train_tokens:{t[\"tokens\"]} val_unk_tokens:{v[\"unk_tokens\"]}')
" "$DATA/manifest.json" "$label" 2>&1 | tee -a "$LOG"
}

# Protocol P1 (bench/p1.sh): MAX_WALLCLOCK_SECONDS=240 TRAIN_BATCH_TOKENS=196608, defaults otherwise.
# Two trims change wall time only, not the trained model: WARMUP_STEPS=3 (compile priming; the
# priming steps are undone) and VAL_LOSS_EVERY=0 (no validation during training; it pauses the
# clock). EVAL_BUDGET_S is what the budget leaves for the artifact's passes.
train() {
  local eval_budget run_id knobs vocab
  eval_budget=${EVAL_BUDGET_S:-$((BUDGET_S - SECONDS - TAIL_S - PRE_EVAL_S))}
  ((eval_budget < 30)) && eval_budget=30
  run_id=${RUN_ID:-evidence_p1_$(date -u +%Y%m%dT%H%M%SZ)}
  # The defaults read SP8192 CaseOps shards; P1's shards are plain (no byte sidecar), their vocabulary
  # the tokenizer's.
  vocab=$("$PY" -c "import sentencepiece as s, sys; print(s.SentencePieceProcessor(model_file=sys.argv[1]).vocab_size())" "$TOKENIZER")
  knobs=(DATA_PATH="$DATA" TOKENIZER_PATH="$TOKENIZER" VOCAB_SIZE="$vocab" CASEOPS_ENABLED=0 LOG_DIR="$OUT"
    ARTIFACT_DIR="$OUT" RUN_ID="$run_id" WARMUP_STEPS=3 VAL_LOSS_EVERY=0 EVAL_BUDGET_S="$eval_budget")
  if [ -n "$SMOKE" ]; then
    # the smoke preset shrunk further; NGRAM_MIX=0 and small TTT chunks give P1's default passes
    knobs+=(RUN_PRESET=smoke NUM_LAYERS=2 TRAIN_SEQ_LEN=128 TRAIN_BATCH_TOKENS=2048 MICROBATCH_TOKENS=2048
      ITERATIONS=6 MAX_WALLCLOCK_SECONDS=60 VAL_BATCH_TOKENS=4096 EVAL_STRIDE=64 NGRAM_MIX=0
      TTT_CHUNK_TOKENS=2048 GPTQ_CALIB_TOKENS=4096)
  else
    knobs+=(MAX_WALLCLOCK_SECONDS=240 TRAIN_BATCH_TOKENS=196608)
  fi
  say "protocol:P1 ${knobs[*]}"
  stage train "$((BUDGET_S - SECONDS - TAIL_S))" env "${knobs[@]}" "$PY" train_gpt.py
}

# Training throughput of the default model on random tokens at P1's batch (bench/throughput.py):
# per-step lines, ms_per_step, tokens_per_s, mfu, peak_mem_mib and the step's breakdown.
throughput() {
  local left=$((BUDGET_S - SECONDS - TAIL_S)) knobs steps
  knobs=(TRAIN_BATCH_TOKENS=196608) steps=(--warmup 5 --steps 20)
  if ((left < THROUGHPUT_MIN_S)); then
    say "stage:throughput skipped reason:time left_s:$left needs_s:$THROUGHPUT_MIN_S"
    return 0
  fi
  if [ -n "$SMOKE" ]; then
    knobs=(RUN_PRESET=smoke NUM_LAYERS=2 TRAIN_BATCH_TOKENS=1024 MICROBATCH_TOKENS=512)
    steps=(--warmup 1 --steps 2)
  fi
  stage throughput "$left" env "${knobs[@]}" "$PY" bench/throughput.py "${steps[@]}"
}

# The key lines of the log, in order, into summary.txt (and on stdout once more).
summary() {
  local keys='^(stage:|mode:|NOTE|NVIDIA|python:|data:|compressors:|gpus?:|protocol:|evidence:|step:|'
  keys+='stopping_early|warmup_steps:|export_probe_s|compressor:|bytes_code:|gptq_time_s|fit_|final_eval:|'
  keys+='eval_fallback|quant_gap|eval_time_s|timed_steps:|tokens_per_s:|peak_mem_mib|device:|WARNING|'
  keys+='config error|data error|artifact error|Traceback)'
  say "evidence:$1 seconds:$SECONDS budget_s:$BUDGET_S out:$OUT"
  grep -E "$keys" "$LOG" >"$OUT/summary.txt"
  grep -E '^\{' "$LOG" | tail -n 1 >>"$OUT/summary.txt"
  echo "---- summary ($OUT/summary.txt)"
  cat "$OUT/summary.txt"
}

main() {
  setup || { summary failed; return 1; }
  prepare_data || { summary failed; return 1; }
  train
  local rc=$?
  throughput
  if ((rc == 0)); then summary done; else summary "incomplete train_rc:$rc"; fi
  return "$rc"
}

main
