"""CaseOps: the lossless case transform of the SP8192 CaseOps records, and their byte accounting.

Source (openai/parameter-golf): `lossless_caps_caseops_v1` of lossless_caps.py in
records/track_10min_16mb/2026-04-18_PR1626_CaseOps_Taper (tokenizer from PR #1729) and
2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611. Over maximal runs of ASCII letters:

    lower case           unchanged                     "the"    -> "the"
    Title case, or "A"   TITLE + lower case            "The"    -> TITLE "the"
    ALL CAPS (2+)        ALLCAPS + lower case          "NASA"   -> ALLCAPS "nasa"
    mixed case           [TITLE] + CAPNEXT before      "iPhone" -> "i" CAPNEXT "phone"
                         each later capital            "OpenAI" -> TITLE "open" CAPNEXT "a" CAPNEXT "i"
    an operator in text  ESC + the character

Everything else (digits, punctuation, non-ASCII) passes through. The operators are four private-use
characters the tokenizer holds as user-defined pieces. The transform is a bijection: `decode` undoes
`encode` exactly and refuses strings `encode` cannot produce.

Scoring (PR #1729, #1736; #2138 was caught dividing by transformed bytes): val_bpb is charged to
the ORIGINAL UTF-8 bytes. Each token gets the original bytes of the text it covers (operators and
ESC: 0; a letter: 1, whatever its case), stored per val token in the byte sidecar
`fineweb_val_bytes_NNNNNN.bin` (the shard format, one uint16 per token, 0 for BOS).
"""

from __future__ import annotations

import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = TITLE + ALLCAPS + CAPNEXT + ESC  # train_gpt.CASEOPS_OPERATORS, in this order
TEXT_TRANSFORM = "lossless_caps_caseops_v1"  # the records' name for it (hub manifests, PR #1729)
_WORD_OR_OPERATOR = re.compile(f"[A-Za-z]+|[{OPERATORS}]")


class CaseOpsError(ValueError):
    """A string that no original text encodes to."""


def _encode_word(word: str) -> str:
    lower = word.lower()
    if word == lower:
        return word
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    if word[1:] == lower[1:]:  # capital first letter only (a lone "A" included)
        return TITLE + lower
    head = TITLE if word[0].isupper() else ""
    return head + lower[0] + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def _encode_match(match: re.Match) -> str:
    text = match.group()
    return ESC + text if text in OPERATORS else _encode_word(text)


def encode(text: str) -> str:
    """The transformed text: lower-case letters plus case operators (see the module docstring)."""
    return _WORD_OR_OPERATOR.sub(_encode_match, text)


def _is_letter(ch: str) -> bool:
    return "a" <= ch <= "z" or "A" <= ch <= "Z"


def decode(text: str) -> str:
    """The original text of `encode`'s output; CaseOpsError if `text` is not such an output."""
    out: list[str] = []
    pending, escape, in_word, allcaps = "", False, False, False
    for ch in text:
        if escape:  # ESC only ever precedes an operator, which ends any word
            out.append(ch)
            escape, in_word, allcaps = False, False, False
        elif ch == ESC:
            if pending:
                raise CaseOpsError("ESC where a letter must follow a case operator")
            escape = True
        elif ch in (TITLE, ALLCAPS):
            if pending or in_word:
                raise CaseOpsError("TITLE/ALLCAPS inside a word or after another operator")
            pending = ch
        elif ch == CAPNEXT:
            if pending or not in_word or allcaps:
                raise CaseOpsError("CAPNEXT outside a mixed-case word")
            pending = ch
        elif _is_letter(ch):
            if not in_word:
                allcaps = pending == ALLCAPS
            out.append(ch.upper() if allcaps or pending else ch)
            pending, in_word = "", True
        else:
            if pending:
                raise CaseOpsError(f"case operator followed by {ch!r}, not an ASCII letter")
            out.append(ch)
            in_word, allcaps = False, False
    if pending or escape:
        raise CaseOpsError("the text ends inside a case operator or an escape")
    return "".join(out)


def original_bytes(pieces: list[str]) -> list[int]:
    """Original UTF-8 bytes of consecutive pieces of transformed text: an operator or ESC is 0, the
    character after ESC and everything else its own UTF-8 length (case keeps ASCII at 1 byte)."""
    counts, escape = [], False
    for piece in pieces:
        n = 0
        for ch in piece:
            if escape or ch not in OPERATORS:
                n += len(ch.encode("utf-8"))
                escape = False
            elif ch == ESC:
                escape = True
        counts.append(n)
    return counts


def encode_with_bytes(sp, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
    """(token ids, original bytes per token) of each document, tokenized after `encode`.

    A token covers the transformed text from its start offset to the next token's start
    (SentencePiece's offset mapping; where spans touch, the records' `piece.surface`), so whitespace
    a normalising tokenizer collapses is charged to the token that absorbed it, whitespace it strips
    after the last token to that token, and whitespace it strips before the first token to the first
    token of text (an operator stays at 0): each document's bytes sum to its UTF-8 length. The
    tokenizers data.train_tokenizer --caseops trains normalise nothing, so each token's span is
    exactly the text it decodes to.
    """
    transformed = [encode(t) for t in texts]
    encoded = sp.encode(transformed, out_type="offset_mapping", num_threads=1) if texts else []
    return [_ids_and_bytes(text, enc) for text, enc in zip(transformed, encoded, strict=True)]


def _ids_and_bytes(text: str, enc: dict) -> tuple[list[int], np.ndarray]:
    if not enc["ids"]:
        return [], np.zeros(0, dtype=np.int64)
    lead = enc["offsets"][0][0]  # whitespace stripped before the first token
    cuts = [lead, *(a for a, _ in enc["offsets"][1:]), len(text)]
    counts = np.array(original_bytes([text[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]))
    counts[int(np.argmax(counts > 0))] += len(text[:lead].encode("utf-8"))
    return list(enc["ids"]), counts.astype(np.int64)
