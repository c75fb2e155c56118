"""Data tools for the Parameter Golf training script.

Each tool is a command-line module run from the repository root:

    python -m data.download         # official FineWeb shards + tokenizers from the Hugging Face hub
    python -m data.tokenize_docs    # your own JSON-lines documents -> challenge-format shards
    python -m data.train_tokenizer  # SentencePiece BPE with the challenge's trainer settings
    python -m data.verify           # check a shard folder (headers, ids, split overlap, byte table)

data/caseops.py is the CaseOps case transform (not a tool): tokenize_docs/train_tokenizer --caseops.

The shard format, tokenizer loading and BPB byte tables live in train_gpt.py; these tools import
them from there so that the data and the scorer can never disagree.
"""
