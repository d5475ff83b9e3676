"""The paper's benchmarks as their authors publish them: loaders and official scoring rules. No generation here.

    records = benchmarks.load("mathvista", "MathVista/data/testmini.json")   # or a folder, or a .parquet file
    ok = benchmarks.is_right("mathvista", records[0], "B")                    # an extracted answer, judged

Every loader returns records in one layout, a superset of the RL records of data.load_rl_records:
    {"id": the benchmark's own id (str), "question": text the policy reads (choices included, as the benchmark
     lays them out), "images": [path | bytes], "answer": gold, "choices": option texts used for scoring or None,
     "categories": {field: value | [values]} for the per-category table, "meta": what the scorer needs}
Two published layouts per benchmark: the GitHub release files (JSON / JSONL beside an images/ folder) and the
Hugging Face parquet files (images embedded as bytes). Both give the same records (a test checks it).

Scoring follows each benchmark's official script on the *extracted* answer (evaluation.extract_answers does the
extraction: last / first <answer> block, else the last \\boxed{}); where we differ, the function says why (README,
"Evaluation"). No GPT extractor or judge is ever called.
"""

import ast
import json
import math
import re
from pathlib import Path

from nanosrpo import rewards
from nanosrpo.data import LETTERS, DataError

BENCHMARKS = ("mathvista", "mathverse", "mathvision", "mmmu_pro", "mmmu_pro_vision", "wemath", "jsonl")
DEFAULT_SPLIT = {"mmmu_pro": "test", "mmmu_pro_vision": "test", "jsonl": "eval"}  # the others: testmini
MMMU_PRO_FOLDERS = {"mmmu_pro": "standard (10 options)", "mmmu_pro_vision": "vision"}  # HF repo subfolders
# MMMU-Pro vision puts question and options inside the screenshot: the text is only an instruction (ours).
MMMU_PRO_VISION_QUESTION = "Answer the multiple-choice question shown in the image with the letter of the correct option."


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
        raise DataError(f"{path}: found no {split}.json, {split}.jsonl or {split}-*.parquet for {benchmark} (README: Evaluation)")
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


def _image(value, where: str, name: str, folder: Path) -> list:
    """An image cell as a list of 0 or 1 image: a path (relative to the data file's folder) or embedded bytes
    (HF parquet stores an Image feature as {"bytes", "path"})."""
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
        "categories": {k: meta.get(k) if k in meta else row.get(k) for k in
                       ("question_type", "answer_type", "language", "source", "category", "task", "context", "grade", "skills")},
        "meta": {"question_type": qtype, "answer_type": _field(row, "answer_type", where), "precision": row.get("precision")},
    }


# An option line: "A:40°", "B. 60°", "(C) 120°", "(D): 140°"; group 1 or 2 is the letter, group 3 the text.
_CHOICE_LINE = re.compile(r"^\s*(?:\(([A-J])\)\s*[:.：]?|([A-J])\s*[:.：])\s*(.+?)\s*$")


def _choices_in_text(question: str) -> list[str] | None:
    """MathVerse writes the options into the question ('Choices:\\nA:40°\\nB:60°'): the option texts, in order."""
    m = re.search(r"Choices?\s*:", question)
    if not m:
        return None
    out = []
    for line in question[m.end():].splitlines():
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
        "categories": {"problem_version": row.get("problem_version"), "subject": meta.get("subject"),
                       "subfield": meta.get("subfield")},
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


LOADERS = {"mathvista": _mathvista, "mathverse": _mathverse, "mathvision": _mathvision, "mmmu_pro": _mmmu_pro,
           "mmmu_pro_vision": _mmmu_pro, "wemath": _wemath}


def from_rl_record(rec: dict) -> dict:
    """An RL/eval record (data.load_rl_records) in the benchmark layout: the project's own 'jsonl' benchmark."""
    from nanosrpo.data import question_text

    return {**rec, "question": question_text(rec), "categories": {}, "meta": {}}


def load(benchmark: str, path: str | Path, split: str = "", image_dir: str | None = None) -> list[dict]:
    """Read a benchmark from local files (never downloads): records in the layout of this module's docstring."""
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if benchmark == "jsonl":
        from nanosrpo.data import load_rl_records

        return [from_rl_record(r) for r in load_rl_records(find_files(benchmark, path, split)[0], image_dir)]
    records, seen = [], set()
    for file in find_files(benchmark, path, split):
        folder = Path(image_dir) if image_dir else file.parent
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
def by_value(answer: str | None, gold, choices=None) -> bool:
    """rewards.is_correct (choice letters, choice texts, math-verify on values); a gold it cannot parse ('Yes',
    '(2, 3]' written oddly) is compared as a normalised string instead of failing the whole run."""
    try:
        return rewards.is_correct(answer, gold, choices)
    except ValueError:  # the gold, not the answer (an answer that does not parse is simply wrong)
        return isinstance(answer, str) and _norm(answer) == _norm(str(gold))


def _norm(s: str) -> str:
    return " ".join(s.casefold().split()).rstrip(".")


_PAREN_LETTER = re.compile(r"\(([a-zA-Z])\)")
_BARE_LETTER = re.compile(r"([A-Za-z])[.:)]?")


def _number(s: str) -> float | None:
    """float(s), or the one number in s ('5 cm', '1,000'); None when there is none or more than one."""
    s = s.replace(",", "").strip()
    try:
        return float(s)
    except ValueError:
        nums = re.findall(r"-?\d+(?:\.\d+)?", s)
        return float(nums[0]) if len(nums) == 1 else None


def mathvista_normalize(answer: str, choices, question_type: str, answer_type: str, precision):
    """MathVista's `normalize_extracted_answer` (evaluation/calculate_score.py) on our extracted answer.

    Differences, on purpose: (1) a bare letter may carry a '.', ':' or ')' ("B." -> B), as our format asks for
    letters in any of those shapes; (2) an answer that is neither a letter nor a choice's text maps to no choice
    (None): the official script maps it to the *most similar* choice by edit distance, which would give a response
    with no usable answer a 1-in-k chance of being right; (3) integer/float answers may carry a unit or thousands
    separators ('5 cm', '1,000'), which the official GPT extractor strips before this step and we have no GPT."""
    answer = answer.strip()
    if question_type == "multi_choice":
        m = _PAREN_LETTER.search(answer) or _BARE_LETTER.fullmatch(answer)
        if m and ord(m.group(1).upper()) - ord("A") < len(choices):
            return choices[ord(m.group(1).upper()) - ord("A")]
        return next((c for c in choices if _norm(c) == _norm(answer)), None)
    if answer_type in ("integer", "float"):
        x = _number(answer)
        if x is None or not math.isfinite(x):
            return None
        if answer_type == "integer":
            return str(int(x))
        p = None if precision is None or precision != precision else int(precision)  # NaN from parquet = none
        return str(round(x, p))
    return answer  # 'list' and 'text': the string itself


def is_right(benchmark: str, rec: dict, answer: str | None) -> bool:
    """Is this extracted answer right for this record, by the benchmark's rule? None (no answer) is wrong."""
    if answer is None or not answer.strip():
        return False
    if benchmark == "mathvista":
        m = rec["meta"]
        pred = mathvista_normalize(answer, rec["choices"], m["question_type"], m["answer_type"], m["precision"])
        return pred is not None and pred == rec["answer"]  # official safe_equal: exact equality
    # MATH-Vision, MMMU-Pro, WeMath, MathVerse multiple choice: the letter (or an option's text) against the gold
    # letter; free-form answers (MATH-Vision, MathVerse, jsonl) by value.
    return by_value(answer, rec["answer"], rec["choices"])


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
