"""
SRPO rewards: parse a (reflection-aware) response, check answers, score it.

A two-round SRPO response looks like

    <think>R1</think> <answer>A1</answer> <reflection>F</reflection> <think>R2</think> <answer>A2</answer>

and a one-round response is just `<think>R1</think> <answer>A1</answer>`. The reward (paper Eqs. 4-8) is

    total = format + accuracy + I_ref + I_eff + alpha * f_len

Three variants are implemented side by side so they can be compared in ablations:
  "paper" - the equations as written in the paper (the default),
  "code"  - what the released OpenRLHF reward function actually computed,
  "grpo"  - the plain one-round GRPO baseline (format + accuracy).

Pure Python on purpose: it runs in reward workers and in tests, with no torch.
"""

import math
import re
import threading
from functools import lru_cache
from typing import NamedTuple

from math_verify import parse, verify
from math_verify.errors import TimeoutException  # a BaseException, not an Exception

# -----------------------------------------------------------------------------
# parsing the response structure

# One flat alternation, scanned with finditer, then a small state machine. No nested
# quantifiers and no `.*?` between tags, so the scan is linear even on 100k chars of
# unclosed tags (a `<think>(.*?)</think>` findall is quadratic on such input).
_TAG = re.compile(r"<(/?)(think|answer|reflection)>")
_ONE_ROUND = ("think", "answer")
_TWO_ROUND = ("think", "answer", "reflection", "think", "answer")


class Parsed(NamedTuple):
    rounds: int  # 1 or 2 for a well-formed response, 0 for malformed
    think1: str | None = None  # block contents, stripped; None when missing
    answer1: str | None = None
    reflection: str | None = None
    think2: str | None = None
    answer2: str | None = None


MALFORMED = Parsed(0)


def parse_response(text: str) -> Parsed:
    """Split a response into its blocks; rounds=0 (all None) unless it is exactly well-formed."""
    if not isinstance(text, str):
        return MALFORMED
    names, contents = [], []
    pos, open_tag = 0, None  # pos: end of the last closed block; open_tag: match of an open block
    for m in _TAG.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if open_tag is None:
            # outside any block: only whitespace may precede, and only an opening tag is allowed
            if closing or text[pos:m.start()].strip():
                return MALFORMED
            open_tag = m
        else:
            # inside a block: the next tag must close it (anything else is nesting)
            if not closing or name != open_tag.group(2):
                return MALFORMED
            content = text[open_tag.end():m.start()].strip()
            if not content:
                return MALFORMED
            names.append(name)
            contents.append(content)
            pos, open_tag = m.end(), None
    if open_tag is not None or text[pos:].strip():
        return MALFORMED  # unclosed block, or trailing text
    if tuple(names) == _ONE_ROUND:
        return Parsed(1, *contents)
    if tuple(names) == _TWO_ROUND:
        return Parsed(2, *contents)
    return MALFORMED


def lenient_blocks(text: str, name: str) -> list[str]:
    """All `<name>...</name>` contents, matched like re.findall(r"<name>(.*?)</name>", re.S)
    (what the released code did), but in linear time: an open tag runs to the next close
    of the same name, and any other tag in between is just content."""
    blocks, start = [], None
    for m in _TAG.finditer(text):
        if m.group(2) != name:
            continue
        if start is None and not m.group(1):
            start = m.end()
        elif start is not None and m.group(1):
            blocks.append(text[start:m.start()])
            start = None
    return blocks


# -----------------------------------------------------------------------------
# answer checking

# Real answers are short. Anything longer is degenerate or a hedge, and math-verify on
# it can take seconds (it times out after 5 s on the main thread, never off it), so we
# call such an answer wrong without parsing it.
MAX_ANSWER_CHARS = 1000

# A multiple-choice letter: "(B)" or "B" followed by end, ".", ":" or ")" ("B: 40", "B.").
# "B or C" deliberately does not match: a hedge is not a letter.
_LETTER = re.compile(r"\(([A-Za-z])\)|([A-Za-z])(?:[.:)]|$)")
_GOLD_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:)]?")  # a gold must be *only* the letter
_MATHY = re.compile(r"[\d\\^_=+\-*/]")


def _timeout() -> int | None:
    # math-verify's timeouts use signal.alarm, which only works on the main thread and
    # raises ValueError elsewhere; off the main thread we run without one (answers are
    # length-capped above, so the parse stays cheap).
    return 5 if threading.current_thread() is threading.main_thread() else None


def _strip_wrappers(s: str) -> str:
    """Peel `$...$`, `\\boxed{...}`, `\\text{...}` and `**...**` wrappers off a short answer."""
    s = s.strip()
    for _ in range(4):  # a few layers at most, e.g. $\boxed{B}$
        for head, tail in (("$", "$"), ("\\boxed{", "}"), ("\\text{", "}"), ("**", "**")):
            if len(s) > len(head) + len(tail) - 1 and s.startswith(head) and s.endswith(tail):
                s = s[len(head):-len(tail)].strip()
                break
        else:
            break
    return s


def _letter_of(s: str) -> str | None:
    """The choice letter named by an (unwrapped) answer, uppercased, or None."""
    m = _LETTER.match(s)
    return (m.group(1) or m.group(2)).upper() if m else None


def _norm_text(s: str) -> str:
    """Loose string form for comparing an answer with a choice's text."""
    return " ".join(_strip_wrappers(s).casefold().split()).rstrip(".")


def _parse_math(s: str, no_fallback: bool = False) -> list:
    """math-verify parse; bare LaTeX is wrapped in $...$ first (bare `10^{-3}` parses as 10)."""
    has_delims = "$" in s or "\\boxed" in s or "\\(" in s or "\\[" in s
    kw = {"parsing_timeout": _timeout()}
    if no_fallback:
        kw["fallback_mode"] = "no_fallback"  # gold: a raw-string fallback is not a parse
    try:
        out = parse(s if has_delims else f"${s}$", **kw)
        return out or (parse(s, **kw) if not has_delims else [])
    except (Exception, TimeoutException):
        return []


class _Gold(NamedTuple):
    letter: str | None  # the correct choice letter, if this is a multiple-choice item
    text: str | None  # the correct choice's text (normalized), if choices were given
    math: list | None  # math-verify parse of the gold value, if it has one


def _choices_key(choices) -> tuple | None:
    """Hashable (letter, text) pairs from a list (lettered A, B, ...) or a {letter: text} dict."""
    if choices is None:
        return None
    items = choices.items() if hasattr(choices, "items") else zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", choices)
    out = []
    for letter, text in items:
        letter, text = str(letter).strip().upper(), str(text)
        # drop the choice's own label if the data includes it: "B. 40" -> "40"
        text = re.sub(r"^\s*\(?" + re.escape(letter) + r"\)?[.:)]\s*", "", text)
        out.append((letter, text))
    return tuple(out)


@lru_cache(maxsize=65536)
def _parse_gold(gold: str, choices: tuple | None) -> _Gold:
    """Parse a gold answer once; every rollout of the same prompt reuses the result."""
    m = _GOLD_LETTER.fullmatch(_strip_wrappers(gold))
    # without choices only an uppercase letter is a choice letter: a lone "x" or "e" is math
    if m and (choices is not None or m.group(1).isupper()):
        letter = m.group(1).upper()
        if choices is None:
            return _Gold(letter, None, None)
        texts = dict(choices)
        if letter not in texts:
            raise ValueError(f"gold answer {gold!r} is not one of the choices {[c for c, _ in choices]}")
        text = texts[letter]
        # only math-like choice texts compare by value: "Paris" would parse as P*a*r*i*s
        math_ = _parse_math(text, no_fallback=True) if _MATHY.search(text) else []
        return _Gold(letter, _norm_text(text), math_ or None)
    math_ = _parse_math(gold, no_fallback=True) if len(gold) <= MAX_ANSWER_CHARS else []
    if choices is not None:  # gold given as a choice's text: remember its letter too
        for c, text in choices:
            if _norm_text(text) == _norm_text(gold):
                return _Gold(c, _norm_text(gold), math_ if math_ and _MATHY.search(gold) else None)
    if not math_:
        raise ValueError(f"cannot parse gold answer {gold!r}")
    return _Gold(None, None, math_)


def validate_gold(gold, choices=None) -> None:
    """Raise ValueError naming the gold if it cannot be parsed. Call once per record at load time."""
    _parse_gold(str(gold), _choices_key(choices))


def is_correct(answer_text: str | None, gold, choices=None) -> bool:
    """Does the model's answer match the gold? Raises ValueError only for a bad *gold*;
    a model answer that cannot be parsed is simply wrong."""
    g = _parse_gold(str(gold), _choices_key(choices))
    if not isinstance(answer_text, str) or len(answer_text) > MAX_ANSWER_CHARS:
        return False
    s = _strip_wrappers(answer_text)
    if not s:
        return False
    if g.letter is not None:
        letter = _letter_of(s)
        if letter is not None:  # compare letters as letters, never as substrings
            return letter == g.letter
    if g.text is not None and _norm_text(s) == g.text:
        return True
    if g.math is None:
        return False
    pred = _parse_math(answer_text)
    if not pred:
        return False
    try:
        return bool(verify(g.math, pred, timeout_seconds=_timeout()))
    except (Exception, TimeoutException):
        return False


# -----------------------------------------------------------------------------
# the reward

KEYS = ("total", "format", "accuracy", "reflection", "effectiveness", "length")

# The paper's weights (Eqs. 4-8): a well-formed response earns R_FORMAT, a right first answer R_ACCURACY, and a
# well-formed reflection I_REF; the plain GRPO baseline pays R_ACCURACY_GRPO for its one answer.
R_FORMAT = 0.5
R_ACCURACY = 0.5
I_REF = 0.25
R_ACCURACY_GRPO = 1.0
# I_eff (paper): reward fixing a wrong answer most, penalize breaking a right one.
I_EFF = {(True, True): 0.25, (False, True): 0.5, (False, False): 0.0, (True, False): -0.25}
# released code: correctness and effectiveness merged into one "accuracy" number.
# Note the ranking flips vs. the paper: wrong->right (1.0) beats right->right (0.75).
CODE_ACC = {(True, True): 0.75, (False, True): 1.0, (False, False): 0.0, (True, False): 0.25}
# The largest "accuracy" term of each variant: the accuracy filter compares accuracy / ACCURACY_MAX with its bounds.
ACCURACY_MAX = {"paper": R_ACCURACY, "code": max(CODE_ACC.values()), "grpo": R_ACCURACY_GRPO}


def count_words(s: str) -> int:
    """Whitespace word count. Training should pass the policy tokenizer's length instead."""
    return len(s.split())


def f_len(L: float, n1: float) -> float:
    """Length reward: 1 at T_target = 2*n1, e^-1 at T_max = 2.5*n1, symmetric around T_target.
    n1 is the first round's length, so the reflection + second round should be about as long
    as the first round again: enough to actually rethink, not a runaway."""
    if n1 <= 0:
        return 0.0
    T_target, T_max = 2.0 * n1, 2.5 * n1
    return math.exp(-((abs(L - T_target) / (T_max - T_target)) ** 2))


def _length(response: str, think1: str, answer1: str, count_tokens) -> float:
    n1 = count_tokens(think1.strip()) + count_tokens(answer1.strip())
    return f_len(count_tokens(response.strip()), n1)


def _scores(fmt=0.0, acc=0.0, ref=0.0, eff=0.0, length=0.0) -> dict[str, float]:
    parts = [float(fmt), float(acc), float(ref), float(eff), float(length)]
    return dict(zip(KEYS, [sum(parts)] + parts))


def srpo_reward(response: str, answer, count_tokens=count_words, variant: str = "paper",
                alpha: float = 0.1, choices=None, use_effectiveness: bool = True,
                use_length: bool = True) -> dict[str, float]:
    """Score one rollout against the gold `answer`. Returns the KEYS, total = sum of the rest."""
    if variant not in ("paper", "code", "grpo"):
        raise ValueError(f"unknown reward variant {variant!r}")
    if variant != "paper" and not (use_effectiveness and use_length):
        # the Table 4 ablations are defined on the paper's reward; silently ignoring them is worse
        raise ValueError("use_effectiveness/use_length ablations apply only to variant='paper'")
    if not isinstance(response, str):
        return _scores()
    if variant == "code":
        return _code_reward(response, answer, count_tokens, alpha, choices)

    p = parse_response(response)
    if variant == "grpo":  # one round only; a two-round response is off-format for GRPO
        if p.rounds != 1:
            return _scores()
        return _scores(R_FORMAT, R_ACCURACY_GRPO * is_correct(p.answer1, answer, choices))

    # paper, Eqs. 4-8
    if p.rounds == 0:
        return _scores()
    c1 = is_correct(p.answer1, answer, choices)
    if p.rounds == 1:
        return _scores(R_FORMAT, R_ACCURACY * c1)
    c2 = is_correct(p.answer2, answer, choices)
    eff = I_EFF[(c1, c2)] if use_effectiveness else 0.0
    length = alpha * _length(response, p.think1, p.answer1, count_tokens) if use_length else 0.0
    return _scores(R_FORMAT, R_ACCURACY * c1, I_REF, eff, length)


def _code_reward(response, answer, count_tokens, alpha, choices) -> dict[str, float]:
    """The released OpenRLHF reward, kept for ablations. Differences from the paper:
    - a one-round response (fewer than two think/answer blocks) silently scores 0,
    - correctness and effectiveness are merged into `accuracy` (CODE_ACC), no I_ref,
    - text before the first <think> does not break the format.
    Judgement call: a response with >=2 think and >=2 answer blocks that is not a
    well-formed two-round response still gets accuracy and length (format 0), because the
    released code computed those from regex matches regardless of the overall shape."""
    thinks, answers = lenient_blocks(response, "think"), lenient_blocks(response, "answer")
    if len(thinks) < 2 or len(answers) < 2:
        return _scores()
    start = response.find("<think>")
    fmt = R_FORMAT if parse_response(response[start:]).rounds == 2 else 0.0
    c1 = is_correct(answers[0].strip(), answer, choices)
    c2 = is_correct(answers[-1].strip(), answer, choices)
    length = alpha * _length(response, thinks[0], answers[0], count_tokens)
    return _scores(fmt, CODE_ACC[(c1, c2)], 0.0, 0.0, length)


def outcome(response: str, answer, choices=None) -> dict[str, float]:
    """What happened in one rollout, for metrics (not the reward): rounds (0 malformed, 1, 2), first- and
    final-answer correctness. The final answer is A2 of a two-round response and A1 of a one-round one."""
    p = parse_response(response)
    first = p.rounds > 0 and is_correct(p.answer1, answer, choices)
    final = first if p.rounds == 1 else p.rounds == 2 and is_correct(p.answer2, answer, choices)
    return {"rounds": float(p.rounds), "first_correct": float(first), "final_correct": float(final)}
