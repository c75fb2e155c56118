#!/usr/bin/env bash
# Protocol P1 (bench/RESULTS.md): 1xH100, the team's document kit tokenized with sp1024,
# MAX_WALLCLOCK_SECONDS=240 TRAIN_BATCH_TOKENS=196608, defaults otherwise.
# Run from the repo root on the GPU machine, with the kit's docs_val.jsonl.xz and
# docs_train.jsonl.xz in $KIT (the first 4,194 documents, the kit's val file, form the val split):
#   KIT=.gpu RUN_ID=p1_seed1337 bash bench/p1.sh
# Extra env vars (SEED, knobs) pass through to train_gpt.py.
set -euo pipefail
KIT=${KIT:?set KIT to the folder holding docs_val.jsonl.xz and docs_train.jsonl.xz}
DATA=data/datasets/kit_sp1024
if [ ! -f "$DATA/manifest.json" ]; then
  python -m data.tokenize_docs --input "$KIT/docs_val.jsonl.xz" "$KIT/docs_train.jsonl.xz" \
    --val-docs 4194 --tokenizer data/sample/fineweb_1024_bpe.model --output "$DATA"
fi
DATA_PATH=$DATA TOKENIZER_PATH=data/sample/fineweb_1024_bpe.model \
  MAX_WALLCLOCK_SECONDS=240 TRAIN_BATCH_TOKENS=196608 python train_gpt.py
