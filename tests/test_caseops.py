"""CaseOps v1 codec: golden vectors, spec examples, round-trip properties, malformed-input errors."""
import json
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lossless_caps import ALLCAPS, CAPNEXT, ESC, TITLE, decode, encode

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "caseops_v1.jsonl"
ROWS = [json.loads(line) for line in GOLDEN.read_text().splitlines()]


def test_control_symbols():
    assert (TITLE, ALLCAPS, CAPNEXT, ESC) == ("\ue001", "\ue002", "\ue003", "\ue004")


@pytest.mark.parametrize("row", ROWS, ids=lambda r: str(r["id"]))
def test_golden_encode_decode(row):
    assert [ord(c) for c in encode(row["text"])] == [ord(c) for c in row["caseops_text"]]
    assert decode(row["caseops_text"]) == row["text"]


@pytest.mark.parametrize("text, expected", [
    ("", ""),
    ("A", TITLE + "a"),
    ("XY", ALLCAPS + "xy"),
    ("aB", "a" + CAPNEXT + "b"),
    ("ABc", TITLE + "a" + CAPNEXT + "bc"),
    ("McDonald", TITLE + "mc" + CAPNEXT + "donald"),
    ("iPhone", "i" + CAPNEXT + "phone"),
    ("getHTTPResponse", "get" + CAPNEXT + "h" + CAPNEXT + "t" + CAPNEXT + "t" + CAPNEXT + "p" + CAPNEXT + "response"),
    ("ABC123def", ALLCAPS + "abc123def"),
    ("DON'T", ALLCAPS + "don'" + TITLE + "t"),
    ("O'Brien", TITLE + "o'" + TITLE + "brien"),
    ("ÉCOLE", "É" + ALLCAPS + "cole"),
    ("École", "École"),
    ("РОССИЯ Σ İ", "РОССИЯ Σ İ"),
    ("a\ue001b\ue000", "a" + ESC + TITLE + "b\ue000"),
])
def test_spec_examples(text, expected):
    assert encode(text) == expected
    assert decode(expected) == text


def spec_encode(text: str) -> str:
    """Direct transcription of spec 01 section 1.2, one character at a time (slow, obviously right)."""
    out, word = [], []

    def flush():
        w = "".join(word)
        if w == w.lower():
            out.append(w)
        elif len(w) >= 2 and w == w.upper():
            out.append(ALLCAPS + w.lower())
        elif w[0].isupper() and len(w) >= 2 and w[1:] == w[1:].lower():
            out.append(TITLE + w.lower())
        else:
            out.append((TITLE if w[0].isupper() else "") + w[0].lower())
            out.extend((CAPNEXT if c.isupper() else "") + c.lower() for c in w[1:])
        word.clear()

    for ch in text:
        if ch.isascii() and ch.isalpha():
            word.append(ch)
            continue
        if word:
            flush()
        out.append(ESC + ch if ch in (TITLE, ALLCAPS, CAPNEXT, ESC) else ch)
    if word:
        flush()
    return "".join(out)


ALPHABET = st.sampled_from(
    list("abcxyzABCXYZ") + list("0129") + list("'-_ .,!?\"") + ["\n", "\t", "\x00", "\x01", "\x1f", "\x7f"]
    + ["\ue000", TITLE, ALLCAPS, CAPNEXT, ESC]
    + list("éÉßİıΣσςЖжÀàǅﬁＡ") + ["\u0301", "😀", "👍", "\U0001f3fd", "\u200b", "\xa0"])
TEXTS = st.one_of(st.text(ALPHABET, max_size=60), st.text(max_size=40))


@settings(max_examples=600, deadline=None)
@given(TEXTS)
def test_roundtrip_and_matches_spec_transcription(text):
    encoded = encode(text)
    assert encoded == spec_encode(text)
    assert decode(encoded) == text
    assert not re.search(r"[A-Z]", encoded)


MARKERS = st.text(st.sampled_from(["a", "B", "é", " ", "1", TITLE, ALLCAPS, CAPNEXT, ESC]), max_size=12)


@settings(max_examples=400, deadline=None)
@given(MARKERS)
def test_decode_only_raises_value_error(s):
    try:
        decoded = decode(s)
    except ValueError as e:
        assert "index" in str(e)
    else:
        assert isinstance(decoded, str)


@pytest.mark.parametrize("s, index", [
    ("ab" + ESC, 3),                      # dangling ESC
    ("ab " + TITLE, 4),                   # dangling TITLE
    (ALLCAPS, 1),                         # dangling ALLCAPS
    ("a" + CAPNEXT, 2),                   # dangling CAPNEXT
    (TITLE + " a", 1),                    # marker before a non-letter
    (ALLCAPS + "1", 1),
    (CAPNEXT + "-", 1),
    (TITLE + "é", 1),
    ("a" + TITLE + "b", 1),               # TITLE inside a word
    ("ab" + ALLCAPS + "c", 2),            # ALLCAPS inside a word
    (CAPNEXT + CAPNEXT + "a", 1),         # doubled CAPNEXT
    (TITLE + TITLE + "a", 1),             # two modes pending
    (CAPNEXT + TITLE + "a", 1),           # mode after CAPNEXT
    (TITLE + ESC + TITLE, 2),             # escaped non-letter while a mode is pending: raises at once
    (TITLE + ESC + " ", 2),
    (TITLE + ESC + "a", 3),               # escaped letter keeps the mode pending: fails at the end ...
    (TITLE + ESC + "ab", 3),              # ... or at the next character
    (ALLCAPS + ESC + "a" + ESC + "b", 5),
])
def test_malformed_raises(s, index):
    with pytest.raises(ValueError, match=rf"caseops decode: .*index {index}\b"):
        decode(s)


def test_capnext_inside_word_is_valid():
    assert decode("i" + CAPNEXT + "phone") == "iPhone"
    assert decode(ALLCAPS + "ab" + CAPNEXT + "c") == "ABC"
    assert decode(ESC + ESC + ESC + TITLE) == ESC + TITLE


def test_non_canonical_forms_decode():
    # encode is not onto (spec 1.4): these all decode to "A" although only TITLE a is produced
    assert decode(CAPNEXT + "a") == decode(ALLCAPS + "a") == decode(TITLE + "a") == "A"
