"""Each benchmark's official rule-based scoring (nanosrpo/benchmarks.py) against hand-computed cases, and the MathVista
dev check: one published model's extracted answers, re-scored through evaluate.py --predictions with no image present,
give exactly its official score, verdict by verdict."""

import json
import shutil

import pytest

import evaluate
from nanosrpo import benchmarks, evaluation
from tests.conftest import ROOT

# CI puts a copy of shared/ beside the clone (some checkouts hold it inside): testmini.json (the official
# annotations) and dev_outputs_bard.json (one published model's extractions, official verdicts and score).
MATHVISTA_DEV = next(
    (
        p
        for p in (ROOT.parent / "shared" / "data" / "mathvista", ROOT / "shared" / "data" / "mathvista")
        if (p / "dev_outputs_bard.json").is_file()
    ),
    ROOT.parent / "shared" / "data" / "mathvista",
)


def mathvista_dev_check(folder, tmp_path):
    """Write each published extraction as '<answer>EXTRACTION</answer>', re-score it from a folder holding only
    testmini.json; returns (results.json's dict, published rows {pid: [extraction, official_true_false]},
    scored rows)."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(folder / "testmini.json", data / "testmini.json")  # no images/ beside it
    dev = json.loads((folder / "dev_outputs_bard.json").read_text())["bard"]
    preds = tmp_path / "bard.jsonl"
    preds.write_text(
        "".join(
            json.dumps({"id": pid, "response": f"<answer>{ext}</answer>"}) + "\n"
            for pid, (ext, _) in dev["rows"].items()
        )
    )
    out = tmp_path / "out"
    res = evaluate.main(
        [
            "--benchmark",
            "mathvista",
            "--data",
            str(data / "testmini.json"),
            "--predictions",
            str(preds),
            "--out_dir",
            str(out),
        ]
    )["mathvista"]
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    return res, dev, rows


@pytest.mark.skipif(
    not (MATHVISTA_DEV / "dev_outputs_bard.json").is_file(),
    reason=f"the MathVista dev set is not at {MATHVISTA_DEV} (CI copies shared/ beside the clone)",
)
def test_mathvista_dev_outputs_give_the_official_score(tmp_path):
    res, dev, rows = mathvista_dev_check(MATHVISTA_DEV, tmp_path)
    assert dev["official_average"]["accuracy"] == "34.8"
    assert res["n"] == 1000 and res["accuracy"] == 0.348 and res["missing_predictions"] == 0
    published = dev["rows"]
    assert all(r["final_answer"] == published[r["id"]][0] for r in rows)  # the extraction reaches the rule unchanged
    assert [r["id"] for r in rows if r["final_correct"] != published[r["id"]][1]] == []  # verdict by verdict
    # strict: the 9 right only by the most-similar-choice guess ('Sorry, I can't help...', 'N/A', '8' for 18.79)
    assert res["strict_accuracy"] == 0.339 and res["guessed_rate"] == 0.016


# ----------------------------------------------------------------------------------------------------- MathVista
def test_levenshtein_by_hand():
    lev = benchmarks.levenshtein
    assert lev("kitten", "sitting") == 3 and lev("", "abc") == 3 and lev("abc", "abc") == 0
    assert lev("145", "145°") == 1 and lev("B.", "135°") == 4


def mathvista_rec(choices=None, answer="145°", qtype="multi_choice", atype="text", precision=None):
    return {
        "id": "1",
        "answer": answer,
        "choices": choices,
        "meta": {"question_type": qtype, "answer_type": atype, "precision": precision},
    }


def test_mathvista_judge_official_and_guessed():
    rec = mathvista_rec(["135°", "140°", "145°", "150°"])
    assert benchmarks.judge("mathvista", rec, "C") == (True, False)
    assert benchmarks.judge("mathvista", rec, "145") == (True, False)  # nearest choice, the same value
    assert benchmarks.judge("mathvista", rec, "45°") == (True, True)  # nearest choice, another value: a guess
    assert benchmarks.judge("mathvista", rec, None) == (False, True)  # '' -> the first shortest choice, 135°
    assert benchmarks.judge("mathvista", mathvista_rec(["Yes", "No"], "No"), "N/A") == (True, True)  # 'No' is nearer
    free = mathvista_rec(answer="1000", qtype="free_form", atype="integer")
    assert [benchmarks.is_right("mathvista", free, a) for a in ("1000", "1000.7", "1,000", "1000 g")] == [
        True,
        True,
        False,
        False,
    ]
    text = mathvista_rec(answer="Yes", qtype="free_form")
    assert benchmarks.is_right("mathvista", text, "Yes") and not benchmarks.is_right("mathvista", text, "yes")


def test_a_sentence_naming_a_letter_is_read_as_that_letter():
    """The official pipelines score a GPT extractor's answer ("B"); ours reads the model's sentence the way the
    reward does, so training and evaluation agree on "The answer is B." (MathVista and MathVerse)."""
    rec = mathvista_rec(["135°", "140°", "145°", "150°"])
    for said in ("The answer is C.", "Answer: (C)", "The correct option is C", "C"):
        assert benchmarks.judge("mathvista", rec, said) == (True, False), said
    assert benchmarks.judge("mathvista", rec, "The answer is B.") == (False, False)
    assert benchmarks.judge("mathvista", rec, "B or C")[1]  # a hedge names no letter: the nearest-choice guess
    assert benchmarks.judge("mathvista", rec, "The answer is E.")[1]  # out of range: left to the official rule
    verse = {"id": "1", "answer": "B", "choices": ["1", "2", "3", "4"], "meta": {}}
    assert [benchmarks.is_right("mathverse", verse, a) for a in ("B", "The answer is B.", "The answer is A.")] == [
        True,
        True,
        False,
    ]


# ----------------------------------------------------------------------------------------------------- MMMU-Pro
@pytest.mark.parametrize(
    "response, letter, guessed",
    [
        ("B", "B", False),
        ("B.", "B", False),  # ends stripped of punctuation, then 'B '
        ("(C) blue", "C", False),
        ("Answer: C", "C", False),  # the one letter after the last 'Answer:'
        ("Answer: A or C, finally (C)", "C", False),  # two letters after 'Answer:': the bracketed one
        ("A and then C and finally B", "B", False),  # several 'X ': the last ' X ' in the response
        ("it is blue because of the sky", "C", False),  # over 5 words, no letter: the option whose text it contains
    ],
)
def test_mmmu_pro_parse_by_hand(response, letter, guessed):
    assert benchmarks.mmmu_pro_parse(response, ["red", "green", "blue"], "id1") == (letter, guessed)


def test_mmmu_pro_random_pick_is_seeded_and_flagged():
    opts = [str(i) for i in range(10)]
    picks = {benchmarks.mmmu_pro_parse("no idea", opts, f"test_{i}") for i in range(30)}
    assert all(g for _, g in picks) and len({p for p, _ in picks}) > 1  # guesses, spread over the letters
    assert benchmarks.mmmu_pro_parse("", opts, "test_7") == benchmarks.mmmu_pro_parse("", opts, "test_7")
    rec = {"id": "test_7", "answer": benchmarks.mmmu_pro_parse("", opts, "test_7")[0], "choices": opts}
    assert benchmarks.judge("mmmu_pro", rec, None) == (True, True)  # the official figure credits the lucky pick


# ----------------------------------------------------------------------------------------- WeMath, MathVerse
@pytest.mark.parametrize(
    "answer, letter",
    [
        ("B", "B"),
        ("B. 2", "B"),
        ("Answer: C", "C"),
        ("<Answer>: D.", "D"),
        ("the answer is B", None),  # 't' is no option
        ("(B)", None),
        ("b", None),
        ("H", "H"),
        ("I", None),
        ("", None),
    ],
)
def test_wemath_letter_by_hand(answer, letter):
    assert benchmarks.wemath_letter(answer) == letter


def test_mathverse_rule_based_match_is_string_equality():
    rec = {"id": "1", "answer": "0.5", "choices": None, "meta": {}}
    assert [benchmarks.is_right("mathverse", rec, a) for a in ("0.5", "1/2", ".5", None)] == [True, False, False, False]


# ----------------------------------------------------------------------------------------------------- MATH-Vision
@pytest.mark.parametrize(
    "response, cleaned",
    [
        ("The answer is 5.", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),  # _strip_string writes 0.5 as a fraction
        ("3/4", "\\frac{3}{4}"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("x = 3", "3"),  # the value after '='
        ("(C)", "c"),  # lower-cased, '(c)' -> 'c'
        ("so it is C.", "c"),
        ("\\boxed{A} and \\boxed{B}", "b"),  # several boxes: the last
        ("45^\\circ", "45"),
        ("12 cm", "12cm"),  # only m^3, km and 'units' are dropped
    ],
)
def test_mathvision_clean_by_hand(response, cleaned):
    assert benchmarks.mathvision_clean(response) == cleaned


# Published responses and the model_answer the official script stored for them (MATH-V outputs/: GPT4-CoT (Text
# Only).jsonl ids 10, 15, 18, 19, 22, 33; Qwen-VL-Plus.jsonl ids 84, 83, 134).
PUBLISHED = [
    ("Which totals to $\\boxed{5}$ people.", "5"),
    ("So the answer is (A).\n\nTherefore, our final answer is \\boxed{(A)}.", "a"),
    ("... a total of 15/3 = \\boxed{5} pieces. \n\nHowever, ... we will need to make \\boxed{4} cuts.", "4"),
    ("So, Eve has 24 mandarins. \n\nTherefore, the answer is \\boxed{\\text{(D)}}.", "d"),
    ("So, the current time is \\boxed{\\text{(E) 9:30}}.", "{e9:30}"),
    ("So, the solution is $\\boxed{\\text{parrot}}$.", "{parrot}"),
    ("$35 \\mathrm{~km}$", "35\\mathrm{~}"),
    ("... = (6)(10) = 60 cm.\n\nTherefore, the answer is (E).", "e"),
    ("Image1 D", "image1d"),
]


@pytest.mark.parametrize("response, model_answer", PUBLISHED)
def test_mathvision_clean_matches_published_model_answers(response, model_answer):
    assert benchmarks.mathvision_clean(response) == model_answer


@pytest.mark.parametrize(
    "gold, answer, right",
    [
        ("0.5", "\\frac{1}{2}", True),
        ("3.14", "3.1416", True),  # values compared rounded to 2 decimals
        ("3.14", "\\pi", True),
        ("\\frac{\\sqrt{2}}{2}", "0.7071", True),
        ("(6,7)", "(2*3, 5+2)", True),  # tuples: each element evaluated
        ("1000", "1,000", False),  # a comma makes a list, which has no value
        ("12", "12cm", False),  # c*m has no value
        ("2.72", "e", False),  # sympy prints E, which the official eval does not know
        ("2", "10^{10^{10}}", False),  # a huge power is refused, not computed
        ("1", "2\\frac{1}{2}", True),  # latex2sympy2 multiplies: 2 * 1/2 (not the mixed number 5/2)
    ],
)
def test_mathvision_is_equal_by_hand(gold, answer, right):
    assert benchmarks.mathvision_is_equal(gold, benchmarks.mathvision_clean(answer)) is right


def test_mathvision_letter_or_option_text():
    assert benchmarks.mathvision_is_right("(B)", "B", ["red", "Blue"])
    assert benchmarks.mathvision_is_right("blue", "B", ["red", "Blue"])  # the gold option's text, any case
    assert not benchmarks.mathvision_is_right("red", "B", ["red", "Blue"])
    assert not benchmarks.mathvision_is_right("", "5", None)


def test_jsonl_keeps_judging_by_value():
    rec = {"id": "1", "answer": "0.5", "choices": None, "meta": {}}
    assert benchmarks.judge("jsonl", rec, "\\frac{1}{2}") == (True, False)
    assert benchmarks.judge("jsonl", rec, None) == (False, False)
    assert evaluation.score_response("jsonl", rec, "<answer>1/2</answer>")["final_correct"]


def test_predictions_need_no_images(tmp_path):
    """--predictions reads the annotations only: no images/ folder beside testmini.json (a model run needs it)."""
    from nanosrpo.data import DataError
    from tests.test_evaluate import MATHVISTA, MATHVISTA_RESPONSES, rescore

    (tmp_path / "testmini.json").write_text(json.dumps(MATHVISTA))
    with pytest.raises(DataError, match="image file not found"):
        benchmarks.load("mathvista", tmp_path)
    assert benchmarks.load("mathvista", tmp_path, images=False)[0]["images"] == ["images/1.png"]
    res, _ = rescore(tmp_path, "mathvista", tmp_path / "testmini.json", MATHVISTA_RESPONSES)
    assert (res["n"], res["accuracy"]) == (4, 0.5)


def test_strict_figures_drop_only_guessed_credit():
    """add_strict: a lucky random MMMU-Pro letter counts in accuracy (official), not in strict_accuracy."""
    opts = [str(i) for i in range(10)]
    lucky = benchmarks.mmmu_pro_parse("", opts, "test_7")[0]
    recs = [
        {"id": "test_7", "answer": lucky, "choices": opts, "categories": {}, "meta": {}},
        {"id": "test_8", "answer": "B", "choices": opts, "categories": {}, "meta": {}},
    ]
    rows = [
        evaluation.score_response("mmmu_pro", recs[0], "I cannot tell."),  # no answer at all: a random pick
        evaluation.score_response("mmmu_pro", recs[1], "<answer>B</answer>"),
    ]
    res = evaluate.add_strict("mmmu_pro", recs, rows, evaluation.summarize("mmmu_pro", recs, rows))
    assert (res["accuracy"], res["strict_accuracy"], res["guessed_rate"]) == (1.0, 0.5, 0.5)
    assert list(res)[:6] == [
        "n",
        "accuracy",
        "first_accuracy",
        "strict_accuracy",
        "first_strict_accuracy",
        "guessed_rate",
    ]
    assert (rows[0]["final_guessed"], rows[1]["final_guessed"]) == (True, False)
