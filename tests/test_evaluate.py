"""evaluate.py: each benchmark's published layouts (small fixtures written here, images and parquet included), answer
extraction, official scoring against hand-computed accuracies, first vs final answer, transitions, per-category
accuracy, WeMath's four-dimensional metrics, --predictions re-scoring, resume, sharding, clear errors."""

import io
import json

import pytest
from PIL import Image

import evaluate
from nanosrpo import benchmarks, evaluation, synthetic
from nanosrpo.data import DataError

TWO = "<think>a</think> <answer>{}</answer> <reflection>r</reflection> <think>b</think> <answer>{}</answer>"
ONE = "<think>a</think> <answer>{}</answer>"


def png(path=None, colour="red"):
    """A small real image: written to path, or returned as PNG bytes (HF parquet embeds images so)."""
    im = Image.new("RGB", (28, 28), colour)
    if path is None:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_preds(path, responses: dict):
    path.write_text("".join(json.dumps({"id": k, "response": v}) + "\n" for k, v in responses.items()))
    return path


def rescore(tmp_path, bench, data_path, responses, *extra):
    out = tmp_path / f"out-{bench}"
    preds = write_preds(tmp_path / f"{bench}-preds.jsonl", responses)
    res = evaluate.main(
        ["--benchmark", bench, "--data", str(data_path), "--predictions", str(preds), "--out_dir", str(out), *extra]
    )
    return res[bench], out


# ----------------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    "text, first, final",
    [
        (TWO.format("3", "4"), "3", "4"),  # before and after reflection
        (ONE.format("7"), "7", "7"),  # one round: both the same
        (
            "so the total is \\boxed{\\frac{1}{2}} here",
            "\\frac{1}{2}",
            "\\frac{1}{2}",
        ),  # no block: last \boxed, nested braces
        ("\\boxed{1} then \\boxed{2}", "2", "2"),
        ("<answer>\\boxed{B}</answer> <answer>$5$</answer>", "B", "5"),  # \boxed / $...$ inside a block unwrapped
        ("<answer>The answer is \\boxed{12}.</answer>", "12", "12"),
        ("<answer>3", None, None),  # an unclosed block is no answer
        ("no answer at all", None, None),
        ("<answer> </answer>", None, None),
    ],
)
def test_extract_answers(text, first, final):
    assert evaluation.extract_answers(text) == (first, final)


def test_pass_at_k_by_hand():
    assert evaluation.pass_at_k(4, 1, 1) == 0.25
    assert evaluation.pass_at_k(4, 1, 2) == 1 - 3 / 6  # 1 - C(3,2)/C(4,2)
    assert evaluation.pass_at_k(4, 0, 4) == 0.0 and evaluation.pass_at_k(4, 3, 2) == 1.0


def test_several_samples_mean_accuracy_and_pass_at_k():
    recs = [
        benchmarks.from_rl_record({"id": i, "question": "q", "images": [], "answer": "4", "choices": None})
        for i in "ab"
    ]
    rows = [
        evaluation.score_response("jsonl", recs[0], ONE.format("4"), 0, 10),
        evaluation.score_response("jsonl", recs[0], ONE.format("5"), 1, 20),
        evaluation.score_response("jsonl", recs[1], TWO.format("4", "3"), 0, 30),
        evaluation.score_response("jsonl", recs[1], "<answer>5</answer>", 1, 40),
    ]
    res = evaluation.summarize("jsonl", recs, rows)
    assert (res["accuracy"], res["first_accuracy"], res["format_rate"], res["two_round_rate"]) == (
        0.25,
        0.5,
        0.75,
        0.25,
    )
    assert (res["right_to_wrong"], res["mean_response_tokens"]) == (0.25, 25)
    assert (res["pass@1"], res["pass@2"]) == (0.25, 0.5)  # a: 1 of 2 right, b: 0 of 2


def test_shard_and_unshard_restore_order():
    items = list(range(11))
    parts = [evaluation.shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert evaluation.unshard(parts) == items
    assert evaluation.unshard([evaluation.shard(items[:1], r, 4) for r in range(4)]) == [0]  # idle ranks


# ----------------------------------------------------------------------------------------------------- MathVista
MATHVISTA = {
    "1": {
        "question": "angle?",
        "image": "images/1.png",
        "choices": ["135°", "140°", "145°", "150°"],
        "unit": None,
        "precision": None,
        "answer": "145°",
        "question_type": "multi_choice",
        "answer_type": "text",
        "pid": "1",
        "metadata": {
            "task": "geometry problem solving",
            "skills": ["geometry reasoning", "algebraic reasoning"],
            "grade": "high school",
        },
    },
    "2": {
        "question": "volume?",
        "image": "images/2.png",
        "choices": None,
        "unit": "g",
        "precision": None,
        "answer": "1000",
        "question_type": "free_form",
        "answer_type": "integer",
        "pid": "2",
        "metadata": {"task": "visual question answering", "skills": ["numeric commonsense"], "grade": "not applicable"},
    },
    "3": {
        "question": "distance?",
        "image": "images/3.png",
        "choices": None,
        "unit": None,
        "precision": 1,
        "answer": "1.2",
        "question_type": "free_form",
        "answer_type": "float",
        "pid": "3",
        "metadata": {"task": "textbook question answering", "skills": ["scientific reasoning"], "grade": "college"},
    },
    "4": {
        "question": "fewer?",
        "image": "images/4.png",
        "choices": ["Yes", "No"],
        "unit": None,
        "precision": None,
        "answer": "Yes",
        "question_type": "multi_choice",
        "answer_type": "text",
        "pid": "4",
        "metadata": {
            "task": "visual question answering",
            "skills": ["arithmetic reasoning"],
            "grade": "not applicable",
        },
    },
}
# 1: (A)=135° wrong -> C=145° right (wrong->right);  2: 1000 right (one round);
# 3: 1.23 -> 1.2 right -> 1.3 wrong (right->wrong);  4: no tags, \boxed{No}: wrong, malformed
MATHVISTA_RESPONSES = {
    "1": TWO.format("(A)", "C"),
    "2": ONE.format("1000"),
    "3": TWO.format("1.23", "\\boxed{1.3}"),
    "4": "I think the answer is \\boxed{No}.",
}


def mathvista_release(tmp_path):
    root = tmp_path / "MathVista"
    for pid in MATHVISTA:
        png(root / "images" / f"{pid}.png")
    (root / "testmini.json").write_text(json.dumps(MATHVISTA))
    return root


def test_mathvista_release_layout_and_official_scoring(tmp_path):
    root = mathvista_release(tmp_path)
    recs = benchmarks.load("mathvista", root)  # a folder: finds testmini.json
    assert [r["id"] for r in recs] == ["1", "2", "3", "4"]
    assert recs[0]["question"] == "angle?\nChoices:\nA. 135°\nB. 140°\nC. 145°\nD. 150°"
    assert recs[0]["images"] == [str(root / "images" / "1.png")]
    res, out = rescore(tmp_path, "mathvista", root, MATHVISTA_RESPONSES)
    assert (res["n"], res["accuracy"], res["first_accuracy"], res["format_rate"]) == (4, 0.5, 0.5, 0.75)
    assert (res["wrong_to_right"], res["right_to_wrong"], res["right_to_right"], res["wrong_to_wrong"]) == (
        0.25,
        0.25,
        0,
        0,
    )
    vqa = res["by_category"]["task"]["visual question answering"]
    assert (vqa["n"], vqa["accuracy"]) == (2, 0.5)  # pids 2 (right) and 4 (wrong)
    assert res["by_category"]["skills"]["geometry reasoning"]["accuracy"] == 1.0
    assert res["by_category"]["skills"]["scientific reasoning"] == {"n": 1, "accuracy": 0.0, "first_accuracy": 1.0}
    rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert rows[0]["first_answer"] == "(A)" and rows[0]["final_answer"] == "C"
    assert (rows[0]["first_correct"], rows[0]["final_correct"]) == (False, True)
    assert rows[0]["final_guessed"] is False and res["strict_accuracy"] == 0.5 and res["guessed_rate"] == 0
    md = (out / "results.md").read_text()
    assert "| accuracy | 50.0% |" in md and "| strict_accuracy | 50.0% |" in md and "official" in md


def test_mathvista_parquet_layout_gives_the_same_records(tmp_path):
    rows = []
    for pid, r in MATHVISTA.items():  # HF layout: decoded_image holds the bytes, precision a float
        rows.append(
            {
                **r,
                "precision": None if r["precision"] is None else float(r["precision"]),
                "decoded_image": {"bytes": png(), "path": f"{pid}.png"},
                "query": "...",
            }
        )
    path = write_parquet(tmp_path / "hf" / "data" / "testmini-00000-of-00001.parquet", rows)
    write_parquet(tmp_path / "hf" / "data" / "test-00000-of-00002.parquet", rows)  # another split: not read
    recs = benchmarks.load("mathvista", tmp_path / "hf")
    json_recs = benchmarks.load("mathvista", mathvista_release(tmp_path))
    assert len(recs) == 4 and isinstance(recs[0]["images"][0], bytes)
    assert [{**r, "images": None} for r in recs] == [{**r, "images": None} for r in json_recs]
    res, _ = rescore(tmp_path, "mathvista", path, MATHVISTA_RESPONSES)
    assert (res["accuracy"], res["first_accuracy"]) == (0.5, 0.5)


def test_mathvista_normalisation_rules():
    """calculate_score.py's normalize_extracted_answer, by hand: (prediction, guessed)."""
    norm = benchmarks.mathvista_normalize
    ch = ["135°", "140°", "145°", "150°"]
    mc = lambda a: norm(a, ch, "multi_choice", "text", None)  # noqa: E731
    assert [mc(a) for a in ("B", " B ", "(b)", "145°", "(C) 145°", "see (d) or (a)")] == [
        ("140°", False),
        ("140°", False),
        ("140°", False),
        ("145°", False),
        ("145°", False),
        ("150°", False),
    ]
    assert mc("145") == ("145°", False)  # nearest by edit distance (1), and the same value: not a guess
    assert mc("B.") == ("135°", True)  # 'B.' is no option letter: edit distance 4 to each choice, the first wins
    assert mc("E") == ("135°", True) and mc("") == ("135°", True)  # no usable answer: the official rule still picks
    assert mc("139") == ("135°", True)  # 135° and 139 differ in 2 characters, 140° in 3
    assert norm("7.9", None, "free_form", "integer", None) == ("7", False)  # str(int(float(x)))
    assert norm("5 cm", None, "free_form", "integer", None) == (None, False)  # float() fails: no value
    assert norm("1,000", None, "free_form", "integer", None) == (None, False)
    assert norm("1e3", None, "free_form", "integer", None) == ("1000", False)
    assert norm("inf", None, "free_form", "integer", None) == (None, False)  # int(inf) raises: None, as official
    assert norm("1.26", None, "free_form", "float", 1.0) == ("1.3", False)  # parquet's float precision
    assert norm("1.26", None, "free_form", "float", 2) == ("1.26", False)
    assert norm("2", None, "free_form", "float", None) == ("2", False)  # round(x, None) is an int
    assert norm("[1, 2]", None, "free_form", "list", None) == ("[1, 2]", False)


def test_missing_field_names_the_field_and_the_record(tmp_path):
    root = mathvista_release(tmp_path)
    broken = json.loads((root / "testmini.json").read_text())
    del broken["2"]["answer_type"]
    (root / "testmini.json").write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"record 2 \(pid 2\): field 'answer_type' is missing"):
        benchmarks.load("mathvista", root)
    with pytest.raises(SystemExit, match="field 'answer_type' is missing"):
        evaluate.main(
            [
                "--benchmark",
                "mathvista",
                "--data",
                str(root),
                "--predictions",
                "x.jsonl",
                "--out_dir",
                str(tmp_path / "o"),
            ]
        )
    rows = [{k: v for k, v in MATHVISTA["1"].items() if k != "answer"}]
    path = write_parquet(root / "bad.parquet", rows)  # beside images/: only the answer is missing
    with pytest.raises(DataError, match=r"bad.parquet: row 0 \(pid 1\): field 'answer' is missing"):
        benchmarks.load("mathvista", path)


# ----------------------------------------------------------------------------------------------------- MathVerse
def test_mathverse_choices_in_the_question_and_exact_match(tmp_path):
    root = tmp_path / "MathVerse"
    png(root / "images" / "a.png")
    rows = [
        {
            "sample_index": "1",
            "problem_index": "1",
            "problem_version": "Text Dominant",
            "image": "images/a.png",
            "question": "angle CED?\nChoices:\nA:40°\nB:60°\nC:120°\nD:140°",
            "answer": "D",
            "question_type": "multi-choice",
            "metadata": {"subject": "plane geometry", "subfield": "angle"},
        },
        {
            "sample_index": "2",
            "problem_index": "2",
            "problem_version": "Vision Only",
            "image": "images/a.png",
            "question": "ratio?",
            "answer": "0.5",
            "question_type": "free-form",
            "metadata": {"subject": "algebra"},
        },
        {
            "sample_index": "3",
            "problem_index": "3",
            "problem_version": "Text Only",
            "image": "",
            "question": "how many?",
            "answer": "5",
            "question_type": "free-form",
            "metadata": {"subject": "algebra"},
        },
    ]
    (root / "testmini.json").write_text(json.dumps(rows))
    recs = benchmarks.load("mathverse", root)
    assert recs[0]["choices"] == ["40°", "60°", "120°", "140°"] and recs[2]["images"] == []
    # the official rule-based match is string equality: 1: the option's text is not its letter D (wrong -> right);
    # 2: \frac{1}{2} is not the string 0.5; 3: 5 right -> 6 wrong
    res, _ = rescore(
        tmp_path,
        "mathverse",
        root,
        {"1": TWO.format("140°", "D"), "2": ONE.format("$\\frac{1}{2}$"), "3": TWO.format("5", "6")},
    )
    assert res["accuracy"] == pytest.approx(1 / 3) and res["first_accuracy"] == pytest.approx(1 / 3)
    assert res["right_to_wrong"] == pytest.approx(1 / 3) and res["wrong_to_right"] == pytest.approx(1 / 3)
    assert res["by_category"]["problem_version"]["Text Only"]["accuracy"] == 0.0
    assert res["by_category"]["subject"]["algebra"] == {"n": 2, "accuracy": 0.0, "first_accuracy": 0.5}
    # HF parquet: the image embedded in the 'image' column (none for Text Only)
    hf = [{**r, "image": {"bytes": png(), "path": "a.png"} if r["image"] else None} for r in rows]
    pq_recs = benchmarks.load(
        "mathverse", write_parquet(tmp_path / "hf" / "testmini-00000-of-00001.parquet", hf).parent
    )
    assert [{**r, "images": len(r["images"])} for r in pq_recs] == [{**r, "images": len(r["images"])} for r in recs]


# ----------------------------------------------------------------------------------------------------- MATH-Vision
def test_mathvision_jsonl_letters_option_text_and_values(tmp_path):
    root = tmp_path / "MATH-V" / "data"
    rows = [
        {
            "id": "1",
            "question": "<image1> how many?",
            "options": ["1", "2", "3", "4", "5"],
            "image": "images/1.png",
            "answer": "C",
            "solution": None,
            "level": 1,
            "subject": "counting",
        },
        {
            "id": "2",
            "question": "<image1> x?",
            "options": [],
            "image": "images/2.png",
            "answer": "12",
            "solution": None,
            "level": 2,
            "subject": "algebra",
        },
        {
            "id": "3",
            "question": "<image1> colour?",
            "options": ["red", "blue"],
            "image": "images/3.png",
            "answer": "B",
            "solution": None,
            "level": 1,
            "subject": "counting",
        },
    ]
    for r in rows:
        png(root / r["image"])
    (root / "testmini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = benchmarks.load("mathvision", root)
    assert recs[1]["choices"] is None and recs[0]["question"].endswith("D. 4\nE. 5")
    # 1: '3' is option C's text -> right; 2: 11 -> 12 (wrong->right); 3: A is wrong
    res, _ = rescore(
        tmp_path, "mathvision", root, {"1": ONE.format("3"), "2": TWO.format("11", "12"), "3": ONE.format("A")}
    )
    assert res["accuracy"] == pytest.approx(2 / 3) and res["first_accuracy"] == pytest.approx(1 / 3)
    assert res["wrong_to_right"] == pytest.approx(1 / 3)
    assert res["by_category"]["level"] == {
        "1": {"n": 2, "accuracy": 0.5, "first_accuracy": 0.5},
        "2": {"n": 1, "accuracy": 1.0, "first_accuracy": 0.0},
    }
    # HF parquet: 'image' stays a path string, 'decoded_image' holds the bytes
    hf = [{**r, "decoded_image": {"bytes": png(), "path": None}} for r in rows]
    pq_recs = benchmarks.load(
        "mathvision", write_parquet(tmp_path / "hf" / "testmini-00000-of-00001.parquet", hf).parent
    )
    assert all(isinstance(r["images"][0], bytes) for r in pq_recs)
    assert [{**r, "images": None} for r in pq_recs] == [{**r, "images": None} for r in recs]


# ----------------------------------------------------------------------------------------------------- MMMU-Pro
def test_mmmu_pro_standard_and_vision_parquet(tmp_path, tiny_dir):
    from nanosrpo import model

    root = tmp_path / "MMMU_Pro"
    ten = str([str(i) for i in range(10)])
    write_parquet(
        root / "standard (10 options)" / "test-00000-of-00001.parquet",
        [
            {
                "id": "test_Art_1",
                "question": "Which colour? <image 1>",
                "options": "['red', 'green', 'blue']",
                "image_1": {"bytes": png(), "path": "a.png"},
                "image_2": None,
                "answer": "B",
                "subject": "Art",
            },
            {
                "id": "test_Math_2",
                "question": "Which digit?",
                "options": ten,
                "image_1": {"bytes": png(), "path": "b.png"},
                "image_2": {"bytes": png(colour="blue"), "path": "c.png"},
                "answer": "J",
                "subject": "Math",
            },
        ],
    )
    write_parquet(
        root / "vision" / "test-00000-of-00001.parquet",
        [
            {
                "id": "test_Art_1",
                "image": {"bytes": png(), "path": "v.png"},
                "options": "['red', 'green', 'blue']",
                "answer": "B",
                "subject": "Art",
            },
        ],
    )
    std = benchmarks.load("mmmu_pro", root)  # the repo root: the standard (10 options) folder
    assert [len(r["images"]) for r in std] == [1, 2] and std[1]["choices"][-1] == "9"
    assert std[0]["question"] == "Which colour? <image 1>\nChoices:\nA. red\nB. green\nC. blue"
    res, _ = rescore(
        tmp_path, "mmmu_pro", root, {"test_Art_1": ONE.format("(B) green"), "test_Math_2": ONE.format("\\boxed{I}")}
    )
    assert res["accuracy"] == 0.5 and res["by_category"]["subject"]["Art"]["accuracy"] == 1.0
    assert res["strict_accuracy"] == 0.5 and res["guessed_rate"] == 0
    vis = benchmarks.load("mmmu_pro_vision", root)
    assert vis[0]["question"] == benchmarks.MMMU_PRO_VISION_QUESTION and vis[0]["categories"]["setting"] == "vision"
    res, _ = rescore(tmp_path, "mmmu_pro_vision", root, {"test_Art_1": ONE.format("(B)")})
    assert res["accuracy"] == 1.0
    # embedded images reach the model: the prompt carries one <|image_pad|> run per image
    _, processor = model.load_policy(str(tiny_dir))
    prompt = evaluation.render(std[1], "SYS-PROMPT", processor)
    assert len(prompt["images"]) == 2 and prompt["text"].count("<|image_pad|>") == 2 and "SYS-PROMPT" in prompt["text"]
    grid = processor.image_processor(images=prompt["images"], return_tensors="pt")["image_grid_thw"]
    pads = prompt["ids"].count(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    assert pads == int(grid.prod(-1).sum()) // 4 > 0  # each pad expanded to its image's vision tokens (2x2 merge)
    assert "SYS-PROMPT" not in evaluation.render(std[1], None, processor)["text"]  # --prompt none: no system turn


def test_mmmu_pro_bad_options_names_the_record(tmp_path):
    path = write_parquet(
        tmp_path / "test-00000-of-00001.parquet",
        [{"id": "x1", "question": "q", "options": "not a list", "image_1": None, "answer": "A", "subject": "Art"}],
    )
    with pytest.raises(DataError, match=r"row 0 \(id x1\): field 'options'"):
        benchmarks.load("mmmu_pro", path)


# ----------------------------------------------------------------------------------------------------- WeMath
def wemath_rows():
    rows = []
    for gid, n in (("2steps_1", 2), ("2steps_2", 2), ("3steps_1", 3)):
        for part in [str(i) for i in range(1, n + 1)] + ["multi"]:
            rows.append(
                {
                    "ID": gid,
                    "split": "testmini",
                    "knowledge concept": f"concept {part}",
                    "question": f"{gid} {part}?",
                    "option": "A. 1;B. 2;C. 3;D. 4; E. No correct answer",
                    "answer": "B",
                    "image_path": f"{gid[0]}steps/image/{gid}-{part}.png",
                    "key": f"{n}steps_{part}",
                    "question number": len(rows) + 1,
                    "knowledge concept description": "...",
                }
            )
    return rows


def test_wemath_four_dimensional_metrics_by_hand(tmp_path):
    root = tmp_path / "We-Math"
    rows = wemath_rows()
    for r in rows:
        png(root / r["image_path"])
    (root / "testmini.json").write_text(json.dumps(rows))
    recs = benchmarks.load("wemath", root)
    assert recs[0]["id"] == "2steps_1/2steps_1" and recs[0]["choices"] == ["1", "2", "3", "4", "No correct answer"]
    right, wrong = ONE.format("B"), ONE.format("A")
    verdicts = {  # group 1: subs right, composite wrong (IG); group 2: one sub wrong, composite right (RM strict,
        # CM loose); group 3: all subs wrong, composite right (RM strict and loose)
        "2steps_1/2steps_1": right,
        "2steps_1/2steps_2": right,
        "2steps_1/2steps_multi": wrong,
        "2steps_2/2steps_1": wrong,
        "2steps_2/2steps_2": right,
        "2steps_2/2steps_multi": right,
        "3steps_1/3steps_1": wrong,
        "3steps_1/3steps_2": wrong,
        "3steps_1/3steps_3": wrong,
        "3steps_1/3steps_multi": right,
    }
    res, out = rescore(tmp_path, "wemath", root, verdicts)
    assert res["accuracy"] == 0.5
    w = res["wemath"]
    assert w["groups"] == 3 and w["IK"] == 0 and w["IG"] == pytest.approx(1 / 3)
    assert (w["CM_strict"], w["CM_loose"]) == (0, pytest.approx(1 / 3))
    assert (w["RM_strict"], w["RM_loose"]) == (1.0, 0.5)  # RM / (CM + RM): 2 / 2 strict, 1 / 2 loose
    assert w["score_strict"] == pytest.approx((3 - 0.5 - 2 - 0) / 3)
    assert w["score_loose"] == pytest.approx((3 - 0.5 - 1 - 0) / 3)
    steps = res["by_category"]["step"]
    assert (steps["S1"]["accuracy"], steps["S2"]["accuracy"], steps["S3"]["accuracy"]) == (
        pytest.approx(3 / 7),
        0.5,
        1.0,
    )
    assert "WeMath four-dimensional metrics" in (out / "results.md").read_text()


def test_wemath_parquet_with_embedded_images(tmp_path):
    rows = [{**r, "image_path": {"bytes": png(), "path": r["image_path"]}} for r in wemath_rows()]
    write_parquet(tmp_path / "hf" / "testmini.parquet", rows)
    recs = benchmarks.load("wemath", tmp_path / "hf")
    assert len(recs) == 10 and isinstance(recs[0]["images"][0], bytes)


# ----------------------------------------------------------------------------------------------------- predictions
def test_predictions_mode_errors_and_missing_records(tmp_path):
    root = mathvista_release(tmp_path)
    out = tmp_path / "o"
    args = ["--benchmark", "mathvista", "--data", str(root), "--out_dir", str(out), "--predictions"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: field 'response'"):
        evaluate.main(args + [str(bad)])
    bad.write_text(json.dumps({"id": "99", "response": "x"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: field 'id': '99' is not a record"):
        evaluate.main(args + [str(bad)])
    res = evaluate.main(args + [str(write_preds(tmp_path / "p.jsonl", {"1": ONE.format("C")}))])["mathvista"]
    assert (res["n"], res["accuracy"], res["missing_predictions"]) == (4, 0.25, 3)  # missing ones count as wrong


def test_several_benchmarks_write_one_folder_each_and_a_summary(tmp_path):
    mv = mathvista_release(tmp_path)
    wm = tmp_path / "We-Math"
    for r in wemath_rows():
        png(wm / r["image_path"])
    (wm / "testmini.json").write_text(json.dumps(wemath_rows()))
    p1 = write_preds(tmp_path / "p1.jsonl", MATHVISTA_RESPONSES)
    p2 = write_preds(tmp_path / "p2.jsonl", {"2steps_1/2steps_1": ONE.format("B")})
    out = tmp_path / "many"
    evaluate.main(
        [
            "--benchmark",
            "mathvista,wemath",
            "--data",
            f"{mv},{wm}",
            "--predictions",
            f"{p1},{p2}",
            "--out_dir",
            str(out),
        ]
    )
    assert json.loads((out / "mathvista" / "results.json").read_text())["accuracy"] == 0.5
    assert json.loads((out / "wemath" / "results.json").read_text())["accuracy"] == 0.1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mathvista"]["first_accuracy"] == 0.5 and summary["wemath"]["n"] == 10
    assert "| mathvista | 4 | 50.0% |" in (out / "summary.md").read_text()


# ----------------------------------------------------------------------------------------------------- generation
def test_generation_resume_and_greedy_eval_count_the_same(tmp_path, tiny_dir):
    """A real (random, 0.2M) policy greedily answers 6 tiny-world records: evaluate.py and train_grpo.py's
    greedy_eval agree, and a rerun with the same --out_dir generates only what is missing."""
    import torch

    from nanosrpo import data, engine, model, prompts

    d = tmp_path / "world"
    synthetic.write_rl_split(d, "eval", 6, seed=2)
    base = [
        "--model",
        str(tiny_dir),
        "--data",
        str(d / "eval.jsonl"),
        "--out_dir",
        str(tmp_path / "ev"),
        "--max_new_tokens",
        "24",
        "--prompt",
        "srpo",
    ]
    first = evaluate.main(base + ["--limit", "4"])["jsonl"]
    assert first["n"] == 4 and first["resumed"] == 0 and first["mean_response_tokens"] > 0
    res = evaluate.main(base)["jsonl"]
    assert res["n"] == 6 and res["resumed"] == 4
    rows = [json.loads(line) for line in open(tmp_path / "ev" / "predictions.jsonl")]
    assert [r["id"] for r in rows] == [r["id"] for r in data.load_rl_records(d / "eval.jsonl")]

    policy, processor = model.load_policy(str(tiny_dir))
    records = data.load_rl_records(d / "eval.jsonl")
    torch.manual_seed(0)
    m = evaluation.greedy_eval(
        engine.TransformersEngine(policy, processor), records, prompts.SRPO_SYSTEM, processor, 24
    )
    assert set(evaluation.KEYS) <= {k[len("eval_") :] for k in m}
    for k in ("accuracy", "first_accuracy", "format_rate", "wrong_to_right", "mean_response_tokens"):
        assert m[f"eval_{k}"] == pytest.approx(res[k]), k
    # the prompt greedy_eval renders is data.render_prompt's, token for token
    assert (
        evaluation.render(benchmarks.from_rl_record(records[0]), prompts.SRPO_SYSTEM, processor)["ids"]
        == data.render_prompt(records[0], prompts.SRPO_SYSTEM, processor)["ids"]
    )


def test_bad_flags_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="unknown --benchmark"):
        evaluate.main(["--benchmark", "mathvista2"])
    with pytest.raises(SystemExit, match="one entry per --benchmark"):
        evaluate.main(["--benchmark", "mathvista,wemath", "--data", "a"])
    with pytest.raises(SystemExit, match="--temperature > 0"):
        evaluate.main(["--n_samples", "4"])


@pytest.mark.slow
def test_two_processes_shard_and_gather_like_one(tmp_path, tiny_dir):
    """accelerate launch with 2 CPU processes (gloo): records sharded, rows gathered back in order, the same greedy
    responses as one process."""
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT

    d = tmp_path / "world"
    synthetic.write_rl_split(d, "eval", 5, seed=2)  # odd: one rank gets one record fewer
    args = [
        "--model",
        str(tiny_dir),
        "--data",
        str(d / "eval.jsonl"),
        "--max_new_tokens",
        "16",
        "--gen_batch_size",
        "2",
    ]
    evaluate.main(args + ["--out_dir", str(tmp_path / "one")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "evaluate.py",
        *args,
        "--out_dir",
        str(tmp_path / "two"),
    ]
    p = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = ([json.loads(line) for line in open(tmp_path / k / "predictions.jsonl")] for k in ("one", "two"))
    assert [(r["id"], r["response"]) for r in two] == [(r["id"], r["response"]) for r in one]
    assert p.stdout.count("jsonl: n=5") == 1  # only the main process reports
