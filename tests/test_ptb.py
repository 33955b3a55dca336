"""The Python PTB tokenizer must agree with pycocoevalcap's Java one on tricky captions."""
import json
from pathlib import Path

import pytest

from hw3lib.metrics import java_available
from hw3lib.ptb import ptb_tokenize

CORPUS = [line.rstrip("\n") for line in (Path(__file__).parent / "ptb_corpus.txt").open(encoding="utf-8")]


def _both(captions):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    data = {i: [{"caption": c}] for i, c in enumerate(captions)}
    return PTBTokenizer().tokenize(data), ptb_tokenize(data)


@pytest.mark.skipif(not java_available(), reason="needs java (pycocoevalcap's PTB tokenizer)")
def test_agrees_with_java_on_tricky_captions():
    java, python = _both(CORPUS)
    diff = [(CORPUS[i], java[i][0], python[i][0]) for i in java if java[i] != python[i]]
    assert not diff, diff


@pytest.mark.skipif(not java_available(), reason="needs java (pycocoevalcap's PTB tokenizer)")
def test_agrees_with_java_on_the_world(world):
    caps = [a["caption"] for a in json.loads((world / "p2_data/val.json").read_text())["annotations"]][:500]
    java, python = _both(caps)
    assert java == python


def test_known_tokens():
    out = ptb_tokenize({0: [{"caption": "A man's dog (big) isn't here."}]})
    assert out == {0: ["a man 's dog -lrb- big -rrb- is n't here"]}
    out = ptb_tokenize({0: [{"caption": "Y'all get 'em?! A 2 1/2 year old...."}]})  # Java's, checked below
    assert out == {0: ["y' all get 'em ?! a 2\u00a01/2 year old"]}


@pytest.mark.skipif(not java_available(), reason="needs java (pycocoevalcap's PTB tokenizer)")
def test_java_runner_equals_pycocoevalcap_and_leaves_nothing_behind(tmp_path):
    """hw3lib's runner of the Java tokenizer gives pycocoevalcap's output exactly, with several captions per key
    and newlines inside captions, and writes nothing into pycocoevalcap's package folder."""
    from pycocoevalcap.tokenizer import ptbtokenizer
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from hw3lib.metrics import java_ptb_tokenize

    folder = Path(ptbtokenizer.__file__).parent
    before = set(folder.iterdir())
    data = {f"k{i}": [{"caption": c}, {"caption": c.upper() + " \n"}] for i, c in enumerate(CORPUS[:40])}
    assert java_ptb_tokenize(data) == PTBTokenizer().tokenize(data)
    java_ptb_tokenize(data)
    assert set(folder.iterdir()) == before


@pytest.mark.parametrize("tokenizer", ["java", "python"])
def test_a_line_break_in_a_caption_shifts_no_other_caption(tokenizer):
    """Java's PTB tokenizer (-preserveLines) ends a line at \\r, \\v, \\f, U+2028 and U+2029 as at \\n: one such
    caption would become two lines and pair every later caption with its neighbour's tokens. Each becomes a space,
    with Java as with the port, and the scores equal those of the caption with a space."""
    if tokenizer == "java" and not java_available():
        pytest.skip("needs java (pycocoevalcap's PTB tokenizer)")
    from hw3lib.cider import cider, java_ptb_tokenize
    from hw3lib.ptb import ptb_tokenize

    tokenize = java_ptb_tokenize if tokenizer == "java" else ptb_tokenize
    for brk in ["\n", "\r", "\r\n", "\v", "\f", "\u2028", "\u2029"]:
        data = {"1": [{"caption": f"a red{brk}circle"}], "2": [{"caption": "a blue square"}]}
        assert tokenize(data) == {"1": ["a red circle"], "2": ["a blue square"]}, repr(brk)
    refs = {"1": ["a red circle", "a red ring"], "2": ["a blue square", "one blue box"],
            "3": ["a green star", "a star"]}
    plain = {"1": "a red circle", "2": "a blue square", "3": "a green star"}
    broken = {**plain, "1": "a red\rcircle"}
    if tokenizer == "java":
        assert cider(broken, refs) == cider(plain, refs)


def test_a_single_letters_period_depends_on_the_next_word_even_in_the_next_caption():
    """CoreNLP 3.4.1 keeps "b." one token unless a common sentence start follows it ("b. The"), on the same line or
    at the start of the next caption in its input; "no." keeps its period only before a number; "Ill." is an
    abbreviation, "ill." a word. Read off the Java tokenizer (checked against it below)."""
    data = {"1": [{"caption": "a sign with the letter b."}, {"caption": "The sign is red."}],
            "2": [{"caption": "a sign with the letter b."}, {"caption": "two signs, no. 5 and no."}],
            "3": [{"caption": "Springfield, Ill. at night"}, {"caption": "an ill. dog"}],
            "4": [{"caption": "the letter x. The end"}, {"caption": "the letter a."}]}
    assert ptb_tokenize(data) == {"1": ["a sign with the letter b", "the sign is red"],
                                  "2": ["a sign with the letter b.", "two signs no. 5 and no"],
                                  "3": ["springfield ill. at night", "an ill dog"],
                                  "4": ["the letter x the end", "the letter a."]}
    # Java reads on over empty captions, however many
    gap = {"1": [{"caption": "the letter b."}, *[{"caption": ""}] * 5], "2": [{"caption": "The dog"}]}
    assert ptb_tokenize(gap)["1"][0] == "the letter b"
    # a slice of a larger input: what follows it decides its last caption
    assert ptb_tokenize({"1": [{"caption": "the letter b."}]}, following="The dog") == {"1": ["the letter b"]}
    assert ptb_tokenize({"1": [{"caption": "the letter b."}]}, following="the dog") == {"1": ["the letter b."]}


@pytest.mark.skipif(not java_available(), reason="needs java (pycocoevalcap's PTB tokenizer)")
def test_abbreviations_agree_with_java_whatever_follows():
    """Every "W." the port treats apart from ordinary words (in three cases), the single letters, and a few ordinary
    words, each before a lower-case word, a sentence start, a number and a non-starter capital, on the same line
    and on the next."""
    from hw3lib import ptb
    from hw3lib.cider import java_ptb_tokenize

    words = sorted(ptb._KEPT | ptb._KEPT_CAPITALISED | ptb._KEPT_NOT_UPPER | ptb._BEFORE_NUMBER
                   | set("abcdefghijklmnopqrstuvwxyz") | {"dog", "red", "http", "www", "ok", "st", "messr"})
    starts = sorted(ptb._SENTENCE_STARTS)
    data, n = {}, 0
    for w in words:
        for form in {w, w.capitalize(), w.upper()}:
            for after in ("standing dog", f"{starts[n % len(starts)].capitalize()} dog", "2 dogs", "Two dogs",
                          f"{starts[n % len(starts)].upper()}", "The, dog"):
                data[f"{n}a"], data[f"{n}b"] = [{"caption": f"x {form}."}], [{"caption": after}]
                data[f"{n}c"] = [{"caption": f"x {form}. {after}"}]
                n += 1
    java, python = java_ptb_tokenize(data), ptb_tokenize(data)
    diff = [(data[k][0]["caption"], java[k], python[k]) for k in data if java[k] != python[k]]
    assert not diff, diff[:20]


@pytest.mark.skipif(not java_available(), reason="needs java (pycocoevalcap's PTB tokenizer)")
def test_agrees_with_java_on_random_captions():
    """Captions drawn at random from words, numbers, abbreviations, contractions, URLs and punctuation, one after
    another in one input (so each caption's end also meets the next one's start)."""
    import random

    from hw3lib.cider import java_ptb_tokenize

    vocab = ("a man woman dog cat sitting on the table with of in front red blue bus St. Mr. U.S. no. 5 10:30 3.5 "
             "1,000 $20 it's don't can't cannot gonna o'clock rock'n'roll T-shirt 4x4 A.M. p.m. e.g. i.e. etc. vs. B "
             "Z x I'm they're y'all 'em '90s co-op 50% & @home #tag :) ;-) ... -- - / * + = ~ ^ | < > [ ] { } ( ) \" "
             "' ` , ; : ! ? !! ?! Dr. Ave. Inc. Jan. Ltd. Calif. Ill. fig. Fig. The An http://x.com www.a.org 2nd "
             "1st 6ft 12-pack 2-3 1/2 café naïve").split()
    rng = random.Random(1)

    def caption():
        text = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))
        text = text[0].upper() + text[1:] if rng.random() < 0.5 else text
        return text + rng.choice([".", " .", "", "!", "?", "..", "...."])

    data = {str(i): [{"caption": caption()}] for i in range(3000)}
    java, python = java_ptb_tokenize(data), ptb_tokenize(data)
    diff = [(data[k][0]["caption"], java[k], python[k]) for k in data if java[k] != python[k]]
    assert not diff, diff[:10]
