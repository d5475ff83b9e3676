"""The tiny world's task: count coloured cells in a grid image.

Why this task: the answer needs the image (the question names a colour, only the picture says where it is), the grid
is aligned to Qwen2.5-VL's vision tokens (one 28x28 cell = one 14px patch merged 2x2 = one image token, and M-RoPE
gives that token its row and column), and a chain of thought that counts row by row makes natural, plausible
mistakes (one row miscounted by one) that a second look can fix. Everything is deterministic from a seed.

A one-round chain of thought looks like
  <think>count red. row 1: 2, total 2. row 2: 0, total 2. row 3: 1, total 3.</think> <answer>3</answer>
and the oracle teacher's reflection names the first wrong row, or confirms the count.

Records are written in the project's real on-disk formats (JSONL + PNG files), see write_rl_split / write_sft_split.

The rehearsal world (tiny.ensure_world(..., mix=True), bench/rehearsal.py) mixes in the shapes real data has, built from
the same grids (make_mixed_problem, SHAPES): multiple-choice questions whose answer block is a sentence
(`The answer is $\\boxed{B}$.`), questions about two images (rows numbered on through the second grid, so the chain
and the oracle stay the same), and text-only questions (the grid written out as text).
"""

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from nanosrpo.data import question_text

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
    grid: list[list[str]]  # colour name or EMPTY per cell, row-major (two images: the second grid's rows follow)
    targets: list[str]  # the colours to count
    question: str
    answer: str  # the count, or the gold letter of a multiple-choice problem
    images: int = 1  # 0: the grid is given as text; 2: two grids, each its own image
    choices: list[str] | None = None  # multiple choice: the candidate counts, in the order lettered A, B, ...

    def row_counts(self) -> list[int]:
        return [sum(cell in self.targets for cell in row) for row in self.grid]


def make_problem(seed: int, difficulty: int = 1, idx: int = 0, p_empty: float = 0.4) -> Problem:
    """One problem, fully determined by (seed, difficulty, idx)."""
    rng = random.Random(f"nanosrpo-{seed}-{difficulty}-{idx}")
    n, k, vary = LEVELS[difficulty]
    names = list(COLORS)
    grid = _grid(rng, n, p_empty)
    targets = sorted(rng.sample(names, k), key=names.index) if vary else names[:k]
    what = " and ".join(targets)
    question = f"How many {what} cells are in the grid?"
    prob = Problem(id=f"grid-d{difficulty}-s{seed}-{idx:06d}", grid=grid, targets=targets, question=question, answer="")
    prob.answer = str(sum(prob.row_counts()))
    return prob


def _grid(rng: random.Random, n: int, p_empty: float) -> list[list[str]]:
    return [[EMPTY if rng.random() < p_empty else rng.choice(list(COLORS)) for _ in range(n)] for _ in range(n)]


# The rehearsal's shapes, cycled by record index: (images, multiple choice). A third of the records have no image, a
# third two, so the micro-batches of two processes often put a text-only record on one and images on the other.
SHAPES = [(1, False), (1, True), (2, False), (2, True), (0, False), (0, True)]


def make_mixed_problem(seed: int, difficulty: int = 0, idx: int = 0, p_empty: float = 0.4) -> Problem:
    """Problem idx of the rehearsal's mix: the grid problem of (seed, difficulty, idx), in shape SHAPES[idx % 6]."""
    images, mc = SHAPES[idx % len(SHAPES)]
    prob = make_problem(seed, difficulty, idx, p_empty)
    prob.id, prob.images = prob.id.replace("grid-", "grid-mix-"), images
    rng = random.Random(f"nanosrpo-mix-{seed}-{difficulty}-{idx}")
    if images == 2:  # a second grid of the same size: count over both
        prob.grid += _grid(rng, len(prob.grid), p_empty)
        prob.question = prob.question.replace("in the grid?", "in the two grids together?")
    total = sum(prob.row_counts())
    prob.answer = str(total)
    if mc:  # four candidate counts: the truth and the totals one slip away (flawed_counts), shuffled
        near = [t for t in (total - 1, total + 1, total + 2, total - 2, total + 3) if t >= 0][:3]
        prob.choices = [str(t) for t in rng.sample([total, *near], 4)]
        prob.answer = _letter(prob, total)
    return prob


def _letter(prob: Problem, total: int) -> str | None:
    """The letter of the choice `total`, or None if no choice says it."""
    return LETTERS[prob.choices.index(str(total))] if str(total) in prob.choices else None


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ID = re.compile(r"grid-(mix-)?d(\d+)-s(\d+)-(\d+)")


def problem_from_id(rid: str) -> Problem | None:
    """The Problem behind a record id written by write_rl_split ("grid-d1-s1-000042", "grid-mix-d0-s1-000042"), or
    None for another id.

    The oracle teacher (nanosrpo/teacher.py) needs the grid itself, and every problem is a pure function of its id.
    """
    m = _ID.fullmatch(str(rid))
    if m is None or int(m.group(2)) not in LEVELS:
        return None
    make = make_mixed_problem if m.group(1) else make_problem
    return make(int(m.group(3)), int(m.group(2)), int(m.group(4)))


def render(prob: Problem) -> Image.Image:
    """The grid as an RGB image, one CELL x CELL square per cell (a thin margin keeps cells visually separate)."""
    return _render_grid(prob.grid)


def render_all(prob: Problem) -> list[Image.Image]:
    """The problem's images: none (text-only), its grid, or each of its two grids."""
    n = len(prob.grid) // max(prob.images, 1)
    return [_render_grid(prob.grid[i * n : (i + 1) * n]) for i in range(prob.images)]


def _render_grid(grid: list[list[str]]) -> Image.Image:
    n = len(grid)
    img = Image.new("RGB", (n * CELL, n * CELL), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for r, row in enumerate(grid):
        for c, cell in enumerate(row):
            if cell != EMPTY:
                draw.rectangle([c * CELL + 3, r * CELL + 3, (c + 1) * CELL - 4, (r + 1) * CELL - 4], fill=COLORS[cell])
    return img


def grid_as_text(prob: Problem) -> str:
    """The text-only variant's view of the image (for the text-only twin model, e.g. vLLM on CPU)."""
    return "\n".join(f"row {r + 1}: " + " ".join(row) for r, row in enumerate(prob.grid))


def text_question(prob: Problem) -> str:
    if prob.images == 2:  # the text twin's view of a two-image problem: both grids, rows numbered on
        n = len(prob.grid) // 2
        rows = grid_as_text(prob).split("\n")
        return "Grid 1:\n" + "\n".join(rows[:n]) + "\nGrid 2:\n" + "\n".join(rows[n:]) + f"\n{prob.question}"
    return f"Grid:\n{grid_as_text(prob)}\n{prob.question}"


# ----------------------------------------------------------------------------------------------- chains of thought
def chain(prob: Problem, counts: list[int] | None = None) -> tuple[str, str]:
    """(reasoning, answer) of a row-by-row count; `counts` overrides the true row counts to make a flawed chain.

    Multiple choice: the reasoning ends by finding the count among the choices, and the answer is the sentence
    `The answer is $\\boxed{B}$.` (the form real models write; rewards.is_correct reads the letter out of it).
    """
    counts = prob.row_counts() if counts is None else counts
    parts, total = [f"count {' and '.join(prob.targets)}."], 0
    for r, c in enumerate(counts):
        total += c
        parts.append(f"row {r + 1}: {c}, total {total}.")
    if prob.choices is None:
        return " ".join(parts), str(total)
    letter = _letter(prob, total)
    if letter is None:  # a count no choice says (a chain with more than one slip): the nearest choice
        letter = _letter(prob, min(map(int, prob.choices), key=lambda t: abs(t - total)))
    parts.append(f"{total} is choice {letter}.")
    return " ".join(parts), f"The answer is $\\boxed{{{letter}}}$."


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
_BOXED_LETTER = re.compile(r"\\boxed\{\s*\(?([A-Za-z])\)?\s*\}")


def said_answer(prob: Problem, answer: str) -> str:
    """What an attempt's answer block says, in the gold's terms: the letter of a multiple-choice sentence
    (`The answer is $\\boxed{B}$.` -> "B"), else the block stripped. (The oracle reading its own task's format;
    the reward's answer checking is rewards.is_correct.)"""
    answer = answer.strip()
    if prob.choices is not None:
        m = _BOXED_LETTER.search(answer)
        if m or re.fullmatch(r"\(?([A-Za-z])\)?\.?", answer):
            return (m.group(1) if m else answer.strip("().")).upper()
    return answer


def oracle_reflection(prob: Problem, think: str, answer: str) -> str:
    """The oracle teacher: compare a first attempt with the truth and say what was right or wrong.

    Like the paper's teacher it sees the gold answer but does not simply state it: it points at the first wrong row.
    """
    truth = prob.row_counts()
    claimed = {int(r): int(c) for r, c in _ROW.findall(think)}
    answer = said_answer(prob, answer)
    right = answer == prob.answer
    if right and all(claimed.get(r + 1) == c for r, c in enumerate(truth)):
        return f"every row count checks out, so {prob.answer} is right."
    for r, c in enumerate(truth):
        if claimed.get(r + 1) != c:
            said = claimed.get(r + 1)
            # A policy's own attempt can reach the right total through wrong rows (two slips that cancel): the
            # reflection must not call a right answer wrong, but the rows still get corrected.
            verdict = f"but the total {prob.answer} is right" if right else f"so {answer} is wrong"
            if said is None:
                return f"row {r + 1} was not counted, {verdict}."
            return f"row {r + 1} has {c}, not {said}, {verdict}."
    if prob.choices is not None:  # right rows, wrong letter
        return f"the rows are right and {sum(truth)} is choice {prob.answer}, so {answer} is wrong."
    return f"the rows are right but the total is not, so {answer} is wrong."


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
def _question_text(prob: Problem, text_only: bool) -> str:
    """The question as the policy reads it (data.question_text lists multiple-choice options below it)."""
    question = text_question(prob) if text_only or prob.images == 0 else prob.question
    return question_text({"question": question, "choices": prob.choices})


def _image_files(prob: Problem, out_dir: Path, text_only: bool) -> list[str]:
    """The problem's images saved under out_dir/images/ (once), as paths relative to out_dir."""
    if text_only or prob.images == 0:
        return []
    names = [f"images/{prob.id}.png"]
    if prob.images == 2:
        names = [f"images/{prob.id}-{k + 1}.png" for k in range(2)]
    for name, img in zip(names, render_all(prob)):
        if not (out_dir / name).exists():
            img.save(out_dir / name)
    return names


def _problems(seed: int, difficulty: int, n: int, mix: bool) -> list[Problem]:
    return [(make_mixed_problem if mix else make_problem)(seed, difficulty, i) for i in range(n)]


def write_rl_split(
    out_dir: Path, name: str, n: int, seed: int, difficulty: int = 1, text_only: bool = False, mix: bool = False
) -> Path:
    """Write `n` RL/eval records {"id", "question", "image", "answer"} to out_dir/name.jsonl (+ PNGs in images/).

    mix=True: the rehearsal's shapes (make_mixed_problem): "image" a list for two images, absent for text-only
    records, and "choices" on multiple-choice ones (then "answer" is the gold letter).
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    with open(path, "w") as f:
        for prob in _problems(seed, difficulty, n, mix):
            as_text = text_only or prob.images == 0
            rec = {"id": prob.id, "answer": prob.answer, "question": text_question(prob) if as_text else prob.question}
            images = _image_files(prob, out_dir, text_only)
            if images:
                rec["image"] = images[0] if len(images) == 1 else images
            if prob.choices is not None:
                rec["choices"] = prob.choices
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
    mix: bool = False,
) -> Path:
    """Write `n` SFT chat records {"messages": [...]} to out_dir/name.jsonl, images relative to out_dir.

    reflection=False: one-round chains of thought (the tiny *base* model's training data, standing in for the
    pretrained Instruct model). reflection=True: two-round oracle responses (the reflection cold start).
    mix=True: the rehearsal's shapes, the user turn as data.prompt_messages renders the RL record (images first).
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"sft-{seed}-{reflection}")
    path = out_dir / f"{name}.jsonl"
    with open(path, "w") as f:
        for prob in _problems(seed, difficulty, n, mix):
            images = _image_files(prob, out_dir, text_only)
            text = _question_text(prob, text_only)
            user = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": text}]
            user = user if images else text
            response = oracle_two_round(prob, rng, p_correct) if reflection else one_round(prob)
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
                {"role": "assistant", "content": response},
            ]
            f.write(json.dumps({"id": prob.id, "messages": messages}) + "\n")
    return path


def corpus(n: int = 2000, seed: int = 0, mix: bool = False) -> list[str]:
    """Text the tiny tokenizer is trained on: questions, text grids, one- and two-round responses of every level.

    mix=True: of the rehearsal's shapes (multiple-choice options and answer sentences, two-grid questions) instead.
    """
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        prob = (make_mixed_problem if mix else make_problem)(seed, i % len(LEVELS), i)
        question = _question_text(prob, text_only=True) if mix else text_question(prob)
        texts += [question, one_round(prob), oracle_two_round(prob, rng, p_correct=0.5)]
    return texts
