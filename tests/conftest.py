"""Shared fixtures for the train_gpt.py unit tests: tiny configs, tiny shards, tokenizers, a CPU runtime.

Nothing here reads or writes os.environ: configs are built from plain dicts.
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bare `pytest` (not `python -m pytest`) leaves the root off sys.path
    sys.path.insert(0, str(REPO))

import train_gpt  # noqa: E402

BUNDLED_TOKENIZER = REPO / "data" / "sample" / "fineweb_1024_bpe.model"

# A model small enough for many forward passes on 2 CPU cores, on the March stack (value residual,
# gated attention, BigramHash, SmearGate on); the frontier switches have tests of their own.
TINY_ENV: dict[str, str] = {
    **train_gpt.MARCH_STACK,
    "VOCAB_SIZE": "64",
    "NUM_LAYERS": "2",
    "MODEL_DIM": "32",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "ROPE_DIMS": "4",
    "XSA_LAST_N": "2",
    "BIGRAM_BUCKETS": "16",
    "BIGRAM_DIM": "8",
    "SMEAR_GATE_INPUTS": "12",
    "MLP_MULT": "2",
    "TRAIN_SEQ_LEN": "16",
    "TRAIN_BATCH_TOKENS": "64",
    "MICROBATCH_TOKENS": "32",
    "VAL_BATCH_TOKENS": "64",
    "ITERATIONS": "2",
    "COMPILE": "0",
}

# Texts the bundled sp1024 tokenizer encodes without <unk> (it has no byte-fallback pieces).
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces and trailing ones  ",
    "Line one\nline two\n\nparagraph three, with 12345 digits and punctuation: (a) b; c!",
    "Parameter golf: train the best language model that fits in sixteen megabytes.",
    "short",
    "Numbers 3.14159 and 2.71828; e-mail someone at example.com; path /usr/bin/env.",
]


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def make_hp(**overrides: object) -> train_gpt.Hyperparameters:
    """Hyperparameters from TINY_ENV plus NAME=value overrides (values may be ints, floats or bools)."""
    env = dict(TINY_ENV)
    env.update({name: _env_value(value) for name, value in overrides.items()})
    return train_gpt.Hyperparameters(env)


@pytest.fixture
def tiny_hp():
    """Factory: tiny_hp(NUM_LAYERS=3, SMEAR_GATE=False) -> Hyperparameters of a tiny model."""
    return make_hp


@pytest.fixture
def torch_single_thread():
    """One intra-op thread: tiny matmuls on a shared 2-core machine run ~10x faster than with two."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def cpu_runtime() -> train_gpt.Runtime:
    return train_gpt.Runtime(
        rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), grad_accum_steps=1, run_id="t"
    )


@pytest.fixture(scope="session")
def bundled_sp() -> spm.SentencePieceProcessor:
    """The kit's public sp1024 copy shipped in the repo (no byte-fallback pieces, has <unk>)."""
    return spm.SentencePieceProcessor(model_file=str(BUNDLED_TOKENIZER))


@pytest.fixture(scope="session")
def byte_fallback_sp(tmp_path_factory) -> tuple[Path, spm.SentencePieceProcessor]:
    """A tiny BPE tokenizer with the official trainer settings, including the 256 byte pieces."""
    rng = random.Random(0)
    words = (
        "the of and to in a is that for it as was with be by on not he this are or his from at which "
        "but have an they you were her she there one all we their has been would its more time so if"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 9999)}." for _ in range(400)]
    lines += ["Naïve café, résumé and déjà vu."] * 3
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        hard_vocab_limit=False,
        byte_fallback=True,
        add_dummy_prefix=False,
        normalization_rule_name="nmt_nfkc",
        split_digits=True,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("tokenizer") / "tiny_bytes_bpe.model"
    path.write_bytes(model.getvalue())
    return path, spm.SentencePieceProcessor(model_file=str(path))


def token_stream(sp: spm.SentencePieceProcessor, docs: list[str]) -> np.ndarray:
    """The challenge layout: every document as [BOS] + ids, concatenated, no EOS."""
    return np.concatenate([[train_gpt.BOS_ID, *sp.encode(d)] for d in docs]).astype(np.int64)


@pytest.fixture
def shard_dir(tmp_path, bundled_sp) -> Path:
    """tmp_path/data with one train and one val shard of sp1024 tokens (a few hundred each)."""
    folder = tmp_path / "data"
    folder.mkdir()
    train_gpt.write_shard(folder / "fineweb_train_000000.bin", token_stream(bundled_sp, DOCS * 4))
    # Official tokenizers have no dummy prefix, so encoded documents never start with a "▁" piece;
    # a few hand-made ones do, so the "no space charged after BOS" rule matters in the val set.
    space_led = [bundled_sp.piece_to_id(p) for p in ("\u2581the", "\u2581end", ".")]
    val = [*token_stream(bundled_sp, DOCS[::-1] * 2), *([train_gpt.BOS_ID, *space_led] * 4)]
    train_gpt.write_shard(folder / "fineweb_val_000000.bin", np.array(val))
    return folder


def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Adds noise to every parameter so zero-initialised projections and gates stop hiding paths."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture
def randomize():
    """randomize(model, std=0.2, seed=0): noise on every parameter, in place; returns the model."""
    return randomize_


@pytest.fixture
def forwards(monkeypatch):
    """Every GPT trunk call: (grad enabled, model in training mode, per-document adapters attached)."""
    calls = []
    hidden = train_gpt.GPT.hidden

    def spy(self, ids):
        calls.append((torch.is_grad_enabled(), self.training, self.head_lora is not None))
        return hidden(self, ids)

    monkeypatch.setattr(train_gpt.GPT, "hidden", spy)
    return calls
