"""A pure-Python stand-in for the Stanford PTB tokenizer that pycocoevalcap runs through Java.

pycocoevalcap's ``PTBTokenizer`` calls ``edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`` (CoreNLP
3.4.1) and then drops the punctuation tokens in :data:`PUNCTUATIONS`. Without Java it dies with a bare
``FileNotFoundError``. :func:`ptb_tokenize` reproduces that pipeline for captions: lower-casing, contractions (``is
n't``, ``'s``, ``ca n't``, ``gon na``, ``'em``, ``y' all``), brackets as ``-lrb-`` ..., quotes, dashes and dots
removed (``?!`` kept, as Java keeps it), numbers (``1,000.50``, ``3.5-inch``, ``10:30``, ``2 1/2``), abbreviations
(``u.s.``, ``mr.``, ``Ill.``; a single letter's period kept or not by the next word, even the next caption's, as
Java reads on), hyphenated words, unicode letters, characters outside the BMP dropped. ``tests/test_ptb.py``
compares it with the Java tokenizer on a corpus of tricky captions.
"""
from __future__ import annotations

import re
import unicodedata

PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# "W." as CoreNLP 3.4.1's tokenizer treats it, read off the Java tokenizer itself (W lower-case, capitalised and upper
# case; tests/test_ptb.py keeps checking it). The period stays on these, whatever follows ...
_KEPT = set("""
    adj adm adv al ala alex apr ariz assn assoc asst atty attys aug ave bancorp bhd bldg blvd brig bros calif
    capt cf cie cmdr co col colo comdr conn corp cos cpl ct dak dec dept det dr drs elec ens esq est etc ext feb
    fla fri ft ga gen gov govs hon inc ind insp intl invt jan jos jr jul jun kan kans ky lieut lt ltd maj mar md
    messrs mich minn mlle mme mo mon mont mr mrs ms msgr mt natl neb nev nov oct okla penn pfc ph plc pres prof
    profs pvt rd rep reps rev rt sen sens sep sept seq sfc sgt spc sq sr st ste supt supts sys tel tenn thu
    thurs treas tue tues univ va vs vt wed wis wisc wm wyo
""".split())
_KEPT_CAPITALISED = {"ark", "az", "del", "ill", "la", "mass", "miss", "ore", "pa", "tex", "wash"}  # Ill. yes, ill. no
_KEPT_NOT_UPPER = {"mfg", "mtg", "pty", "ptys"}  # Mfg. and mfg., but MFG. ends a sentence
# ... on these only before a number (one space or a line break, then a digit: "no. 5") ...
_BEFORE_NUMBER = {"art", "ca", "fig", "figs", "no", "nos", "op", "pp", "prop"}
# ... and on a single ASCII letter ("the letter b.") unless the next word (on this line or the next caption's) is one
# of these, capitalised, followed by a space or the end: "b. The" ends a sentence; "b. the", "b. Two", "b. The," do not
_SENTENCE_STARTS = {"a", "about", "according", "additionally", "after", "an", "as", "at", "but", "earlier", "he",
                    "her", "here", "however", "if", "in", "it", "last", "many", "more", "now", "once", "one", "other",
                    "our", "she", "since", "so", "some", "such", "that", "the", "their", "then", "there", "these",
                    "they", "this", "we", "what", "when", "while", "yet", "you"}
_NEXT_WORD = re.compile(r"[ \t\u00a0\n]+([A-Z][A-Za-z]*)(?=[ \t\u00a0\n]|$)")
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
    https?://[^\s"<>|()]*[^\s"<>|.!?(){},-]                   # urls stay whole, but for a last . , ! ? -
  | www\.(?:[^\s"<>|.!?(){},]+\.)+[a-z]{2,4}(?![\w-])(?:/[^\s"<>|()]*[^\s"<>|.!?(){},-])?
  | 'n' | '\d+s(?=\W|$)                                          # rock 'n' roll, '90s
  | '(?:em|till?|cause) | 'n(?![^\W_])                        # 'em (even in 'emma), 'til, 'cause, 'n
  | (?<![^\W_])y'(?=all|know)                                   # y'all, y'know: y' + all (but y 's, y 'll)
  | <[^\W\d_]+> | [:;]-?[()]                                     # <tag>, emoticons
  | '(?:s|re|ve|ll|d|m)(?![^\W_])                              # clitics after a number: 50 's
  | \d+(?::\d+)+                                               # times 10:30 (am split off)
  | (?<![\w/])\d{1,4}[- ]\d{1,4}/\d{1,4}(?![\w/])                # 2 1/2 one token (its space Java's no-break one)
  | [^\W\d_](?:\.[^\W\d_])+\.?                                 # u.s.  e.g.  p.m.
  | [#@][^\W\d_]\w*                                            # #hashtag @user
  | \w[\wMARKS]*(?:(?:[-/.]|(?<=\d),(?=\d{3})|(?<=[^\W\d_])'(?=[^\W\d_]))\w[\wMARKS]*)*\.?   # words, numbers, compounds
  | \.\.\.+ | -- | [?!]+ | \S
""".replace("MARKS", _MARKS), re.VERBOSE)


_URL = re.compile(r"https?://\S+|www\.\S+\.\S+")


def _keeps_period(stem: str, cased: str, after: str) -> bool:
    """Whether "stem." stays one token. ``cased``: the stem as written; ``after``: the text that follows the period
    as Java reads on (the rest of the line, then the next captions)."""
    if re.fullmatch(r"[^\W\d_](?:\.[^\W\d_])+", stem):  # u.s., e.g., p.m.
        return True
    if stem in _KEPT or (stem in _KEPT_CAPITALISED and cased[:1].isupper()) or \
            (stem in _KEPT_NOT_UPPER and not cased.isupper()):
        return True
    if stem in _BEFORE_NUMBER:
        return re.match(r"[ \t\n]\d", after) is not None
    if len(stem) == 1 and "a" <= stem <= "z":
        m = _NEXT_WORD.match(after)
        return not (m and m.group(1).lower() in _SENTENCE_STARTS)
    return False


def _split_word(tok: str, cased: str, after: str) -> list[str]:
    period = ""
    if tok.endswith(".") and tok != ".":
        stem = tok[:-1]
        tok, period = (tok, "") if _keeps_period(stem, cased[:-1], after) else (stem, ".")
    out: list[str]
    if tok in _SPLIT_WORDS:
        out = list(_SPLIT_WORDS[tok])
    elif len(tok) > 3 and tok.endswith("n't"):
        out = [tok[:-3], "n't"]
    else:
        m = re.fullmatch(r"(.+?)('s|'re|'ve|'ll|'d|'m)", tok)
        out = [m.group(1), m.group(2)] if m and "'" not in m.group(1)[-1:] else [tok]
    return out + ([period] if period else [])


def _prepared(text: str) -> str:
    text = "".join(c for c in text.translate(_NORMALISE) if ord(c) <= 0xFFFF).replace("’", "'")
    return re.sub(r"(?<=\w)'n'(?=\w)", " 'n' ", _ENCLOSING.sub("", text), flags=re.IGNORECASE)


def ptb_tokenize_line(text: str, following: str = "") -> list[str]:
    """PTB tokens of one caption (lower-cased), punctuation included. ``following``: the captions after it in the
    tokenizer's input, one a line (whether "b." at the end keeps its period depends on the next word)."""
    cased = _prepared(text)
    text = cased.lower()
    if len(cased) != len(text):  # a letter whose lower case is longer (İ): no case to go by
        cased = text
    tokens: list[str] = []
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        if tok[0] in ":;" and len(tok) > 1:
            tokens.append(tok[:-1] + _BRACKETS[tok[-1]])
        elif tok in _BRACKETS:
            tokens.append(_BRACKETS[tok])
        elif tok == '"':
            tokens.append("''")
        elif re.fullmatch(r"\d+ \d+/\d+", tok):
            tokens.append(tok.replace(" ", "\u00a0"))
        elif tok.startswith("..."):  # any run of three dots or more is Java's "..."
            tokens.append("...")
        elif re.match(r"\w", tok) and not _URL.fullmatch(tok):
            tokens.extend(_split_word(tok, cased[m.start():m.end()], cased[m.end():] + "\n" + following))
        else:
            tokens.append(tok)
    return tokens


def _next_words(lines: list[str], start: int, following: str = "") -> str:
    """The text Java reads on after line ``start - 1``: the lines from ``start`` to the first that is not blank
    (Java skips empty lines), then ``following`` if they were all blank."""
    end = start
    while end < len(lines) and not lines[end].strip():
        end += 1
    return "\n".join(lines[start:end + 1]) + ("\n" + following if end >= len(lines) and following else "")


def ptb_tokenize(captions_for_image: dict, following: str = "") -> dict:
    """Same input and output as ``pycocoevalcap``'s ``PTBTokenizer().tokenize``: ``{key: [{"caption": str}]}`` ->
    ``{key: [tokenised caption]}`` with punctuation removed. ``following``: the captions that come after these in
    the same input (a slice of a larger set), one a line."""
    lines = [one_line(c["caption"]) for v in captions_for_image.values() for c in v]  # Java's input, in its order
    out, n = {}, 0
    for k, v in captions_for_image.items():
        out[k] = []
        for _ in v:
            after = _next_words(lines, n + 1, following)
            out[k].append(" ".join(t for t in ptb_tokenize_line(lines[n], after) if t not in PUNCTUATIONS))
            n += 1
    return out
