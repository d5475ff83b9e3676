"""
SRPO rewards: parse a (reflection-aware) response, check answers, score it.

A two-round SRPO response looks like

    <think>R1</think> <answer>A1</answer> <reflection>F</reflection> <think>R2</think> <answer>A2</answer>

and a one-round response is just `<think>R1</think> <answer>A1</answer>`. The reward (paper Eqs. 4-8) is

    total = format + accuracy + I_ref + I_eff + alpha * f_len

Four variants are implemented side by side so they can be compared in ablations:
  "paper" - the equations as written in the paper (the default),
  "code"  - what the released OpenRLHF reward function actually computed,
  "grpo"  - the plain one-round GRPO baseline (format + accuracy),
  "two_step" - the paper's "GRPO + two-step thinking" baseline (Table 3): the two-round format and the final
            answer's accuracy only (no I_ref, no I_eff, no f_len).

Pure Python on purpose: it runs in reward workers and in tests, with no torch.
"""

import math
import re
import threading
from functools import lru_cache
from typing import NamedTuple

from math_verify import ExprExtractionConfig, LatexExtractionConfig, StringExtractionConfig, parse, verify
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


def parse_response(text: str, released: bool = False) -> Parsed:
    """Split a response into its blocks; rounds=0 (all None) unless it is exactly well-formed.
    released=True reads the format as the released code's regex did (the "code" variant): any text may come before
    the first tag, and a block holding only whitespace is not empty (its `(.+?)` matches a space)."""
    if not isinstance(text, str):
        return MALFORMED
    names, contents = [], []
    pos, open_tag = 0, None  # pos: end of the last closed block; open_tag: match of an open block
    for m in _TAG.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if open_tag is None:
            # outside any block: only whitespace may precede, and only an opening tag is allowed
            if closing or (text[pos : m.start()].strip() and not (released and pos == 0)):
                return MALFORMED
            open_tag = m
        else:
            # inside a block: the next tag must close it (anything else is nesting)
            if not closing or name != open_tag.group(2):
                return MALFORMED
            content = text[open_tag.end() : m.start()]
            if not (content if released else content.strip()):
                return MALFORMED
            names.append(name)
            contents.append(content.strip())
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
            blocks.append(text[start : m.start()])
            start = None
    return blocks


# -----------------------------------------------------------------------------
# answer extraction: the one path the reward and evaluation share

# Real answers are short. Anything longer is degenerate or a hedge, and math-verify on
# it can take seconds (it times out after 5 s on the main thread, never off it), so we
# call such an answer wrong without parsing it.
MAX_ANSWER_CHARS = 1000

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Wrappers peeled off a whole answer, outermost first: "$\boxed{B}$", "**B**", "\text{B}".
_WRAPPERS = (
    ("$$", "$$"),
    ("$", "$"),
    ("\\(", "\\)"),
    ("\\[", "\\]"),
    ("**", "**"),
    ("\\boxed{", "}"),
    ("\\fbox{", "}"),
    ("\\text{", "}"),
    ("\\textbf{", "}"),
    ("\\mathrm{", "}"),
    ("\\mathbf{", "}"),
)


def _matching_braces(text: str) -> dict[int, int]:
    """{index of a '{': index of its '}'} for text's balanced braces, in one pass (linear on any input)."""
    stack, pairs = [], {}
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            pairs[stack.pop()] = i
    return pairs


def last_boxed(text: str) -> str | None:
    """The contents of the last closed \\boxed{...} (or \\fbox{...}) in text, nested braces balanced; else None."""
    opens = [m.end() - 1 for m in _BOXED.finditer(text)]
    pairs = _matching_braces(text) if opens else {}
    for i in reversed(opens):
        if i in pairs:
            return text[i + 1 : pairs[i]].strip()
    return None


def _peel(s: str) -> str | None:
    """s without one wrapper that spans all of it ("$a$ and $b$" is not one), or None."""
    for head, tail in _WRAPPERS:
        if len(s) < len(head) + len(tail) or not (s.startswith(head) and s.endswith(tail)):
            continue
        inner = s[len(head) : len(s) - len(tail)]
        whole = (
            _matching_braces(s).get(len(head) - 1) == len(s) - 1
            if tail == "}"
            else head not in inner and tail not in inner
        )
        if whole:
            return inner.strip()
    return None


def extract_answer(block: str) -> str:
    """An answer block's answer: the last \\boxed{} in it, else the block, peeled of whole-answer wrappers
    ($...$, \\(...\\), **...**, \\text{...}; up to 8 layers, each peel is a scan). "" when there is none.
    Extracting an extracted answer again changes nothing."""
    s = block.strip()
    boxed = last_boxed(s)
    s = boxed if boxed is not None else s
    for _ in range(8):
        inner = _peel(s)
        if inner is None:
            break
        s = inner
    return s


# The sentence around an answer, read as plain text: "\text{cm}" -> "cm", "30^\circ" -> "30°", "\$3" -> "$3",
# no "$" delimiters, no markdown bold.
_PLAIN = (
    (re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ\b|\\degree\b"), "°"),
    (re.compile(r"(?<!\\)\$|\*\*"), ""),
    (re.compile(r"\\([$%])"), r"\1"),
    (re.compile(r"\\[,;:! ]|~"), " "),
)
# A lead-in naming the answer: "Answer:", "The correct option is", "So the final answer is".
_LEAD_IN = re.compile(
    r"^(?:(?:so|thus|therefore|hence)\b,?\s*)?(?:the\s+)?(?:final\s+|correct\s+|right\s+)?"
    r"(?:answer|option|choice)\b\s*(?:is\b)?\s*[:=]?\s*",
    re.I,
)


def _plain(s: str) -> str:
    for pattern, repl in _PLAIN:
        s = pattern.sub(repl, s)
    return " ".join(s.split())


def _core(s: str) -> str:
    """The plain answer without its lead-in and final full stop: "Answer: **12 cm**." -> "12 cm"."""
    s = _LEAD_IN.sub("", _plain(s), count=1).strip()
    return s[:-1].rstrip() if s.endswith(".") else s


def _norm_text(s: str) -> str:
    """Loose string form for comparing an answer with a choice's text."""
    return " ".join(_core(extract_answer(s)).casefold().split())


# A number with an optional unit, after an optional lead-in without digits, LaTeX or a negation: "12 cm", "45°",
# "$3.50", "3,000", "x = 21", "The perimeter is 12 cm". A letter glued to the number must be a unit ("5cm", not "5x").
_UNITS = r"(?:mm|cm|km|m|kg|g|mg|ms|s|min|h|ml|mL|L|in|ft|yd|mi|lb|oz|deg|px)"
_SQUARED = r"(?:\^\{?[23]\}?|[²³])?"
_NUMBER_ANSWER = re.compile(
    r"(?:(?![^\d]*\b(?:not|less|more|greater|fewer|than|least|most)\b)"  # no "not 12", "at most 12"
    r"[^\d\\^_{}]*?[\s=:≈])?\s*"  # the lead-in: "The perimeter is", "x ="
    r"(?P<sign>[-−]?)\s*(?:\$|£|€)?\s*"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*(?:°[CF]?|%)|" + _UNITS + _SQUARED + r"(?![A-Za-z])|\s+[A-Za-z][A-Za-z./ ]*" + _SQUARED + ")?"
)


def _number_text(core: str) -> str | None:
    """The number a short numeric answer states ("12 cm" -> "12", "-3,000" -> "-3000"), or None."""
    m = _NUMBER_ANSWER.fullmatch(core)
    return ("-" if m.group("sign") else "") + m.group("num").replace(",", "") if m else None


AMBIGUOUS = "?"  # an answer naming several choice letters or options: a hedge, wrong whatever the gold
# A choice letter named by a whole answer: "B", "(B)", "B.", "B: 40", "(b) 40".
_LETTER = re.compile(r"\(([A-Za-z])\)|([A-Za-z])(?:[.:)]|$)")
# ... or inside a sentence (capital letters only: "a" and "I" are words): "(B)", "option B", "the choice is B",
# "Answer: B", "the answer is B.", "... is B".
_LETTER_IN_SENTENCE = re.compile(
    r"\(([A-Z])\)"
    r"|\b(?i:option|choice)\s*\(?([A-Za-z])\)?(?!\w)"
    r"|\b(?i:option|choice)\s+is\s*:?\s*\(?([A-Z])\)?(?!\w)"
    r"|\b(?i:answer)\s*(?:is\b)?\s*[:=]?\s*\(?([A-Z])\)?(?=\s*[.,;:!)]|\s*$)"
    r"|\b(?:is|be)\s+\(?([A-Z])\)?(?=\s*[.!]?\s*$)"
)
_HEDGE = re.compile(r"(?<![\w\\])\(?[A-Z]\)?\s*(?:,|/|\bor\b|\band\b)\s*\(?[A-Z]\)?(?!\w)")  # "B or C", "A, B"
_PROSE = re.compile(r"[\\^_{}=]")  # an answer with LaTeX or an equation in it is not prose


def _named_letter(s: str) -> str | None:
    """The choice letter an extracted answer names, uppercased; AMBIGUOUS for a hedge; None for none."""
    plain = _plain(s)
    letters = {x.upper() for m in _LETTER_IN_SENTENCE.finditer(plain) for x in m.groups() if x}
    m = _LETTER.match(_core(s))
    if m:
        letters.add((m.group(1) or m.group(2)).upper())
    if len(letters) > 1 or (letters and _HEDGE.search(plain)):
        return AMBIGUOUS
    return letters.pop() if letters else None


def named_letter(s: str) -> str | None:
    """The one choice letter an extracted answer names ("B", "(B) 40", "The answer is B."), or None (none, or a
    hedge naming several). Evaluation uses it to read a sentence as its letter, as the reward does."""
    letter = _named_letter(s)
    return None if letter == AMBIGUOUS else letter


def _named_option(s: str, options: tuple) -> str | None:
    """The letter of the option whose text an extracted answer gives ("isosceles", "The triangle is isosceles."),
    AMBIGUOUS when a sentence names several, None for none. options: ((letter, normalized text), ...)."""
    n = _norm_text(s)
    exact = [c for c, text in options if n and text == n]
    if exact or _PROSE.search(s):
        return exact[0] if exact else None
    # inside a prose sentence, as whole words; one-character texts ("a") only if they are digits
    named = [
        (c, t)
        for c, t in options
        if t and (len(t) > 1 or t.isdigit()) and re.search(r"(?<![\w.\-−])" + re.escape(t) + r"(?!\w|\.\d)", n)
    ]
    named = {c for c, t in named if not any(t != u and t in u for _, u in named)}  # "isosceles right" over "right"
    return named.pop() if len(named) == 1 else AMBIGUOUS if named else None


_GOLD_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:)]?")  # a gold must be *only* the letter
_MATHY = re.compile(r"[\d\\^_=+\-*/]")


def _timeout() -> int | None:
    # math-verify's timeouts use signal.alarm, which only works on the main thread and
    # raises ValueError elsewhere; off the main thread we run without one (answers are
    # length-capped above, so the parse stays cheap).
    return 5 if threading.current_thread() is threading.main_thread() else None


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


def _parse_value(s: str, no_fallback: bool = False) -> list:
    """math-verify parse of an answer's value: the number of a number with a unit, else the expression."""
    return _parse_math(_number_text(_core(s)) or s, no_fallback)


class _Gold(NamedTuple):
    letter: str | None  # the correct choice letter, if this is a multiple-choice item
    options: tuple | None  # ((letter, normalized text), ...) of the choices, if choices were given
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
    options = tuple((c, _norm_text(text)) for c, text in choices) if choices is not None else None
    m = _GOLD_LETTER.fullmatch(extract_answer(gold))
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
        math_ = _parse_value(text, no_fallback=True) if _MATHY.search(text) else []
        return _Gold(letter, options, math_ or None)
    math_ = _parse_value(gold, no_fallback=True) if len(gold) <= MAX_ANSWER_CHARS else []
    if choices is not None:  # gold given as a choice's text: remember its letter too
        for c, text in options:
            if text == _norm_text(gold):
                return _Gold(c, options, math_ if math_ and _MATHY.search(gold) else None)
    if not math_:
        raise ValueError(f"cannot parse gold answer {gold!r}")
    return _Gold(None, options, math_)


def validate_gold(gold, choices=None) -> None:
    """Raise ValueError naming the gold if it cannot be parsed. Call once per record at load time."""
    _parse_gold(str(gold), _choices_key(choices))


def is_correct(answer_text: str | None, gold, choices=None) -> bool:
    """Does the model's answer (an answer block, or an answer extract_answer took from one) match the gold?
    A choice letter, however the answer names it, is compared as a letter, never as a substring; else an option's
    text names its letter; else the value (a number with a unit by its number, LaTeX by math-verify). Raises
    ValueError only for a bad *gold*; a model answer that cannot be parsed is simply wrong."""
    g = _parse_gold(str(gold), _choices_key(choices))
    if not isinstance(answer_text, str):
        return False
    s = extract_answer(answer_text)
    if not s or len(s) > MAX_ANSWER_CHARS:
        return False
    if g.letter is not None:
        named = _named_letter(s)
        if named is None and g.options is not None:
            named = _named_option(s, g.options)
        if named is not None:
            return named == g.letter
    if g.math is None:
        return False
    number = _number_text(_core(s))
    for candidate in [number] if number else dict.fromkeys([s, _core(s)]):  # "$x$ in a sentence", then bare LaTeX
        pred = _parse_math(candidate)
        try:
            if pred and verify(g.math, pred, timeout_seconds=_timeout()):
                return True
        except (Exception, TimeoutException):
            pass
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
ACCURACY_MAX = {
    "paper": R_ACCURACY,
    "code": max(CODE_ACC.values()),
    "grpo": R_ACCURACY_GRPO,
    "two_step": R_ACCURACY_GRPO,
}


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


def srpo_reward(
    response: str,
    answer,
    count_tokens=count_words,
    variant: str = "paper",
    alpha: float = 0.1,
    choices=None,
    use_effectiveness: bool = True,
    use_length: bool = True,
) -> dict[str, float]:
    """Score one rollout against the gold `answer`. Returns the KEYS, total = sum of the rest."""
    if variant not in ACCURACY_MAX:
        raise ValueError(f"unknown reward variant {variant!r}")
    if variant != "paper" and not (use_effectiveness and use_length):
        # the Table 4 ablations are defined on the paper's reward; silently ignoring them is worse
        raise ValueError("use_effectiveness/use_length ablations apply only to variant='paper'")
    if not isinstance(response, str):
        return _scores()
    if variant == "code":
        return _code_reward(response, answer, count_tokens, alpha)

    p = parse_response(response)
    if variant == "grpo":  # one round only; a two-round response is off-format for GRPO
        if p.rounds != 1:
            return _scores()
        return _scores(R_FORMAT, R_ACCURACY_GRPO * is_correct(p.answer1, answer, choices))
    if variant == "two_step":  # GRPO's reward on the final answer of the two-round format: what SRPO adds, removed
        if p.rounds != 2:
            return _scores()
        return _scores(R_FORMAT, R_ACCURACY_GRPO * is_correct(p.answer2, answer, choices))

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


# The released reward ("code" variant): the OpenRLHF reward function of the SRPO release
# (SUSTechBruce/SRPO_MLLMs, spro_rl_train/openrlhf_srpo/srpo_runs/scripts/srpo_reward_func.py), re-implemented
# judgement for judgement. It does not use is_correct; each quirk below is pinned by a test in tests/test_rewards.py.
_RELEASED_ABCD = ("a", "b", "c", "d")


def _released_correct(block: str, gold_parsed: list) -> bool:
    """Quirk: the whole `<answer>...</answer>` string, tags included, goes to math-verify with String, LaTeX and
    Expr extraction, so a bare `<answer>21</answer>` parses to nothing (the tags touch the number) and is wrong,
    while `<answer> 21 </answer>` is right. verify() gets the answer first and the gold second, as released.
    Ours: an answer over MAX_ANSWER_CHARS is wrong unparsed, as in is_correct (math-verify on it takes seconds)."""
    if len(block) > MAX_ANSWER_CHARS:
        return False
    try:
        pred = parse(
            f"<answer>{block}</answer>",
            parsing_timeout=_timeout(),
            extraction_config=[StringExtractionConfig(), LatexExtractionConfig(), ExprExtractionConfig()],
        )
        return bool(verify(pred, gold_parsed, timeout_seconds=_timeout()))
    except (Exception, TimeoutException):  # released: an exception leaves the accuracy at 0
        return False


@lru_cache(maxsize=65536)
def _released_gold(gold: str) -> tuple:
    """The gold as the released code parsed it: wrapped as `$gold$`, math-verify's default extraction."""
    try:
        return tuple(parse(f"${gold}$", parsing_timeout=_timeout()))
    except (Exception, TimeoutException):
        return ()


def _released_letter_fallback(block: str, gold_parsed: list) -> bool:
    """Quirk: when the accuracy came out 0, the last answer block is right if the gold is one of a-d and, lowercased,
    the block contains that letter anywhere and none of the other three anywhere: "B" and "(B) 40" pass, "Answer: B"
    fails (the "a" of "answer"), so does "Choice B" (the "c")."""
    text = f"<answer>{block}</answer>".replace("</answer>", "").replace("<answer>", "").strip().lower()
    return any(
        str(g).lower() in _RELEASED_ABCD
        and str(g).lower() in text
        and not any(o in text for o in _RELEASED_ABCD if o != str(g).lower())
        for g in gold_parsed
    )


def _code_reward(response, answer, count_tokens, alpha) -> dict[str, float]:
    """The released reward, quirks included (docs/reward.md lists them):
    - fewer than two `<think>...</think>` or two `<answer>...</answer>` matches: every term 0 (the released length
      function crashed on them and the whole reward fell back to 0), so a one-round response scores nothing;
    - accuracy merges correctness and effectiveness (CODE_ACC) on the first and the last answer block, judged by
      _released_correct, then _released_letter_fallback when it is 0; no I_ref, no I_eff;
    - the gold is wrapped as `$gold$` and parsed with math-verify's defaults; a gold that parses to nothing gives
      accuracy 1.0; the choices are not used (the released function saw only the label);
    - format: parse_response(released=True) is a well-formed two-round response;
    - length: f_len on the whole stripped response, n1 from the first think and answer matches (_length)."""
    thinks, answers = lenient_blocks(response, "think"), lenient_blocks(response, "answer")
    if len(thinks) < 2 or len(answers) < 2:
        return _scores()
    fmt = R_FORMAT if parse_response(response, released=True).rounds == 2 else 0.0
    length = alpha * _length(response, thinks[0], answers[0], count_tokens)
    gold_parsed = list(_released_gold(str(answer)))
    if not gold_parsed:  # quirk: a gold that parses to nothing pays full accuracy
        return _scores(fmt, 1.0, 0.0, 0.0, length)
    acc = CODE_ACC[(_released_correct(answers[0], gold_parsed), _released_correct(answers[-1], gold_parsed))]
    if acc == 0.0 and _released_letter_fallback(answers[-1], gold_parsed):
        acc = 1.0
    return _scores(fmt, acc, 0.0, 0.0, length)


def outcome(response: str, answer, choices=None) -> dict[str, float]:
    """What happened in one rollout, for metrics (not the reward): rounds (0 malformed, 1, 2), first- and
    final-answer correctness. The final answer is A2 of a two-round response and A1 of a one-round one."""
    p = parse_response(response)
    first = p.rounds > 0 and is_correct(p.answer1, answer, choices)
    final = first if p.rounds == 1 else p.rounds == 2 and is_correct(p.answer2, answer, choices)
    return {"rounds": float(p.rounds), "first_correct": float(first), "final_correct": float(final)}
