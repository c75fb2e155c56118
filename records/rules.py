"""Challenge rules in one place (README of openai/parameter-golf; shared/design components.md s7)."""

ARTIFACT_CAP_BYTES = 16_000_000  # decimal 16 MB: code bytes + compressed model bytes
TRAIN_LIMIT_S = 600.0  # training plus artifact production, 8xH100
EVAL_LIMIT_S = 600.0  # evaluation, 8xH100
RECORD_MIN_DELTA_NATS = 0.005  # a record must beat SOTA by this much ...
RECORD_ALPHA = 0.01  # ... at p < 0.01
MIN_SEEDS = 3
# The headline score must be printed precisely enough to check it against the logs (records use 4-8).
MIN_SCORE_DECIMALS = 4  # what reviewers expect for the significance claim

# Eval modes that score every token once, before any update that has seen it (conditions 1-4).
# Anything else (e.g. prequant_ttt: adapts on val before scoring) is illegal or unreviewed.
LEGAL_EVAL_MODES = (
    "flat",
    "sliding",
    "ttt_score_first",
    "lora_ttt_score_first",
    "flat+ngram_mix",
    "sliding+ngram_mix",
    "ttt_score_first+ngram_mix",
    "lora_ttt_score_first+ngram_mix",
    "ngram_mix",  # sliding+ngram_mix as logs before the mixer became a stage of its own named it
    "phased_ttt",
)

RECORD_TRACK = "10min_16mb"
NON_RECORD_TRACK = "non_record_16mb"
TRACKS = (RECORD_TRACK, NON_RECORD_TRACK)

# hp settings that legitimately differ between the seeds of one submission (the seed itself and
# where outputs go); every other setting, DATA_PATH included, must be identical.
PER_RUN_HP = frozenset({"SEED", "RUN_ID", "LOG_DIR", "ARTIFACT_DIR", "ARTIFACT_PATH"})

# submission.json fields every official record carries (the challenge README's template).
OFFICIAL_FIELDS = (
    "author",
    "github_id",
    "name",
    "blurb",
    "date",
    "val_loss",
    "val_bpb",
    "bytes_total",
    "bytes_code",
)
