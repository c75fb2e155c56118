#!/usr/bin/env bash
# Protocol P1 (bench/RESULTS.md): one GPU, a document kit tokenized with the sp1024 tokenizer
# data/sample/fineweb_1024_bpe.model, MAX_WALLCLOCK_SECONDS=240 TRAIN_BATCH_TOKENS=196608, defaults
# otherwise. bench/gpu_evidence.sh runs the same protocol inside one 9-minute command, with every
# line streamed into its output folder.
# Run from the repo root, with the kit's docs_val.jsonl.xz and docs_train.jsonl.xz in $KIT (the
# first 4,194 documents, the kit's val file, form the val split):
#   KIT=.gpu RUN_ID=p1_seed1337 bash bench/p1.sh
# Extra env vars (SEED, knobs) pass through to train_gpt.py; PYTHON picks the interpreter.
set -euo pipefail
PY=${PYTHON:-python3}
KIT=${KIT:?set KIT to the folder holding docs_val.jsonl.xz and docs_train.jsonl.xz}
DATA=data/datasets/kit_sp1024
if [ ! -f "$DATA/manifest.json" ]; then
  "$PY" -m data.tokenize_docs --input "$KIT/docs_val.jsonl.xz" "$KIT/docs_train.jsonl.xz" \
    --val-docs 4194 --tokenizer data/sample/fineweb_1024_bpe.model --output "$DATA"
fi
# The defaults read SP8192 CaseOps shards; P1's are sp1024 without a byte sidecar.
DATA_PATH=$DATA TOKENIZER_PATH=data/sample/fineweb_1024_bpe.model VOCAB_SIZE=1024 CASEOPS_ENABLED=0 \
  MAX_WALLCLOCK_SECONDS=240 TRAIN_BATCH_TOKENS=196608 "$PY" train_gpt.py
