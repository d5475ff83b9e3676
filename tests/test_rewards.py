"""Tests for nanosrpo/rewards.py. Table-driven: each row is one case from the spec (issue 3)."""

import math
import re
import threading
import time

import pytest

from nanosrpo.rewards import (
    KEYS,
    MAX_ANSWER_CHARS,
    _parse_gold,
    f_len,
    is_correct,
    parse_response,
    srpo_reward,
    validate_gold,
)

E1 = math.exp(-1)


def words(s):
    return len(s.split())


def one(a1, r1="a b c"):
    return f"<think>{r1}</think> <answer>{a1}</answer>"


def two(a1, a2, reflection="x y"):
    # with word counting and one-word answers: n1 = 3 + 1 = 4 and L = 8 = T_target, so f_len = 1
    return (
        f"<think>a b c</think> <answer>{a1}</answer> <reflection>{reflection}</reflection> "
        f"<think>y</think> <answer>{a2}</answer>"
    )


def scores(total=0.0, format=0.0, accuracy=0.0, reflection=0.0, effectiveness=0.0, length=0.0):
    return dict(
        total=total, format=format, accuracy=accuracy, reflection=reflection, effectiveness=effectiveness, length=length
    )


def assert_scores(got, want):
    assert tuple(got) == KEYS
    assert got == pytest.approx(want)
    assert got["total"] == pytest.approx(sum(v for k, v in got.items() if k != "total"))


# -----------------------------------------------------------------------------
# parse_response


@pytest.mark.parametrize(
    "text, want",
    [
        (one("21"), (1, "a b c", "21", None, None, None)),
        ("<think>r</think><answer>a</answer>", (1, "r", "a", None, None, None)),  # no whitespace needed
        ("\n <think> r </think>\n\n<answer> a </answer> \n", (1, "r", "a", None, None, None)),  # stripped
        (two("1", "2"), (2, "a b c", "1", "x y", "y", "2")),
        ("<think>é ∑ 😀</think><answer>ü</answer>", (1, "é ∑ 😀", "ü", None, None, None)),
        ("<think>a < b and <Think> x</think><answer>1</answer>", (1, "a < b and <Think> x", "1", None, None, None)),
    ],
)
def test_parse_well_formed(text, want):
    assert tuple(parse_response(text)) == want


MALFORMED = {
    "empty": "",
    "whitespace only": "  \n ",
    "plain text": "the answer is 21",
    "missing think": "<answer>21</answer>",
    "missing answer": "<think>r</think>",
    "reordered": "<answer>21</answer> <think>r</think>",
    "empty think": "<think> </think> <answer>21</answer>",
    "empty answer": "<think>r</think> <answer>\n</answer>",
    "empty reflection": (
        "<think>r</think> <answer>1</answer> <reflection> </reflection> <think>s</think> <answer>2</answer>"
    ),
    "text before": "Sure! <think>r</think> <answer>21</answer>",
    "text between": "<think>r</think> so <answer>21</answer>",
    "text after": "<think>r</think> <answer>21</answer> done",
    "unclosed think": "<think>r <answer>21</answer>",
    "unclosed answer": "<think>r</think> <answer>21",
    "stray close": "<think>r</think> </think> <answer>21</answer>",
    "mismatched close": "<think>r</answer> <answer>21</answer>",
    "nested think": "<think>a <think>b</think></think> <answer>21</answer>",
    "answer inside think": "<think>r <answer>21</answer></think> <answer>21</answer>",
    "two answers in a round": "<think>r</think> <answer>1</answer> <answer>2</answer>",
    "two rounds no reflection": "<think>r</think> <answer>1</answer> <think>s</think> <answer>2</answer>",
    "reflection only round": "<think>r</think> <answer>1</answer> <reflection>f</reflection>",
    "reflection first": "<reflection>f</reflection> <think>r</think> <answer>1</answer>",
    "second round missing answer": "<think>r</think> <answer>1</answer> <reflection>f</reflection> <think>s</think>",
    "three rounds": two("1", "2") + " <reflection>f</reflection> <think>t</think> <answer>3</answer>",
    "uppercase tags": "<Think>r</Think> <Answer>1</Answer>",
    "spaced tags": "<think >r</think > <answer>1</answer>",
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_parse_malformed(text):
    assert tuple(parse_response(text)) == (0, None, None, None, None, None)


# -----------------------------------------------------------------------------
# is_correct


@pytest.mark.parametrize(
    "answer, gold, want",
    [
        # numbers and expressions compare by value
        ("21", "21", True),
        ("21.0", "21", True),
        ("$21$", "21", True),
        ("\\boxed{21}", "21", True),
        ("$\\boxed{21}$", "21", True),
        ("x = 21", "21", True),
        ("21", "$21$", True),
        ("21", "\\boxed{21}", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\frac{1}{2}", "0.5", True),
        ("1/2", "0.5", True),
        ("0.001", "10^{-3}", True),
        ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True),
        ("3\\sqrt{3}", "\\sqrt{27}", True),
        ("22", "21", False),
        ("21 or 22", "21", False),
        ("-21", "21", False),
        ("2", "21", False),
        # model answers math-verify cannot parse are simply wrong
        ("\\frac{", "21", False),
        ("}{", "21", False),
        ("", "21", False),
        ("   ", "21", False),
        ("$$", "21", False),
        ("\\", "21", False),
        ("ñ€😀", "21", False),
        ("1" * (MAX_ANSWER_CHARS + 1), "1", False),
        # multiple-choice letters, in any usual form, compared as letters
        ("B", "B", True),
        ("(B)", "B", True),
        ("B.", "B", True),
        ("B)", "B", True),
        ("\\boxed{B}", "B", True),
        ("B: 40", "B", True),
        ("(B) 40", "B", True),
        ("$B$", "B", True),
        ("b", "B", True),
        ("B", "(B)", True),
        ("A", "B", False),
        ("(C)", "B", False),
        ("C: 40", "B", False),
        # never by substring: the reference code's `"b" in text` bug
        ("about 40", "B", False),
        ("bob", "B", False),
        ("B or C", "B", False),
        ("A, B, C, D", "B", False),
        # a lone lowercase gold letter is math, not a choice
        ("x", "x", True),
        ("y", "x", False),
    ],
)
def test_is_correct(answer, gold, want):
    assert is_correct(answer, gold) is want


CHOICES = ["30", "40", "50 cm"]


@pytest.mark.parametrize(
    "answer, gold, choices, want",
    [
        ("B", "B", CHOICES, True),
        ("40", "B", CHOICES, True),  # naming the choice text instead of the letter
        ("$40$", "B", CHOICES, True),
        ("40.0", "B", CHOICES, True),
        ("50 cm", "C", CHOICES, True),
        ("30", "B", CHOICES, False),
        ("C", "B", CHOICES, False),
        ("B", "40", CHOICES, True),  # gold given as choice text, answer as letter
        ("40", "40", CHOICES, True),
        ("Paris", "B", ["London", "Paris"], True),
        ("paris.", "B", ["London", "Paris"], True),
        ("Sirap", "B", ["London", "Paris"], False),  # prose choices never compare as algebra (P*a*r*i*s)
        ("Sirap", "Paris", ["London", "Paris"], False),
        ("B", "Paris", ["London", "Paris"], True),
        ("40", "B", {"A": "30", "B": "40"}, True),  # choices as a dict
        ("40", "B", ["A. 30", "B. 40"], True),  # choices that carry their own labels
    ],
)
def test_is_correct_choices(answer, gold, choices, want):
    assert is_correct(answer, gold, choices) is want


@pytest.mark.parametrize(
    "gold, choices",
    [
        ("", None),
        ("   ", None),
        ("\\frac{", None),
        ("}{", None),
        ("???", None),
        ("E", ["1", "2"]),
    ],
)
def test_bad_gold_is_an_error(gold, choices):
    with pytest.raises(ValueError, match=re.escape(repr(gold))):
        validate_gold(gold, choices)
    with pytest.raises(ValueError):
        is_correct("21", gold, choices)
    with pytest.raises(ValueError):  # never a free reward
        srpo_reward(one("21"), gold, words, choices=choices)


@pytest.mark.parametrize(
    "gold, choices",
    [("21", None), (21, None), ("\\frac{1}{2}", None), ("B", None), ("B", CHOICES), ("Paris", ["London", "Paris"])],
)
def test_validate_gold_ok(gold, choices):
    validate_gold(gold, choices)  # does not raise
    assert is_correct(str(gold), gold, choices)  # and the gold, given as an answer, is judged right
    assert not is_correct("an unrelated answer", gold, choices)


def test_gold_is_parsed_once():
    is_correct("1", "\\frac{5}{11}")
    before = _parse_gold.cache_info()
    for _ in range(10):
        is_correct("1", "\\frac{5}{11}")
    after = _parse_gold.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 10


def test_is_correct_off_main_thread():
    # math-verify's signal-based timeout raises off the main thread unless disabled
    results, errors = [], []

    def work():
        try:
            results.append(is_correct("3/7", "\\frac{3}{7}"))  # this gold is not cached yet
            results.append(is_correct("\\frac{", "\\frac{3}{7}"))
            results.append(srpo_reward(two("0", "3/7"), "\\frac{3}{8}", words)["total"])
        except BaseException as e:  # noqa: BLE001 - surface anything to the main thread
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors and results == [True, False, pytest.approx(0.85)]  # wrong->wrong


# -----------------------------------------------------------------------------
# the length curve


@pytest.mark.parametrize(
    "L, n1, want",
    [
        (8, 4, 1.0),  # T_target = 2 n1
        (10, 4, E1),  # T_max = 2.5 n1
        (6, 4, E1),  # symmetric below T_target
        (12, 4, math.exp(-4)),
        (4, 4, math.exp(-4)),
        (9, 4, math.exp(-0.25)),
        (200, 100, 1.0),
        (10**9, 4, 0.0),  # far away underflows to 0, no overflow error
        (8, 0, 0.0),  # n1 = 0: no length reward
    ],
)
def test_f_len(L, n1, want):
    assert f_len(L, n1) == pytest.approx(want)


# -----------------------------------------------------------------------------
# srpo_reward, per variant

GOLD = "21"
RR, WR, WW, RW = two("21", "21"), two("5", "21"), two("5", "6"), two("21", "6")

PAPER = {
    "one-round correct": (one("21"), scores(1.0, 0.5, 0.5)),
    "one-round wrong": (one("5"), scores(0.5, 0.5)),
    "right->right": (RR, scores(1.6, 0.5, 0.5, 0.25, 0.25, 0.1)),
    "wrong->right": (WR, scores(1.35, 0.5, 0.0, 0.25, 0.5, 0.1)),
    "wrong->wrong": (WW, scores(0.85, 0.5, 0.0, 0.25, 0.0, 0.1)),
    "right->wrong": (RW, scores(1.1, 0.5, 0.5, 0.25, -0.25, 0.1)),
    "two-round, second round at T_max": (
        two("21", "21", "x y z w"),
        scores(1.5 + 0.1 * E1, 0.5, 0.5, 0.25, 0.25, 0.1 * E1),
    ),
    "two-round, unparseable answer": (two("\\frac{", "21"), scores(1.35, 0.5, 0.0, 0.25, 0.5, 0.1)),
    "malformed, correct answer": ("<think>r</think> <answer>21</answer> <answer>21</answer>", scores()),
    "malformed two-round (no reflection)": (
        "<think>a b c</think> <answer>21</answer> <think>y</think> <answer>21</answer>",
        scores(),
    ),
    "text outside": ("Sure. " + RR, scores()),
}

# The released reward ("code") judges answers its own way (rewards._released_correct): the SRPO prompt's \boxed{}
# answers are read, a bare <answer>21</answer> is not. Hand-computed with word counts: n1 = 3 + 1 = 4, so
# T_target = 8 and T_max = 10; L = 9 gives f_len = e^-1/4, L = 10 or 6 gives e^-1.
BX = "\\boxed{{{}}}".format
CRR, CWR, CWW, CRW = two(BX(21), BX(21)), two(BX(5), BX(21)), two(BX(5), BX(6)), two(BX(21), BX(6))
Q = math.exp(-0.25)

CODE = {
    # fewer than two think or answer blocks: every term 0 (the released length function crashed)
    "one-round correct (silent zero)": (one(BX(21)), scores()),
    "one-round wrong": (one(BX(5)), scores()),
    "one think": (f"<think>a b c</think> <answer>{BX(21)}</answer> <answer>{BX(21)}</answer>", scores()),
    "empty": ("", scores()),
    # correctness and effectiveness merged into one accuracy number (CODE_ACC)
    "right->right": (CRR, scores(1.35, 0.5, 0.75, length=0.1)),
    "wrong->right": (CWR, scores(1.6, 0.5, 1.0, length=0.1)),
    "wrong->wrong": (CWW, scores(0.6, 0.5, 0.0, length=0.1)),
    "right->wrong": (CRW, scores(0.85, 0.5, 0.25, length=0.1)),
    # the answer string with its tags goes to math-verify: a bare 21 touching the tags parses to nothing (wrong),
    # a spaced one parses; so bare right->right is wrong->wrong, and 5 -> " 21 " is wrong->right (L = 10)
    "bare answers are wrong": (RR, scores(0.6, 0.5, 0.0, length=0.1)),
    "spaced answer is read": (two("5", " 21 "), scores(1.5 + 0.1 * E1, 0.5, 1.0, length=0.1 * E1)),
    # format: text before the first <think> is allowed (L = 9), text after the last </answer> is not (L = 9)
    "prefix text": ("Sure. " + CWR, scores(1.5 + 0.1 * Q, 0.5, 1.0, length=0.1 * Q)),
    "suffix text": (CWR + " Done", scores(1.0 + 0.1 * Q, 0.0, 1.0, length=0.1 * Q)),
    # format: blocks holding only whitespace are non-empty for the released regex; n1 = 0 + 1, so T_target = 2,
    # T_max = 2.5 and L = 7 gives f_len = e^-100
    "blank blocks": (
        f"<think> </think> <answer>{BX(21)}</answer> <reflection> </reflection> <think>y</think> "
        f"<answer>{BX(21)}</answer>",
        scores(1.25 + 0.1 * math.exp(-100), 0.5, 0.75, length=0.1 * math.exp(-100)),
    ),
    # >= 2 think and answer blocks but not well-formed: no format, accuracy and length still computed (L = 6)
    "no reflection": (
        f"<think>a b c</think> <answer>{BX(5)}</answer> <think>y</think> <answer>{BX(21)}</answer>",
        scores(1.0 + 0.1 * E1, 0.0, 1.0, length=0.1 * E1),
    ),
    # A1 = the first answer block, A2 = the last one (L = 7)
    "three answers": (
        f"<think>a b c</think> <answer>{BX(21)}</answer> <think>y</think> <answer>{BX(5)}</answer> "
        f"<answer>{BX(21)}</answer>",
        scores(0.75 + 0.1 * Q, 0.0, 0.75, length=0.1 * Q),
    ),
}

GRPO = {
    "one-round correct": (one("21"), scores(1.5, 0.5, 1.0)),
    "one-round wrong": (one("5"), scores(0.5, 0.5)),
    "two-round right->right": (RR, scores()),  # only a well-formed one-round response is on-format
    "two-round wrong->right": (WR, scores()),
    "malformed": ("<think>r</think> 21", scores()),
}

# Table 3's "GRPO + two-step thinking": the two-round format and the FINAL answer, nothing about the reflection
TWO_STEP = {
    "right->right": (RR, scores(1.5, 0.5, 1.0)),
    "wrong->right": (WR, scores(1.5, 0.5, 1.0)),  # paid as right->right: no I_eff
    "right->wrong": (RW, scores(0.5, 0.5)),  # the first answer does not count
    "wrong->wrong": (WW, scores(0.5, 0.5)),
    "one-round correct": (one("21"), scores()),  # only a well-formed two-round response is on-format
    "malformed": ("<think>r</think> 21", scores()),
}
VARIANTS = (("paper", PAPER), ("code", CODE), ("grpo", GRPO), ("two_step", TWO_STEP))


@pytest.mark.parametrize(
    "variant, response, want",
    [(v, r, w) for v, table in VARIANTS for r, w in table.values()],
    ids=[f"{v}: {k}" for v, table in VARIANTS for k in table],
)
def test_srpo_reward(variant, response, want):
    assert_scores(srpo_reward(response, GOLD, count_tokens=words, variant=variant), want)


def test_paper_is_default_and_alpha_scales_length():
    assert_scores(srpo_reward(RR, GOLD, words), PAPER["right->right"][1])
    assert srpo_reward(RR, GOLD, words, alpha=0.5)["length"] == pytest.approx(0.5)


def test_length_zero_when_n1_is_zero():
    assert srpo_reward(RR, GOLD, count_tokens=lambda s: 0)["length"] == 0.0


def test_choices_passed_through():
    assert srpo_reward(two("A", "40"), "B", words, choices=CHOICES)["effectiveness"] == 0.5


@pytest.mark.parametrize(
    "kwargs, key", [(dict(use_effectiveness=False), "effectiveness"), (dict(use_length=False), "length")]
)
@pytest.mark.parametrize("response", [RR, WR, WW, RW])
def test_ablations_zero_their_term(kwargs, key, response):
    full = srpo_reward(response, GOLD, words)
    ablated = srpo_reward(response, GOLD, words, **kwargs)
    assert ablated[key] == 0.0
    assert_scores(ablated, {**full, key: 0.0, "total": full["total"] - full[key]})


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(variant="nope"),
        dict(variant="code", use_length=False),
        dict(variant="grpo", use_effectiveness=False),
        dict(variant="two_step", use_length=False),
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        srpo_reward(RR, GOLD, words, **kwargs)


# -----------------------------------------------------------------------------
# robustness: nothing a model can produce makes the reward raise, and parsing is fast

BIG = 100_000
NASTY = {
    **MALFORMED,
    "huge think": one("21", r1="x " * (BIG // 2)),
    "huge answer": two("21" * (BIG // 2), "21"),
    "huge plain text": "a" * BIG,
    "many unclosed thinks": "<think>" * (BIG // 7),
    "many unclosed answers": "<think>r</think> " + "<answer>" * (BIG // 8),
    "many closes": "</answer>" * (BIG // 9),
    "alternating blocks": "<think>r</think><answer>1</answer>" * (BIG // 34),
    "deep nesting": "<think>" * 6700 + "r" + "</think>" * 6700,
    "half tags": "<think" * (BIG // 6) + "<answer>",
    "unicode": "<think>数学 ∫ 🚀</think> <answer>二十一</answer>",
    "latex garbage answer": one("\\frac{\\sqrt{}{}}^^_\\left("),
    "answer inside think, two rounds": "<think>r <answer>21</answer></think><answer>21</answer>" * 2,
    "nul bytes": "<think>\x00</think><answer>\x00</answer>",
}


@pytest.mark.parametrize("variant", ["paper", "code", "grpo"])
@pytest.mark.parametrize("text", NASTY.values(), ids=NASTY.keys())
def test_never_raises(text, variant):
    got = srpo_reward(text, GOLD, words, variant=variant)
    assert tuple(got) == KEYS and all(math.isfinite(v) for v in got.values())
    assert got["total"] == pytest.approx(sum(v for k, v in got.items() if k != "total"))


@pytest.mark.parametrize(
    "name",
    [
        "huge think",
        "huge plain text",
        "many unclosed thinks",
        "many unclosed answers",
        "many closes",
        "alternating blocks",
        "deep nesting",
        "half tags",
    ],
)
def test_parse_is_fast(name):
    text = NASTY[name]
    assert len(text) >= 0.9 * BIG
    best = min(_timed(parse_response, text) for _ in range(3))
    assert best < 0.05, f"{name}: {best * 1000:.1f} ms"


def test_reward_on_huge_response_is_fast():
    for text in (NASTY["huge answer"], NASTY["many unclosed thinks"], two("1" * BIG, "2")):
        for variant in ("paper", "code", "grpo"):
            assert _timed(srpo_reward, text, GOLD, words, variant=variant) < 0.5


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>a</think> <answer>21</answer>", (1, 1, 1)),
        ("<think>a</think> <answer>20</answer>", (1, 0, 0)),
        (
            "<think>a</think> <answer>20</answer> <reflection>r</reflection> <think>b</think> <answer>21</answer>",
            (2, 0, 1),
        ),
        (
            "<think>a</think> <answer>21</answer> <reflection>r</reflection> <think>b</think> <answer>20</answer>",
            (2, 1, 0),
        ),
        ("<answer>21</answer>", (0, 0, 0)),
    ],
)
def test_outcome(response, expected):
    from nanosrpo.rewards import outcome

    o = outcome(response, "21")
    assert (o["rounds"], o["first_correct"], o["final_correct"]) == expected


# -----------------------------------------------------------------------------
# the released reward's quirks ("code" variant), each against a hand-computed total


@pytest.mark.parametrize(
    "response, gold, want",
    [
        # accuracy 0, then the letter fallback on the last answer block: the gold letter in it, no other of a-d in it.
        # Bare letters parse to nothing, so even right->right pays the fallback's 1.0 (more than a judged 0.75)
        (two("A", "B"), "B", scores(1.6, 0.5, 1.0, length=0.1)),
        (two("B", "B"), "B", scores(1.6, 0.5, 1.0, length=0.1)),
        (two("A", "(b)"), "B", scores(1.6, 0.5, 1.0, length=0.1)),
        # "answer" has an "a": the fallback fails on a right answer (L = 9)
        (two("A", "Answer: B"), "B", scores(0.5 + 0.1 * Q, 0.5, 0.0, length=0.1 * Q)),
        (two("A", "C"), "B", scores(0.6, 0.5, 0.0, length=0.1)),  # the wrong letter
        # a letter outside a-d has no fallback
        (two("A", "E"), "E", scores(0.6, 0.5, 0.0, length=0.1)),
        # the fallback runs only when the accuracy is 0: right->wrong keeps its 0.25 although the last block says "B"
        (two(BX("B"), "B"), "B", scores(0.85, 0.5, 0.25, length=0.1)),
        # a gold that parses to nothing ("$$", "$ $") pays accuracy 1.0 whatever the answers
        (CWW, "", scores(1.6, 0.5, 1.0, length=0.1)),
        (two("x", "y"), " ", scores(1.6, 0.5, 1.0, length=0.1)),
    ],
)
def test_code_reward_quirks(response, gold, want):
    assert_scores(srpo_reward(response, gold, words, variant="code"), want)


def test_code_reward_ignores_choices():
    # the released function saw only the label: "40" is not "B" there (and "\boxed{40}" has the b and d of "boxed")
    assert_scores(
        srpo_reward(two(BX("A"), BX("40")), "B", words, variant="code", choices=CHOICES),
        scores(0.6, 0.5, 0.0, length=0.1),
    )
    assert srpo_reward(two(BX("A"), BX("40")), "B", words, choices=CHOICES)["effectiveness"] == 0.5  # paper: right


def test_code_length_counts_the_stripped_response():
    # counting space-separated pieces, padding would add pieces: 3 + 3 more would give L = 14, f_len = e^-9
    pieces = lambda s: len(s.split(" "))  # noqa: E731
    assert_scores(srpo_reward("   " + CRR + "   ", GOLD, pieces, variant="code"), scores(1.35, 0.5, 0.75, length=0.1))


@pytest.mark.parametrize("response", [CRR, "Sure. " + CRR, CRR.replace("a b c", " ")])
def test_code_format_is_more_lenient_than_the_paper(response):
    # the same response the paper calls malformed (text before, a blank block) is well formed for the released regex
    assert srpo_reward(response, GOLD, words, variant="code")["format"] == 0.5
    assert (srpo_reward(response, GOLD, words)["format"] == 0.5) is (response == CRR)
