"""The paper's benchmarks as their authors publish them: loaders and official scoring rules. No generation here.

    records = benchmarks.load("mathvista", "MathVista/data/testmini.json")   # or a folder, or a .parquet file
    ok = benchmarks.is_right("mathvista", records[0], "B")                    # an extracted answer, judged
    ok, guessed = benchmarks.judge("mathvista", records[0], "banana")         # official verdict, reached by a guess?

Every loader returns records in one layout, a superset of the RL records of data.load_rl_records:
    {"id": the benchmark's own id (str), "question": text the policy reads (choices included, as the benchmark
     lays them out), "images": [path | bytes], "answer": gold, "choices": option texts used for scoring or None,
     "categories": {field: value | [values]} for the per-category table, "meta": what the scorer needs}
Two published layouts per benchmark: the GitHub release files (JSON / JSONL beside an images/ folder) and the
Hugging Face parquet files (images embedded as bytes). Both give the same records (a test checks it).

Scoring is each benchmark's official rule-based scoring, as its own script computes it, on the *extracted* answer
(evaluation.extract_answers: last / first <answer> block, else the last \\boxed{}); each function names the script
it reproduces and says where it cannot. judge() also says when the official rule guessed (MathVista's most-similar
choice, MMMU-Pro's random letter): evaluate.py's strict figure gives those no credit. No GPT extractor or judge is
ever called.
"""

import ast
import json
import math
import operator
import random
import re
import zlib
from pathlib import Path

from nanosrpo import rewards
from nanosrpo.data import LETTERS, DataError

BENCHMARKS = ("mathvista", "mathverse", "mathvision", "mmmu_pro", "mmmu_pro_vision", "wemath", "jsonl")
DEFAULT_SPLIT = {"mmmu_pro": "test", "mmmu_pro_vision": "test", "jsonl": "eval"}  # the others: testmini
MMMU_PRO_FOLDERS = {"mmmu_pro": "standard (10 options)", "mmmu_pro_vision": "vision"}  # HF repo subfolders
# MMMU-Pro vision puts question and options inside the screenshot: the text is only an instruction (ours).
MMMU_PRO_VISION_QUESTION = (
    "Answer the multiple-choice question shown in the image with the letter of the correct option."
)


# ----------------------------------------------------------------------------------------------------- reading files
def find_files(benchmark: str, path: str | Path, split: str = "") -> list[Path]:
    """The files to read for --data: the file itself, or in a folder the split's release file (`testmini.json`,
    `test.jsonl`, ...) or its parquet shards (`testmini-00000-of-00001-*.parquet`, searched recursively)."""
    path, split = Path(path), split or DEFAULT_SPLIT.get(benchmark, "testmini")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    for name in (f"{split}.json", f"{split}.jsonl"):
        if (path / name).is_file():
            return [path / name]
    shards = sorted(p for p in path.rglob("*.parquet") if p.stem == split or p.name.startswith(f"{split}-"))
    if benchmark in MMMU_PRO_FOLDERS and len({p.parent for p in shards}) > 1:  # the HF repo root: pick the setting
        shards = [p for p in shards if p.parent.name == MMMU_PRO_FOLDERS[benchmark]]
    if not shards:
        raise DataError(
            f"{path}: found no {split}.json, {split}.jsonl or {split}-*.parquet for {benchmark} (README: Evaluation)"
        )
    return shards


def read_rows(path: Path):
    """(where, row) for every record of a .json (list, or dict keyed by id), .jsonl or .parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # optional dependency: only the parquet layouts need it

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}: row {i}", row
    elif path.suffix == ".jsonl":
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{lineno}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        items = rows.items() if isinstance(rows, dict) else enumerate(rows)  # MathVista: a dict keyed by pid
        for key, row in items:
            yield f"{path}: record {key}", row
    else:
        raise DataError(f"{path}: expected a .json, .jsonl or .parquet file")


def _field(row, name: str, where: str, optional: bool = False):
    """row[name], or a DataError naming the record and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be an object, got {type(row).__name__}")
    value = row.get(name)
    if value is None and not optional:
        raise DataError(f"{where}: field '{name}' is missing")
    return value


def _image(value, where: str, name: str, folder: Path | None) -> list:
    """An image cell as a list of 0 or 1 image: a path (relative to the data file's folder) or embedded bytes
    (HF parquet stores an Image feature as {"bytes", "path"}). folder None: images are not needed (re-scoring), the
    path is kept as written and not looked for."""
    if value is None or value == "":
        return []
    if isinstance(value, dict):
        if value.get("bytes"):
            return [value["bytes"]]
        value = value.get("path")
        if not value:
            return []
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be an image path or an embedded image")
    if folder is None:
        return [value]
    p = Path(value) if Path(value).is_absolute() else folder / value
    if not p.is_file():
        raise DataError(f"{where}: field '{name}': image file not found: {p}")
    return [str(p)]


def lettered(choices: list[str]) -> str:
    """'A. first\\nB. second' (data.question_text's layout)."""
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


# ----------------------------------------------------------------------------------------------------- one loader each
def _mathvista(row, where, folder):
    pid = str(_field(row, "pid", where))
    where = f"{where} (pid {pid})"
    qtype = _field(row, "question_type", where)
    choices = _field(row, "choices", where, optional=True)
    choices = [str(c) for c in choices] if choices is not None and len(choices) else None
    if qtype == "multi_choice" and not choices:
        raise DataError(f"{where}: field 'choices' is missing (question_type is multi_choice)")
    question = str(_field(row, "question", where))
    meta = row.get("metadata") or {}
    image = row.get("decoded_image") or _field(row, "image", where)  # parquet: decoded_image holds the bytes
    return {
        "id": pid,
        "question": question + (f"\nChoices:\n{lettered(choices)}" if choices else ""),
        "images": _image(image, where, "image", folder),
        "answer": str(_field(row, "answer", where)),
        "choices": choices,
        "categories": {
            k: meta.get(k) if k in meta else row.get(k)
            for k in (
                "question_type",
                "answer_type",
                "language",
                "source",
                "category",
                "task",
                "context",
                "grade",
                "skills",
            )
        },
        "meta": {
            "question_type": qtype,
            "answer_type": _field(row, "answer_type", where),
            "precision": row.get("precision"),
        },
    }


# An option line: "A:40°", "B. 60°", "(C) 120°", "(D): 140°"; group 1 or 2 is the letter, group 3 the text.
_CHOICE_LINE = re.compile(r"^\s*(?:\(([A-J])\)\s*[:.：]?|([A-J])\s*[:.：])\s*(.+?)\s*$")


def _choices_in_text(question: str) -> list[str] | None:
    """MathVerse writes the options into the question ('Choices:\\nA:40°\\nB:60°'): the option texts, in order."""
    m = re.search(r"Choices?\s*:", question)
    if not m:
        return None
    out = []
    for line in question[m.end() :].splitlines():
        if not line.strip():
            continue
        c = _CHOICE_LINE.match(line)
        if not c or (c.group(1) or c.group(2)) != LETTERS[len(out)]:
            break
        out.append(c.group(3))
    return out or None


def _mathverse(row, where, folder):
    sid = str(_field(row, "sample_index", where))
    where = f"{where} (sample_index {sid})"
    question = str(_field(row, "question", where))
    meta = row.get("metadata") or {}
    qtype = _field(row, "question_type", where)
    return {
        "id": sid,
        "question": question,
        "images": _image(row.get("image"), where, "image", folder),  # 'Text Only' problems may have none
        "answer": str(_field(row, "answer", where)),
        "choices": _choices_in_text(question) if qtype == "multi-choice" else None,
        "categories": {
            "problem_version": row.get("problem_version"),
            "subject": meta.get("subject"),
            "subfield": meta.get("subfield"),
        },
        "meta": {"question_type": qtype},
    }


def _mathvision(row, where, folder):
    rid = str(_field(row, "id", where))
    where = f"{where} (id {rid})"
    options = [str(o) for o in (row.get("options") or [])] or None
    image = row.get("decoded_image") or _field(row, "image", where)
    return {
        "id": rid,
        "question": str(_field(row, "question", where)) + (f"\nChoices:\n{lettered(options)}" if options else ""),
        "images": _image(image, where, "image", folder),
        "answer": str(_field(row, "answer", where)),
        "choices": options,
        "categories": {"subject": row.get("subject"), "level": row.get("level")},
        "meta": {},
    }


def _options_list(value, where: str) -> list[str]:
    """MMMU-Pro stores options as the string form of a Python list: "['0.5', '1']"."""
    if isinstance(value, list):
        return [str(v) for v in value]
    try:
        out = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        out = None
    if not isinstance(out, list) or not out or len(out) > 10:
        raise DataError(f"{where}: field 'options' must be a list of 1 to 10 options, got {str(value)[:80]!r}")
    return [str(v) for v in out]


def _mmmu_pro(row, where, folder):
    rid = str(_field(row, "id", where))
    where = f"{where} (id {rid})"
    options = _options_list(_field(row, "options", where), where)
    vision = "question" not in row  # the vision setting: one screenshot holds question and options
    if vision:
        question, images = MMMU_PRO_VISION_QUESTION, _image(_field(row, "image", where), where, "image", folder)
    else:
        question = f"{_field(row, 'question', where)}\nChoices:\n{lettered(options)}"
        images = [im for k in range(1, 8) for im in _image(row.get(f"image_{k}"), where, f"image_{k}", folder)]
    return {
        "id": rid,
        "question": question,
        "images": images,
        "answer": str(_field(row, "answer", where)).strip(),
        "choices": options,
        "categories": {"subject": row.get("subject"), "setting": "vision" if vision else "standard"},
        "meta": {},
    }


def _wemath_options(value: str) -> list[str]:
    """'A. 200.96;B. 3215.36; E. No correct answer' -> ['200.96', '3215.36', ..., 'No correct answer']."""
    return [m.group(3) for part in str(value).split(";") if (m := _CHOICE_LINE.match(part))]


def _wemath(row, where, folder):
    gid, key = str(_field(row, "ID", where)), str(_field(row, "key", where))
    where = f"{where} (ID {gid}, key {key})"
    option = str(_field(row, "option", where))
    steps, _, part = key.partition("_")  # 2steps_1, 2steps_2, 2steps_multi, 3steps_1, ...
    step = {"2steps": "S2", "3steps": "S3"}.get(steps, steps) if part == "multi" else "S1"  # official step accuracies
    image = row.get("image_path") if row.get("image_path") is not None else row.get("image")
    return {
        # ID names a problem *group*: its one-step sub-problems and the composite share it; key tells them apart
        "id": f"{gid}/{key}",
        "question": f"{_field(row, 'question', where)}\nOptions: {option}",
        "images": _image(image, where, "image_path", folder),
        "answer": str(_field(row, "answer", where)).strip(),
        "choices": _wemath_options(option) or None,
        "categories": {"knowledge concept": row.get("knowledge concept"), "step": step},
        "meta": {"ID": gid, "key": key},
    }


LOADERS = {
    "mathvista": _mathvista,
    "mathverse": _mathverse,
    "mathvision": _mathvision,
    "mmmu_pro": _mmmu_pro,
    "mmmu_pro_vision": _mmmu_pro,
    "wemath": _wemath,
}


def from_rl_record(rec: dict) -> dict:
    """An RL/eval record (data.load_rl_records) in the benchmark layout: the project's own 'jsonl' benchmark."""
    from nanosrpo.data import question_text

    return {**rec, "question": question_text(rec), "categories": {}, "meta": {}}


def load(
    benchmark: str, path: str | Path, split: str = "", image_dir: str | None = None, images: bool = True
) -> list[dict]:
    """Read a benchmark from local files (never downloads): records in the layout of this module's docstring.
    images=False (re-scoring responses): image files are neither needed nor looked for."""
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if benchmark == "jsonl":
        from nanosrpo.data import load_rl_records

        return [from_rl_record(r) for r in load_rl_records(find_files(benchmark, path, split)[0], image_dir)]
    records, seen = [], set()
    for file in find_files(benchmark, path, split):
        folder = None if not images else Path(image_dir) if image_dir else file.parent
        for where, row in read_rows(file):
            rec = LOADERS[benchmark](row, where, folder)
            if rec["id"] in seen:
                raise DataError(f"{where}: duplicate id {rec['id']!r}")
            seen.add(rec["id"])
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


# ----------------------------------------------------------------------------------------------------- scoring
# Each benchmark's official rule-based scoring, as its own script computes it, applied to our extracted answer (the
# official pipelines apply it to a GPT extraction or to the whole response). judge() returns (right, guessed):
# `right` is the official verdict (results.json's accuracy); `guessed` marks a verdict the official rule reached by
# guessing (MathVista's most-similar choice, MMMU-Pro's random letter), which the strict figure gives no credit.
def judge(benchmark: str, rec: dict, answer: str | None) -> tuple[bool, bool]:
    """(official verdict, guessed) for one extracted answer; None (no answer) is scored as the empty answer."""
    answer = stated_letter(answer or "", rec["choices"]) if benchmark in ("mathvista", "mathverse") else answer or ""
    if benchmark == "mathvista":
        m = rec["meta"]
        pred, guessed = mathvista_normalize(
            answer, rec["choices"], m["question_type"], m["answer_type"], m["precision"]
        )
        return pred is not None and pred == rec["answer"], guessed  # official safe_equal: exact equality
    if benchmark in ("mmmu_pro", "mmmu_pro_vision"):
        letter, guessed = mmmu_pro_parse(answer, rec["choices"], rec["id"])
        return letter == rec["answer"], guessed
    if benchmark == "mathvision":
        return mathvision_is_right(answer, rec["answer"], rec["choices"]), False
    if benchmark == "mathverse":  # score_answer_s2.py's rule-based part (--quick_match): exact string equality
        return answer == rec["answer"], False
    if benchmark == "wemath":
        return wemath_letter(answer) == rec["answer"], False
    return bool(answer.strip()) and by_value(answer, rec["answer"], rec["choices"]), False  # jsonl: by value


def stated_letter(answer: str, choices) -> str:
    """The letter a sentence names ("The answer is B.", "Answer: (B)"), for multiple choice with lettered options;
    else the answer unchanged. The official MathVista and MathVerse pipelines score a GPT extractor's answer, which
    reduces such a sentence to its letter; our extraction stands in for it (rewards.named_letter, the reward's own
    reading). A bare letter, an option's own text and anything naming no single letter in range stay as they are."""
    if not choices or answer.strip() in choices:
        return answer
    letter = rewards.named_letter(answer)
    return letter if letter and letter in LETTERS[: len(choices)] else answer


def is_right(benchmark: str, rec: dict, answer: str | None) -> bool:
    """The official verdict on this extracted answer (judge's first half)."""
    return judge(benchmark, rec, answer)[0]


def by_value(answer: str | None, gold, choices=None) -> bool:
    """rewards.is_correct (choice letters, choice texts, math-verify on values); a gold it cannot parse ('Yes',
    '(2, 3]' written oddly) is compared as a normalised string instead of failing the whole run."""
    try:
        return rewards.is_correct(answer, gold, choices)
    except ValueError:  # the gold, not the answer (an answer that does not parse is simply wrong)
        return isinstance(answer, str) and _norm(answer) == _norm(str(gold))


def _norm(s: str) -> str:
    return " ".join(s.casefold().split()).rstrip(".")


# --- MathVista (evaluation/calculate_score.py)
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character, each cost 1): python-Levenshtein's."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def mathvista_normalize(answer: str, choices, question_type: str, answer_type: str, precision):
    """MathVista's `normalize_extracted_answer`: (prediction, guessed), the prediction compared with `answer` by ==.

    multi_choice: the answer stripped; the letter of the first '(X)' in it, if any; a letter among the options maps
    to its choice's text; anything else maps to the most similar choice by edit distance (the first of the closest;
    a guess, unless the answer is that choice's text or its value). integer: str(int(float(x))); float:
    str(round(float(x), precision)); a value float() cannot read is None (wrong). list and text: the string itself."""
    if question_type == "multi_choice":
        answer = answer.strip()
        letters = re.findall(r"\(([a-zA-Z])\)", answer)
        if letters:
            answer = letters[0].upper()
        options = list(LETTERS[: len(choices)])
        if answer in options:
            return choices[options.index(answer)], False
        distances = [levenshtein(answer, c) for c in choices]
        best = choices[distances.index(min(distances))]
        return best, best != answer and not by_value(answer, best)  # '92.5' for '92.5°' names it; '8' for '18.79' not
    if answer_type in ("integer", "float"):
        try:
            x = float(answer)
            if answer_type == "integer":
                return str(int(x)), False
            p = None if precision is None or precision != precision else int(precision)  # NaN from parquet = none
            return str(round(x, p)), False
        except (ValueError, OverflowError):  # int(inf), int(nan): the official try/except gives None
            return None, False
    return answer, False  # 'list' and 'text': the string itself


# --- MMMU-Pro (mmmu-pro/evaluate.py)
def mmmu_pro_parse(response: str, options: list[str], rid: str) -> tuple[str, bool]:
    """MMMU-Pro's `parse_multi_choice_response`: (letter, guessed).

    The one letter named after the last 'Answer:'; else, the response stripped of ,.!?;:' at its ends and padded
    with spaces, the letters written '(X)', else 'X ', else 'X.', else (over 5 words) the options whose text it
    contains; the last one named wins (ties: the first). None found: the official script picks a letter at random;
    we seed that pick with the record's id (the same letter on every run) and flag it as guessed."""
    letters = list(LETTERS[: len(options)])
    at = response.rfind("Answer:")
    if at != -1:
        named = [c for c in letters if c in response[at + len("Answer:") :].strip()]
        if len(named) == 1:
            return named[0], False
    for ch in ",.!?;:'":
        response = response.strip(ch)
    response = f" {response} "
    by_letter = True
    found = [c for c in letters if f"({c})" in response]
    bracketed = bool(found)
    found = found or [c for c in letters if f"{c} " in response] or [c for c in letters if f"{c}." in response]
    if not found and len(response.split()) > 5:
        found, by_letter = [c for c, o in zip(letters, options) if o.lower() in response.lower()], False
    if not found:
        return random.Random(zlib.crc32(str(rid).encode())).choice(letters), True
    if len(found) == 1:
        return found[0], False
    if not by_letter:
        where = [response.lower().rfind(options[letters.index(c)].lower()) for c in found]
    else:
        where = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in found]
    return found[where.index(max(where))], False


# --- WeMath (evaluation/four_dimensional_metrics.py, load_and_process_data)
def wemath_letter(response: str) -> str | None:
    """WeMath's answer: the text after the last 'Answer', stripped, without '<', '>', ':' and '.', its first
    character if that is one of A-H, else None."""
    s = re.sub(r"[<>:.]", "", response.split("Answer")[-1].strip()).strip()
    return s[0] if s and s[0] in "ABCDEFGH" else None


# --- MATH-Vision (evaluation/evaluate.py, evaluation/utils.py)
MATHVISION_FLAGS = ("the final answer is", "the answer is", "the correct answer is", "the answer should be")


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def mathvision_clean(response: str) -> str:
    """MATH-Vision's `model_answer` from a response (evaluate.py's loop, then find_math_answer and its clean-ups)."""
    s = response.strip()
    for c in "ABCDE":  # a letter at the end (' C.', ' (C).') or alone on the first line
        if s.endswith((f" {c}.", f" ({c}).")) or s.startswith((f"{c}\n", f"({c})\n", f"({c}) {c}\n")):
            s = c
    tail = s.split("is ")[-1].rstrip(".")
    if _is_float(tail):
        s = tail
    if "oxed{" not in s:
        for flag in MATHVISION_FLAGS:
            for f in (flag, flag.replace("the", "The")):
                had = f in s
                s = s.split(f)[-1].strip()
                if had:  # the rest of that line's sentence
                    s = s.split("\n")[0].split(". ")[0]
    elif s.count("oxed{") > 1:
        s = "\\boxed{" + s.split("oxed{")[-1]
    s = _mathvision_find_answer(s)
    for c in "abcde":
        s = s.replace(f"({c})", c)
    for c in "abcde":
        s = s.replace("{" + c + "}", c)
    return s.rstrip(".").lstrip(":").strip()


# find_math_answer's clean-ups, in its order
_MATHVISION_CLEAN = (
    (" ", ""),
    ("\\,", ""),
    ("∞", "\\infty"),
    ("+\\infty", "\\infty"),
    ("\\\\", "\\"),
    ("\n", ""),
    ("\\text", ""),
    ("\\mbox", ""),
    ("bmatrix", "pmatrix"),
    ("\\left", ""),
    ("\\right", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("{m}^3", ""),
    ("m^3", ""),
    ("{units}", ""),
    ("units", ""),
    ("{km}", ""),
    ("km", ""),
)


def _mathvision_find_answer(s: str) -> str:
    """utils.find_math_answer: lower-cased; inside the boxed braces (greedy: first 'oxed{' to the last '}'); the
    part before an unmatched '}'; after the last '=' and '\\approx'; spaces, \\text, \\left, degrees, units off."""
    s = s.lower().replace("{}", "")
    boxed = re.findall(r"oxed{(.*)}", s, flags=re.S)
    ans = boxed[-1] if boxed else s
    if "}" in ans and ("{" not in ans or ans.find("}") < ans.find("{")):
        ans = ans.split("}")[0]
    ans = ans.split("=")[-1].split("\\approx")[-1]
    for old, new in _MATHVISION_CLEAN:
        ans = ans.replace(old, new)
    return _mathvision_strip(ans)


def _mathvision_strip(s: str) -> str:
    """utils._strip_string: the MATH dataset's answer normalisation, as MATH-Vision has it (fractions written
    a/b become \\frac{a}{b}; '0.5' becomes \\frac{1}{2}; its \\frac fix runs only when 'sqrt' is present)."""
    for old, new in (
        ("\n", ""),
        ("\\!", ""),
        ("\\\\", "\\"),
        ("tfrac", "frac"),
        ("dfrac", "frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\$", ""),
        ("$", ""),
    ):
        s = s.replace(old, new)
    s = s.split("\\text{ ")[0].replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2:
        s = s.split("=")[-1]
    if len(s.split("\\approx")) == 2:
        s = s.split("\\approx")[-1]
    if "sqrt" in s:
        s = _fix_sqrt(s)
    s = s.replace(" ", "")
    if "sqrt" in s:
        s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def _fix_sqrt(s: str) -> str:
    """'\\sqrt3' -> '\\sqrt{3}' (one character)."""
    head, *parts = s.split("\\sqrt")
    return head + "".join("\\sqrt{" + p[0] + "}" + p[1:] if p and p[0] != "{" else "\\sqrt" + p for p in parts)


def _fix_fracs(s: str) -> str:
    """'\\frac12' -> '\\frac{1}{2}', '\\frac1{2}' -> '\\frac{1}{2}'; a '\\frac' with under 2 characters after it
    leaves the whole string as it was."""
    head, *parts = s.split("\\frac")
    out = head
    for p in parts:
        out += "\\frac"
        if p.startswith("{"):
            out += p
        elif len(p) < 2:
            return s
        elif p[1] != "{":
            out += "{" + p[0] + "}{" + p[1] + "}" + p[2:]
        else:
            out += "{" + p[0] + "}" + p[1:]
    return out


def _fix_a_slash_b(s: str) -> str:
    """'3/4' -> '\\frac{3}{4}' when both sides are integers written plainly."""
    if len(s.split("/")) != 2:
        return s
    a, b = s.split("/")
    try:
        if s == f"{int(a)}/{int(b)}":
            return "\\frac{" + str(int(a)) + "}{" + str(int(b)) + "}"
    except ValueError:
        pass
    return s


def mathvision_is_right(answer: str, gold: str, options) -> bool:
    """MATH-Vision's verdict: is_equal(gold letter or value, cleaned answer) or is_equal(gold option's text, ...)."""
    model = mathvision_clean(answer)
    k = ord(gold) - ord("A") if len(gold) == 1 else -1
    gold_text = options[k] if options and 0 <= k < len(options) else ""  # the official script indexes options so
    return mathvision_is_equal(gold, model) or mathvision_is_equal(gold_text, model)


def mathvision_is_equal(a: str, b: str) -> bool:
    """utils.is_equal: case-insensitive; empty is never equal; equal strings; equal after evaluating tuple / list
    elements; else the two values (LaTeX evaluated, rounded to 2 decimals) equal."""
    a, b = a.lower(), b.lower()
    if not a.replace(" ", "") or not b.replace(" ", ""):
        return False
    if a.strip() == b.strip():
        return True
    a, b = _eval_tuple(a), _eval_tuple(b)
    if a == b:
        return True
    try:
        return round(latex_value(a), 2) == round(latex_value(b), 2)
    except Exception:  # noqa: BLE001 -- as the official: anything that does not evaluate is not equal
        return False


def _eval_tuple(s: str) -> str:
    """utils.eval_tuple: '(2*3, 5+2)' -> '(6,7)': each element's value rounded to 2 decimals (elements containing
    'infty', 'a' and '-a' kept); anything that fails leaves s unchanged."""
    parts = s[1:-1].split(",")
    if len(parts) < 2 or (s[0], s[-1]) not in (("(", ")"), ("[", "]")):
        return s
    try:
        inner = ",".join(p if "infty" in p or p in ("a", "-a") else str(round(latex_value(p), 2)) for p in parts)
    except Exception:  # noqa: BLE001
        return s
    return s[0] + inner + s[-1]


def latex_value(s: str):
    """MATH-Vision's eval(str(latex2sympy(s))), without the latex2sympy2 package (its antlr4 pin conflicts with
    math-verify's): latex2sympy2_extended parses, and the printed expression is evaluated with Python's numbers and
    the math module's names only, as the official eval in a `from math import *` namespace does (so E, I, oo, x, ...
    do not evaluate). A comma (the official parser reads '1,000' as a list) does not evaluate either, and a number
    before \\frac multiplies it, as latex2sympy2 reads it ('2\\frac{1}{2}' is 1; the extended parser says 5/2)."""
    from latex2sympy2_extended import NormalizationConfig, latex2sympy
    from latex2sympy2_extended.latex2sympy2 import ConversionConfig

    if "," in s:
        raise ValueError("a list has no value")
    s = re.sub(r"(\d)\s*\\frac", r"\1\\cdot\\frac", s)
    expr = latex2sympy(
        s,
        normalization_config=NormalizationConfig(False, False, False, False, "none", False),
        conversion_config=ConversionConfig(False, False, False, False),
    )
    return _eval_printed(ast.parse(str(expr), mode="eval").body)


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.FloorDiv: operator.floordiv,
}


def _eval_printed(node):
    """Evaluate a printed sympy expression: numbers, + - * / % // **, and the math module's constants and functions
    (a safe subset of the official eval). A huge integer power is refused rather than computed."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_printed(node.operand)
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval_printed(node.left), _eval_printed(node.right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exp = _eval_printed(node.left), _eval_printed(node.right)
        if isinstance(exp, int) and abs(exp) > 4096 and abs(base) > 1:
            raise OverflowError("power too large")
        return base**exp
    if isinstance(node, ast.Name) and isinstance(getattr(math, node.id, None), float):
        return getattr(math, node.id)  # pi, e, tau, inf, nan
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        fn = getattr(math, node.func.id, None) if not node.func.id.startswith("_") else None
        fn = fn or {"abs": abs, "round": round, "min": min, "max": max, "pow": pow}.get(node.func.id)
        if callable(fn):
            return fn(*[_eval_printed(a) for a in node.args])
    raise ValueError(f"cannot evaluate {ast.dump(node)[:40]}")


# ----------------------------------------------------------------------------------------------------- WeMath metrics
def wemath_four_dimensional(records: list[dict], right: dict[str, bool]) -> dict:
    """We-Math's four-dimensional metrics (evaluation/four_dimensional_metrics.py), from per-record verdicts.

    A problem group (one ID) is n one-step sub-problems (key `{n}steps_1..n`) and their composite (`{n}steps_multi`):
      IK  insufficient knowledge:     some sub-problem wrong, composite wrong
      IG  inadequate generalisation:  all sub-problems right,  composite wrong
      CM  complete mastery:           strict: all sub-problems right, composite right; loose: any sub right
      RM  rote memorisation:          strict: some sub-problem wrong, composite right; loose: all subs wrong
    IK, IG, CM are fractions of the groups, RM of the groups whose composite is right (RM / (CM + RM)), and
    score = (groups - 0.5 IG - RM - IK) / groups, strict and loose. The official script divides by a fixed 525 (the
    testmini's 2- and 3-step groups); we divide by the complete groups present, so a subset scores sensibly and the
    full testmini gives the same numbers. Incomplete groups (a member missing) are skipped, as the official merge
    leaves their verdicts NaN, which matches none of the four conditions."""
    groups: dict[str, dict[str, bool]] = {}
    for rec in records:
        groups.setdefault(rec["meta"]["ID"], {})[rec["meta"]["key"]] = right.get(rec["id"], False)
    counts = dict.fromkeys(("IK", "IG", "CM_strict", "CM_loose", "RM_strict", "RM_loose"), 0)
    n = 0
    for members in groups.values():
        steps = next((k.split("_")[0] for k in members if k.endswith("_multi")), None)
        if steps not in ("2steps", "3steps"):
            continue
        subs = [members.get(f"{steps}_{i}") for i in range(1, int(steps[0]) + 1)]
        if None in subs:
            continue
        n += 1
        multi, all_sub, any_sub = members[f"{steps}_multi"], all(subs), any(subs)
        counts["IK"] += not all_sub and not multi
        counts["IG"] += all_sub and not multi
        counts["CM_strict"] += all_sub and multi
        counts["CM_loose"] += any_sub and multi
        counts["RM_strict"] += not all_sub and multi
        counts["RM_loose"] += not any_sub and multi
    if n == 0:
        return {"groups": 0}
    out = {"groups": n, "IK": counts["IK"] / n, "IG": counts["IG"] / n}
    for mode in ("strict", "loose"):
        cm, rm = counts[f"CM_{mode}"], counts[f"RM_{mode}"]
        out[f"CM_{mode}"] = cm / n
        out[f"RM_{mode}"] = rm / (cm + rm) if cm + rm else 0.0
        out[f"score_{mode}"] = (n - 0.5 * counts["IG"] - rm - counts["IK"]) / n
    return out
