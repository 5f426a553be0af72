"""CaseOps v1 ("lossless_caps_caseops_v1"): a reversible word-level case codec applied before tokenization.

Uppercase ASCII letters are replaced by lowercase letters plus control symbols from the Unicode Private Use
Area, so the tokenizer's vocabulary needs no uppercase pieces (shared/spec/01-data.md section 1, PR #2135).

    TITLE   U+E001  the first letter of the following word is uppercase
    ALLCAPS U+E002  the whole following word (2+ letters) is uppercase
    CAPNEXT U+E003  the next letter is uppercase (capitals inside a word: iPhone, McDonald)
    ESC     U+E004  the next character is a literal (used for U+E001..U+E004 found in the input)

A "word" is a maximal run of ASCII letters A-Z/a-z; every other character (digits, punctuation, whitespace,
non-ASCII letters such as É or Σ) separates words and is copied unchanged.

Usage: `from lossless_caps import encode, decode`; `decode(encode(s)) == s` for every string `s`.
"""
import re

TITLE = "\ue001"
ALLCAPS = "\ue002"
CAPNEXT = "\ue003"
ESC = "\ue004"
CONTROL_SYMBOLS = TITLE + ALLCAPS + CAPNEXT + ESC

# Only words holding an uppercase letter, and literal control symbols, need rewriting; the lookbehind keeps a
# match from starting inside a word, so every match is a whole word.
_NEEDS_REWRITE = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CAPNEXT_LOWER = str.maketrans({c: CAPNEXT + c.lower() for c in _UPPER})


def _encode_match(match: re.Match) -> str:
    word = match.group()
    if word in CONTROL_SYMBOLS:
        return ESC + word
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + word.lower()
    head, tail = word[0], word[1:]
    if head.isupper():
        # covers Title words and a lone capital ("A" -> TITLE a); other capitals get CAPNEXT each
        return TITLE + head.lower() + tail.translate(_CAPNEXT_LOWER)
    return head + tail.translate(_CAPNEXT_LOWER)


def encode(text: str) -> str:
    """CaseOps-encode `text` (spec 01 section 1.2)."""
    return _NEEDS_REWRITE.sub(_encode_match, text)


def _is_ascii_letter(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def decode(text: str) -> str:
    """Invert `encode`; raise ValueError naming the problem and its index on input `encode` cannot produce
    (and that the reference decoder also rejects), spec 01 section 1.3."""
    out = []
    pending_escape = allcaps_active = pending_capnext = in_word = False
    pending_mode = None  # None, TITLE or ALLCAPS
    for i, ch in enumerate(text):
        if pending_escape:
            pending_escape = False
            in_word = _is_ascii_letter(ch)
            if pending_mode is not None and not in_word:
                raise ValueError(f"caseops decode: escaped non-letter {ch!r} at index {i} while a "
                                 f"{_name(pending_mode)} marker is pending")
            if not in_word:
                allcaps_active = False
            out.append(ch)
        elif ch == ESC:
            pending_escape = True
        elif ch == TITLE or ch == ALLCAPS:
            if pending_mode is not None or in_word or pending_capnext:
                where = "inside a word" if in_word else "after another marker"
                raise ValueError(f"caseops decode: {_name(ch)} marker at index {i} {where}")
            pending_mode = ch
        elif ch == CAPNEXT:
            if pending_capnext:
                raise ValueError(f"caseops decode: doubled CAPNEXT marker at index {i}")
            pending_capnext = True
        elif _is_ascii_letter(ch):
            if not in_word:
                upper = pending_mode is not None or pending_capnext
                allcaps_active = pending_mode == ALLCAPS
                pending_mode, pending_capnext, in_word = None, False, True
            elif pending_mode is not None:
                raise ValueError(f"caseops decode: {_name(pending_mode)} marker pending inside a word at "
                                 f"index {i}")
            else:
                upper = allcaps_active or pending_capnext
                pending_capnext = False
            out.append(ch.upper() if upper else ch)
        else:
            if pending_mode is not None or pending_capnext:
                marker = _name(pending_mode) if pending_mode is not None else "CAPNEXT"
                raise ValueError(f"caseops decode: {marker} marker followed by non-letter {ch!r} at index {i}")
            out.append(ch)
            in_word = allcaps_active = False
    if pending_escape or pending_mode is not None or pending_capnext:
        dangling = "ESC" if pending_escape else _name(pending_mode) if pending_mode else "CAPNEXT"
        raise ValueError(f"caseops decode: dangling {dangling} marker at end of text (index {len(text)})")
    return "".join(out)


def _name(marker: str) -> str:
    return {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}[marker]
