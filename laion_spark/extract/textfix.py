"""`ftfy.fix_text` with its default configuration, the same output for every string, without
running the fixers that provably cannot change the string.

Why: LAION-5B's crawler ran `ftfy.fix_text` on alt text, and on non-ASCII alt text it costs
~65 µs a string, as much as language id; most of that is its mojibake detector (`is_bad`, a
large regex, ~17 µs) and the fixers' passes, on strings none of them would change.

How it stays exact: this is ftfy's own loop (`fix_text` → per-line segments → `fix_and_explain`
until nothing changes), calling ftfy's own fixer functions, each one skipped only when its
input holds none of the characters it acts on:
- `unescape_html`: only acts on `&` (its pattern starts with `&`); off in a segment holding `<`
  and every segment after it, as ftfy's "auto" does;
- `fix_encoding`: returns the text unchanged unless `badness.is_bad` matches; every branch of
  `BADNESS_RE` needs at least one character of a class made only of non-ASCII characters (read
  from ftfy's compiled pattern at import, see `_mojibake_witnesses`), so a text with none of
  those characters cannot be bad;
- the other fixers (C1 controls, ligatures, character width, curly quotes, line breaks,
  surrogates, terminal escapes, control characters) act only on the characters of their own
  tables and patterns (read from ftfy's tables);
- NFC only when `unicodedata.is_normalized` says the text is not NFC.
If ftfy's pattern ever has a branch without such a class, the module falls back to calling
`ftfy.fix_text` itself. `tests/test_extract_textfix.py` checks equality on every alt text of the
real data and on generated mojibake.
"""
from __future__ import annotations

import functools
import logging
import re
import unicodedata
from typing import Callable, Optional

log = logging.getLogger(__name__)

_MAX_DECODE_LENGTH = 1_000_000  # ftfy's TextFixerConfig.max_decode_length default
# The fixers `fix_and_explain` runs after `fix_encoding`, in its order.
_FIXER_ORDER = ("fix_c1_controls", "fix_latin_ligatures", "fix_character_width", "uncurl_quotes",
                "fix_line_breaks", "fix_surrogates", "remove_terminal_escapes", "remove_control_chars")


def _char_class(codepoints: set[int]) -> str:
    """A regex character class matching exactly these code points (merged into ranges)."""
    parts, cps = [], sorted(codepoints)
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        lo, hi = cps[i], cps[j]
        parts.append(re.escape(chr(lo)) if lo == hi else f"{re.escape(chr(lo))}-{re.escape(chr(hi))}")
        i = j + 1
    return "[" + "".join(parts) + "]"


def _class_codepoints(item) -> Optional[set[int]]:
    """The code points of a mandatory one-character element of a parsed pattern (a literal or a
    plain character class), or None when it is anything else (negated, categories, repeats)."""
    from re import _constants as c

    op, arg = item
    if op is c.LITERAL:
        return {arg}
    if op is not c.IN:
        return None
    out: set[int] = set()
    for sub_op, sub_arg in arg:
        if sub_op is c.LITERAL:
            out.add(sub_arg)
        elif sub_op is c.RANGE:
            out.update(range(sub_arg[0], sub_arg[1] + 1))
        else:  # NEGATE, CATEGORY…: not a plain set
            return None
    return out


def _mojibake_witnesses(pattern: re.Pattern) -> Optional[set[int]]:
    """Code points such that every match of `pattern` (ftfy's BADNESS_RE) holds one of them, or
    None when that cannot be shown from its structure. Per branch of the top-level alternation,
    one mandatory element whose characters are all non-ASCII is taken (the one with the fewest
    letters, then the fewest characters: letters are what ordinary text is made of)."""
    from re import _constants as c
    from re import _parser

    if pattern.flags & re.IGNORECASE:
        return None
    tree = _parser.parse(pattern.pattern, pattern.flags)
    if len(tree.data) == 1 and tree.data[0][0] is c.BRANCH:
        branches = tree.data[0][1][1]
    else:
        branches = [tree]
    witnesses: set[int] = set()
    for branch in branches:
        best = None
        for item in branch.data:
            cps = _class_codepoints(item)
            if not cps or min(cps) < 0x80:
                continue
            key = (sum(1 for cp in cps if unicodedata.category(chr(cp)).startswith("L")), len(cps))
            if best is None or key <= best[0]:  # (a tie: the later one, e.g. Ђ of `вЂ`)
                best = (key, cps)
        if best is None:
            return None
        witnesses |= best[1]
    return witnesses


@functools.lru_cache(maxsize=1)
def _tables() -> Optional[tuple[Callable, Callable, Callable, dict, Callable]]:
    """(maybe-bad search, any-fixer-char search, fix_encoding, FIXERS, unescape_html), or None
    when the fast path cannot be proven for the installed ftfy."""
    import ftfy
    from ftfy import badness, chardata, fixes

    witnesses = _mojibake_witnesses(badness.BADNESS_RE)
    if witnesses is None:
        log.warning("ftfy's BADNESS_RE has a branch without a non-ASCII class: alt text goes "
                    "through ftfy.fix_text unshortened")
        return None
    acted_on: set[int] = set()
    acted_on |= set(range(0x80, 0xA0))  # fix_c1_controls: C1_CONTROL_RE
    acted_on |= set(chardata.LIGATURES)  # fix_latin_ligatures
    acted_on |= set(chardata.WIDTH_MAP)  # fix_character_width
    for quote_re in (chardata.SINGLE_QUOTE_RE, chardata.DOUBLE_QUOTE_RE):  # uncurl_quotes
        acted_on |= _class_codepoints(_parse_one(quote_re))
    acted_on |= {0x0D, 0x2028, 0x2029, 0x85}  # fix_line_breaks (\r\n, \r, LS, PS, NEL)
    acted_on |= set(range(0xD800, 0xE000))  # fix_surrogates
    acted_on.add(0x1B)  # remove_terminal_escapes: ANSI_RE starts with ESC
    acted_on |= set(chardata.CONTROL_CHARS)  # remove_control_chars
    return (re.compile(_char_class(witnesses)).search, re.compile(_char_class(acted_on)).search,
            ftfy.fix_encoding, ftfy.FIXERS, fixes.unescape_html)


def _parse_one(pattern: re.Pattern):
    """The single element of a one-character-class pattern (ftfy's quote patterns)."""
    from re import _parser

    tree = _parser.parse(pattern.pattern, pattern.flags)
    if len(tree.data) != 1 or _class_codepoints(tree.data[0]) is None:
        raise ValueError(f"not a one-class pattern: {pattern.pattern!r}")
    return tree.data[0]


def fix_text(text: str) -> str:
    """`ftfy.fix_text(text)` (default configuration), skipping fixers that cannot act."""
    tables = _tables()
    if tables is None or len(text) > _MAX_DECODE_LENGTH:
        import ftfy

        return ftfy.fix_text(text)
    if "\n" not in text:
        return _fix_segment(text, "<" not in text, tables)
    # ftfy's segmentation: lines with their "\n"; once a segment holds "<", HTML unescaping is
    # off for it and every later segment (fix_text replaces its config)
    out = []
    pos = 0
    unescape = True
    while pos < len(text):
        textbreak = text.find("\n", pos) + 1 or len(text)
        segment = text[pos:textbreak]
        if "<" in segment:
            unescape = False
        out.append(_fix_segment(segment, unescape, tables))
        pos = textbreak
    return "".join(out)


def _fix_segment(text: str, unescape: bool, tables) -> str:
    """`ftfy.fix_and_explain(segment)[0]` with the skips described in the module doc."""
    maybe_bad, acted_on, fix_encoding, fixers, unescape_html = tables
    while True:
        original = text
        if unescape and "&" in text:
            text = unescape_html(text)
        if maybe_bad(text):
            text = fix_encoding(text)
        if acted_on(text):
            for name in _FIXER_ORDER:
                text = fixers[name](text)
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if text == original:
            return text
