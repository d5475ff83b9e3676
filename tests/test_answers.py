"""One answer extraction for the training reward and for evaluation (rewards.extract_answer + rewards.is_correct),
on answers written the ways instruction-tuned VLMs (Qwen2.5-VL and the like) write them: in a sentence, with units,
\\text{}, bold, \\frac, options by letter and by text; wrong ones too. Each row is judged three ways that must agree:
is_correct on the block, the paper reward's accuracy term on a one-round response, and evaluation's verdict on the
final answer of a two-round response (evaluation.score_response on the project's own 'jsonl' benchmark)."""

import pytest

from nanosrpo import evaluation, rewards

NUM4 = ["30", "40", "50", "60"]
SHAPES = ["equilateral", "isosceles", "scalene", "right"]
LENGTHS = ["5 cm", "10 cm", "15 cm", "20 cm"]

# (answer block as the model wrote it, gold, choices, right?)
ANSWERS = [
    # multiple choice, the letter in a sentence or a wrapper (the SRPO prompt asks for $\boxed{}$)
    ("The answer is $\\boxed{B}$.", "B", NUM4, True),
    ("The answer is $\\boxed{B}$.", "B", None, True),
    ("The correct option is (B).", "B", NUM4, True),
    ("The correct option is (B).", "B", None, True),
    ("Answer: B", "B", NUM4, True),
    ("Answer: B", "B", None, True),
    ("The answer is B.", "B", NUM4, True),
    ("The answer is B.", "B", None, True),
    ("**B**", "B", None, True),
    ("\\boxed{\\text{B}}", "B", None, True),
    ("B. 40", "B", NUM4, True),
    ("(B) 40", "B", NUM4, True),
    ("Option B is correct.", "B", NUM4, True),
    ("**Answer:** (B) 40", "B", NUM4, True),
    ("The correct answer is **(B) 40**.", "B", NUM4, True),
    ("The answer is C.", "B", NUM4, False),
    ("$\\boxed{C}$", "B", None, False),
    ("Answer: (A)", "B", NUM4, False),
    ("I think it is B or C", "B", NUM4, False),  # a hedge names no letter
    ("The answer is (B) or (C).", "B", None, False),
    ("Answer: B, C", "B", None, False),
    ("A right triangle has a hypotenuse of 5.", "A", NUM4, False),  # the article "A" is no letter
    # multiple choice, the option's text instead of its letter
    ("40", "B", NUM4, True),
    ("$\\boxed{40}$", "B", NUM4, True),
    ("The answer is 40.", "B", NUM4, True),
    ("isosceles", "B", SHAPES, True),
    ("The triangle is isosceles.", "B", SHAPES, True),
    ("\\text{Isosceles}", "B", SHAPES, True),
    ("Equilateral", "B", SHAPES, False),
    ("10 cm", "B", LENGTHS, True),
    ("$10\\text{ cm}$", "B", LENGTHS, True),
    ("The length of the side is 10 cm.", "B", LENGTHS, True),
    ("15 cm", "B", LENGTHS, False),
    # numbers, with units, in sentences
    ("$\\boxed{12}$", "12", None, True),
    ("The answer is $\\boxed{12}$.", "12", None, True),
    ("12 cm", "12", None, True),
    ("$12\\text{ cm}$", "12", None, True),
    ("The perimeter is 12 cm.", "12", None, True),
    ("x = 12", "12", None, True),
    ("**12**", "12", None, True),
    ("12.0", "12", None, True),
    ("There are 12 apples.", "12", None, True),
    ("13", "12", None, False),
    ("12 or 13", "12", None, False),
    ("-12", "12", None, False),
    ("The answer is 120.", "12", None, False),
    ("5 m", "5", None, True),  # a letter unit is not a choice letter
    ("5x", "5", None, False),  # ... but a glued variable is not a unit
    ("45°", "45", None, True),
    ("$30^\\circ$", "30", None, True),
    ("The angle is $45^{\\circ}$.", "45", None, True),
    ("135°", "45", None, False),
    ("\\$3.50", "3.5", None, True),
    ("It costs $3.50.", "3.5", None, True),
    ("3,000", "3000", None, True),
    ("25%", "25", None, True),
    # LaTeX by value
    ("$\\frac{1}{2}$", "\\frac{1}{2}", None, True),
    ("0.5", "\\frac{1}{2}", None, True),
    ("The probability is $\\frac{1}{2}$.", "\\frac{1}{2}", None, True),
    ("\\dfrac{1}{2}", "0.5", None, True),
    ("$\\frac{1}{3}$", "\\frac{1}{2}", None, False),
    ("$\\sqrt{12}$", "2\\sqrt{3}", None, True),
    ("The side is $2\\sqrt{3}$ cm.", "2\\sqrt{3}", None, True),
    ("$3\\sqrt{2}$", "2\\sqrt{3}", None, False),
]


def _ids():
    return [f"{i}:{a[:30]}->{g}{'+c' if c else ''}" for i, (a, g, c, _) in enumerate(ANSWERS)]


@pytest.mark.parametrize("answer, gold, choices, want", ANSWERS, ids=_ids())
def test_reward_and_evaluation_agree(answer, gold, choices, want):
    assert rewards.is_correct(answer, gold, choices) is want
    # the training reward: the paper's accuracy term of a one-round response
    one = f"<think>r</think> <answer>{answer}</answer>"
    assert rewards.srpo_reward(one, gold, choices=choices)["accuracy"] == 0.5 * want
    # evaluation: the final answer of a two-round response, by the jsonl benchmark's rule
    two = f"<think>r</think> <answer>0</answer> <reflection>f</reflection> <think>s</think> <answer>{answer}</answer>"
    row = evaluation.score_response("jsonl", {"id": "q", "answer": gold, "choices": choices}, two)
    assert row["final_answer"] == rewards.extract_answer(answer)  # one extraction path
    assert row["final_correct"] is want


def test_table_is_large_and_mixed():
    assert len(ANSWERS) >= 40
    assert 10 <= sum(not w for *_, w in ANSWERS) <= len(ANSWERS) - 10


@pytest.mark.parametrize(
    "block, want",
    [
        ("The answer is $\\boxed{B}$.", "B"),
        ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last one
        ("\\boxed{\\text{B}}", "B"),
        ("**12**", "12"),
        ("$$x$$", "x"),
        ("\\(x+1\\)", "x+1"),
        ("$a$ and $b$", "$a$ and $b$"),  # two formulas, not one wrapper
        ("\\text{a} + \\text{b}", "\\text{a} + \\text{b}"),
        ("\\boxed{unclosed", "\\boxed{unclosed"),
        ("  ", ""),
    ],
)
def test_extract_answer(block, want):
    assert rewards.extract_answer(block) == want
    assert rewards.extract_answer(want) == want  # extracting twice changes nothing


def test_last_boxed_is_linear():
    import time

    text = "\\boxed{" * 20000  # none closed: the old per-start scan was quadratic here
    t0 = time.perf_counter()
    assert rewards.last_boxed(text) is None
    assert time.perf_counter() - t0 < 0.5
