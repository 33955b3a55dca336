"""A pure-Python stand-in for the Stanford PTB tokenizer that pycocoevalcap runs through Java.

pycocoevalcap's ``PTBTokenizer`` calls ``edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`` (CoreNLP
3.4.1) and then drops the punctuation tokens in :data:`PUNCTUATIONS`. Without Java it dies with a bare
``FileNotFoundError``. :func:`ptb_tokenize` reproduces that pipeline for captions: lower-casing, contractions
(``is n't``, ``'s``, ``ca n't``, ``gon na``), brackets as ``-lrb-`` ..., quotes and dashes removed, numbers
(``1,000.50``, ``3.5-inch``, ``10:30``), abbreviations (``u.s.``, ``mr.``), hyphenated words, unicode letters,
characters outside the BMP dropped. ``tests/test_ptb.py`` compares it with the Java tokenizer on a corpus of
tricky captions.
"""
from __future__ import annotations

import re
import unicodedata

PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "ave", "no", "etc", "vs", "jr", "sr", "inc", "co", "corp", "ltd",
                  "mt", "ft", "prof", "gen", "sgt", "capt", "col", "lt", "rev", "jan", "feb", "mar", "apr", "jun",
                  "jul", "aug", "sep", "sept", "oct", "nov", "dec", "blvd", "rd", "bros", "messrs"}
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
                "lemme": ["lem", "me"], "gimme": ["gim", "me"]}
_NORMALISE = str.maketrans({"“": " \" ", "”": " \" ", "‘": " ` ", "–": " -- ", "—": " -- ", "…": " ... ",
                            "½": "1/2", "¼": "1/4", "¾": "3/4", "⅓": "1/3", "⅔": "2/3"})
# what Java's PTB tokenizer (-preserveLines) takes for the end of a line: in a caption, each would cut it in two and
# pair every later caption with its neighbour's tokens
_LINE_BREAKS = re.compile("[\n\r\v\f\u2028\u2029]+")


def one_line(caption: str) -> str:
    """``caption`` with every line break that the PTB tokenizer knows (``\\n``, ``\\r``, ``\\v``, ``\\f``, U+2028,
    U+2029) replaced by a space: one caption stays one line, so it cannot shift the others."""
    return _LINE_BREAKS.sub(" ", caption)


def _ranges(categories: tuple[str, ...]) -> str:
    """A regex character class body with every BMP code point of these Unicode categories."""
    points = [c for c in range(0x300, 0x10000) if unicodedata.category(chr(c)) in categories]
    spans, start = [], points[0]
    for a, b in zip(points, points[1:] + [None]):
        if b != a + 1:
            spans.append(f"\\u{start:04x}" + (f"-\\u{a:04x}" if a != start else ""))
            start = b
    return "".join(spans)


# combining marks (accents written as a second code point: cafe\u0301) stay in their word, as Java keeps them;
# enclosing marks (U+20DD ...) are untokenizable to Java, which drops them
_MARKS = _ranges(("Mn", "Mc"))
_ENCLOSING = re.compile(f"[{_ranges(('Me',))}]")

_TOKEN = re.compile(r"""
    https?://\S+ | www\.\S+                                   # urls stay whole
  | 'n' | '\d+s(?=\W|$)                                          # rock 'n' roll, '90s
  | <[^\W\d_]+> | [:;]-?[()]                                     # <tag>, emoticons
  | '(?:s|re|ve|ll|d|m)(?![^\W_])                              # clitics after a number: 50 's
  | \d+(?::\d+)+                                               # times 10:30 (am split off)
  | [^\W\d_](?:\.[^\W\d_])+\.?                                 # u.s.  e.g.  p.m.
  | [#@][^\W\d_]\w*                                            # #hashtag @user
  | \w[\wMARKS]*(?:(?:[-/.]|(?<=\d),(?=\d{3})|(?<=[^\W\d_])'(?=[^\W\d_]))\w[\wMARKS]*)*\.?   # words, numbers, compounds
  | \.\.\.+ | -- | !+ | \?+ | \S
""".replace("MARKS", _MARKS), re.VERBOSE)


def _split_word(tok: str, at_line_end: bool) -> list[str]:
    period = ""
    if tok.endswith(".") and tok != ".":
        stem = tok[:-1]
        keep = stem in _ABBREVIATIONS or re.fullmatch(r"[^\W\d_](?:\.[^\W\d_])+", stem)
        tok, period = (tok, "") if keep else (stem, ".")
    out: list[str]
    if tok in _SPLIT_WORDS:
        out = list(_SPLIT_WORDS[tok])
    elif len(tok) > 3 and tok.endswith("n't"):
        out = [tok[:-3], "n't"]
    else:
        m = re.fullmatch(r"(.+?)('s|'re|'ve|'ll|'d|'m)", tok)
        out = [m.group(1), m.group(2)] if m and "'" not in m.group(1)[-1:] else [tok]
    return out + ([period] if period else [])


def ptb_tokenize_line(text: str) -> list[str]:
    """PTB tokens of one caption (lower-cased), punctuation included."""
    text = "".join(c for c in text.translate(_NORMALISE) if ord(c) <= 0xFFFF).replace("’", "'").lower()
    text = _ENCLOSING.sub("", text)
    text = re.sub(r"(?<=\w)'n'(?=\w)", " 'n' ", text)
    tokens: list[str] = []
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        if tok[0] in ":;" and len(tok) > 1:
            tokens.append(tok[:-1] + _BRACKETS[tok[-1]])
        elif tok in _BRACKETS:
            tokens.append(_BRACKETS[tok])
        elif tok == '"':
            tokens.append("''")
        elif re.match(r"\w", tok) and not tok.startswith(("http", "www.")):
            tokens.extend(_split_word(tok, m.end() == len(text.rstrip())))
        else:
            tokens.append(tok)
    return tokens


def ptb_tokenize(captions_for_image: dict) -> dict:
    """Same input and output as ``pycocoevalcap``'s ``PTBTokenizer().tokenize``: ``{key: [{"caption": str}]}`` ->
    ``{key: [tokenised caption]}`` with punctuation removed."""
    return {k: [" ".join(t for t in ptb_tokenize_line(one_line(c["caption"])) if t not in PUNCTUATIONS)
                for c in v] for k, v in captions_for_image.items()}
