"""The tiny world's task: count coloured cells in a grid image.

Why this task: the answer needs the image (the question names a colour, only the picture says where it is), the grid
is aligned to Qwen2.5-VL's vision tokens (one 28x28 cell = one 14px patch merged 2x2 = one image token, and M-RoPE
gives that token its row and column), and a chain of thought that counts row by row makes natural, plausible
mistakes (one row miscounted by one) that a second look can fix. Everything is deterministic from a seed.

A one-round chain of thought looks like
  <think>count red. row 1: 2, total 2. row 2: 0, total 2. row 3: 1, total 3.</think> <answer>3</answer>
and the oracle teacher's reflection names the first wrong row, or confirms the count.

Records are written in the project's real on-disk formats (JSONL + PNG files), see write_rl_split / write_sft_split.
"""

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

CELL = 28  # pixels per cell = patch_size (14) * spatial_merge_size (2): one cell, one image token
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
EMPTY = "."
BACKGROUND = (245, 245, 245)

# difficulty -> (grid side, how many colours are counted together, whether the colour varies with the question).
# Levels 0-1 always ask for red: a ~1M-parameter model learns to read the image row by row within minutes, but
# learning to also copy a colour named in the question (a content-based "induction" lookup) takes it far longer.
LEVELS = {0: (3, 1, False), 1: (4, 1, False), 2: (4, 1, True), 3: (5, 2, True)}


@dataclass
class Problem:
    id: str
    grid: list[list[str]]  # colour name or EMPTY per cell, row-major
    targets: list[str]  # the colours to count
    question: str
    answer: str

    def row_counts(self) -> list[int]:
        return [sum(cell in self.targets for cell in row) for row in self.grid]


def make_problem(seed: int, difficulty: int = 1, idx: int = 0, p_empty: float = 0.4) -> Problem:
    """One problem, fully determined by (seed, difficulty, idx)."""
    rng = random.Random(f"nanosrpo-{seed}-{difficulty}-{idx}")
    n, k, vary = LEVELS[difficulty]
    names = list(COLORS)
    grid = [[EMPTY if rng.random() < p_empty else rng.choice(names) for _ in range(n)] for _ in range(n)]
    targets = sorted(rng.sample(names, k), key=names.index) if vary else names[:k]
    what = " and ".join(targets)
    question = f"How many {what} cells are in the grid?"
    prob = Problem(id=f"grid-d{difficulty}-s{seed}-{idx:06d}", grid=grid, targets=targets, question=question, answer="")
    prob.answer = str(sum(prob.row_counts()))
    return prob


_ID = re.compile(r"grid-d(\d+)-s(\d+)-(\d+)")


def problem_from_id(rid: str) -> Problem | None:
    """The Problem behind a record id written by write_rl_split ("grid-d1-s1-000042"), or None for another id.

    The oracle teacher (nanosrpo/teacher.py) needs the grid itself, and every problem is a pure function of its id.
    """
    m = _ID.fullmatch(str(rid))
    if m is None or int(m.group(1)) not in LEVELS:
        return None
    return make_problem(int(m.group(2)), int(m.group(1)), int(m.group(3)))


def render(prob: Problem) -> Image.Image:
    """The grid as an RGB image, one CELL x CELL square per cell (a thin margin keeps cells visually separate)."""
    n = len(prob.grid)
    img = Image.new("RGB", (n * CELL, n * CELL), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for r, row in enumerate(prob.grid):
        for c, cell in enumerate(row):
            if cell != EMPTY:
                draw.rectangle([c * CELL + 3, r * CELL + 3, (c + 1) * CELL - 4, (r + 1) * CELL - 4], fill=COLORS[cell])
    return img


def grid_as_text(prob: Problem) -> str:
    """The text-only variant's view of the image (for the text-only twin model, e.g. vLLM on CPU)."""
    return "\n".join(f"row {r + 1}: " + " ".join(row) for r, row in enumerate(prob.grid))


def text_question(prob: Problem) -> str:
    return f"Grid:\n{grid_as_text(prob)}\n{prob.question}"


# ----------------------------------------------------------------------------------------------- chains of thought
def chain(prob: Problem, counts: list[int] | None = None) -> tuple[str, str]:
    """(reasoning, answer) of a row-by-row count; `counts` overrides the true row counts to make a flawed chain."""
    counts = prob.row_counts() if counts is None else counts
    parts, total = [f"count {' and '.join(prob.targets)}."], 0
    for r, c in enumerate(counts):
        total += c
        parts.append(f"row {r + 1}: {c}, total {total}.")
    return " ".join(parts), str(total)


def one_round(prob: Problem) -> str:
    think, answer = chain(prob)
    return f"<think>{think}</think> <answer>{answer}</answer>"


def flawed_counts(prob: Problem, rng: random.Random) -> list[int]:
    """The true row counts with one row off by one: the kind of slip a first attempt makes."""
    counts = prob.row_counts()
    n = len(counts)
    r = rng.randrange(n)
    if counts[r] == 0:
        counts[r] = 1
    elif counts[r] == n:
        counts[r] = n - 1
    else:
        counts[r] += rng.choice((-1, 1))
    return counts


_ROW = re.compile(r"row (\d+): (\d+)")


def oracle_reflection(prob: Problem, think: str, answer: str) -> str:
    """The oracle teacher: compare a first attempt with the truth and say what was right or wrong.

    Like the paper's teacher it sees the gold answer but does not simply state it: it points at the first wrong row.
    """
    truth = prob.row_counts()
    claimed = {int(r): int(c) for r, c in _ROW.findall(think)}
    right = answer.strip() == prob.answer
    if right and all(claimed.get(r + 1) == c for r, c in enumerate(truth)):
        return f"every row count checks out, so {prob.answer} is right."
    for r, c in enumerate(truth):
        if claimed.get(r + 1) != c:
            said = claimed.get(r + 1)
            # A policy's own attempt can reach the right total through wrong rows (two slips that cancel): the
            # reflection must not call a right answer wrong, but the rows still get corrected.
            verdict = f"but the total {prob.answer} is right" if right else f"so {answer.strip()} is wrong"
            if said is None:
                return f"row {r + 1} was not counted, {verdict}."
            return f"row {r + 1} has {c}, not {said}, {verdict}."
    return f"the rows are right but the total is not, so {answer.strip()} is wrong."


def two_round(prob: Problem, think1: str, answer1: str) -> str:
    """A full SRPO response: the given first attempt, the oracle's reflection, and a correct second round."""
    think2, answer2 = chain(prob)
    reflection = oracle_reflection(prob, think1, answer1)
    return (
        f"<think>{think1}</think> <answer>{answer1}</answer> <reflection>{reflection}</reflection> "
        f"<think>{think2}</think> <answer>{answer2}</answer>"
    )


def oracle_two_round(prob: Problem, rng: random.Random, p_correct: float = 0.3) -> str:
    """A reflection-SFT target: ~p_correct correct-and-confirmed, the rest flawed-and-revised (paper: ~30/70)."""
    counts = None if rng.random() < p_correct else flawed_counts(prob, rng)
    think1, answer1 = chain(prob, counts)
    return two_round(prob, think1, answer1)


# ----------------------------------------------------------------------------------------------- on-disk datasets
def _question_content(prob: Problem, image_path: str | None) -> str | list[dict]:
    if image_path is None:
        return text_question(prob)
    return [{"type": "image", "image": image_path}, {"type": "text", "text": prob.question}]


def write_rl_split(out_dir: Path, name: str, n: int, seed: int, difficulty: int = 1, text_only: bool = False) -> Path:
    """Write `n` RL/eval records {"id", "question", "image", "answer"} to out_dir/name.jsonl (+ PNGs in images/)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            prob = make_problem(seed, difficulty, i)
            rec = {"id": prob.id, "answer": prob.answer}
            if text_only:
                rec["question"] = text_question(prob)
            else:
                rec["question"], rec["image"] = prob.question, f"images/{prob.id}.png"
                render(prob).save(out_dir / rec["image"])
            f.write(json.dumps(rec) + "\n")
    return path


def write_sft_split(
    out_dir: Path,
    name: str,
    n: int,
    seed: int,
    system: str,
    difficulty: int = 1,
    reflection: bool = False,
    p_correct: float = 0.3,
    text_only: bool = False,
) -> Path:
    """Write `n` SFT chat records {"messages": [...]} to out_dir/name.jsonl, images relative to out_dir.

    reflection=False: one-round chains of thought (the tiny *base* model's training data, standing in for the
    pretrained Instruct model). reflection=True: two-round oracle responses (the reflection cold start).
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"sft-{seed}-{reflection}")
    path = out_dir / f"{name}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            prob = make_problem(seed, difficulty, i)
            image = None
            if not text_only:
                image = f"images/{prob.id}.png"
                if not (out_dir / image).exists():
                    render(prob).save(out_dir / image)
            response = oracle_two_round(prob, rng, p_correct) if reflection else one_round(prob)
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": _question_content(prob, image)},
                {"role": "assistant", "content": response},
            ]
            f.write(json.dumps({"id": prob.id, "messages": messages}) + "\n")
    return path


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Text the tiny tokenizer is trained on: questions, text grids, one- and two-round responses of every level."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        prob = make_problem(seed, i % len(LEVELS), i)
        texts += [text_question(prob), one_round(prob), oracle_two_round(prob, rng, p_correct=0.5)]
    return texts
