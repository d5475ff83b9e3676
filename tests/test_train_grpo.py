"""train_grpo.py end to end on the tiny world: metrics, checkpoints, exact resume after a kill, 2-process DDP."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanosrpo import data, log, model, tiny
from tests.conftest import ROOT

REQUIRED = [
    "step", "reward_mean", "reward_std", "reward_format", "reward_accuracy", "reward_reflection", "reward_effectiveness",
    "reward_length", "accuracy", "first_accuracy", "wrong_to_right", "right_to_wrong", "right_to_right", "wrong_to_wrong",
    "format_rate", "response_length_mean", "correct_length_mean", "incorrect_length_mean", "clip_ratio_low",
    "clip_ratio_high", "kl", "loss", "grad_norm", "lr", "filtered_groups", "time_rollout_s", "time_train_s",
    "time_sync_s", "tokens_per_s",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The 0.2m tiny world plus a briefly SFT'd base policy: it writes some well-formed answers, so rewards vary
    within groups and the policy gradient is not zero (a random policy scores 0 everywhere and would test nothing)."""
    import train_sft

    cache = tmp_path_factory.mktemp("cache")
    paths = tiny.ensure_world(str(cache), size="0.2m")
    out = tmp_path_factory.mktemp("sft")
    train_sft.main(["--stage", "base", "--cache_dir", str(cache), "--tiny_size", "0.2m", "--max_steps", "200",
                    "--lr", "3e-3", "--out_dir", str(out)])
    paths["policy"] = str(checkpoint_policy(out))
    return paths


def checkpoint_policy(out):
    from nanosrpo.checkpoint import latest_checkpoint

    return latest_checkpoint(out) / "policy"


def args(world, out_dir, *extra):
    return [
        "--model", world["policy"], "--data", world["train"], "--eval_data", world["eval"], "--eval_size", "4",
        "--rollout_batch_size", "2", "--group_size", "4", "--train_batch_size", "4", "--micro_batch_size", "2",
        "--max_new_tokens", "64", "--out_dir", str(out_dir), "--plot", "false", "--eval_every", "2", *extra,
    ]


def read(path):
    return [json.loads(line) for line in open(path)]


def test_end_to_end_metrics_samples_and_checkpoint(world, tmp_path):
    import train_grpo

    # 8 sequences per step, 4 per update: two updates per step, so old log-probs and the clipped ratio are exercised
    train_grpo.main(args(world, tmp_path, "--max_steps", "2", "--save_every", "2", "--samples_every", "1"))
    rows = read(tmp_path / "metrics.jsonl")
    assert rows[0]["step"] == 0 and "eval_accuracy" in rows[0]  # the starting point
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert 0 <= r["accuracy"] <= 1 and r["grad_norm"] >= 0 and r["tokens_per_s"] > 0
    assert any(r["grad_norm"] > 0 for r in steps), "a briefly trained policy must give a non-zero policy gradient"
    assert "eval_accuracy" in steps[-1]
    samples = read(tmp_path / "samples.jsonl")
    assert samples and {"completion", "total", "answer"} <= set(samples[0])
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["max_steps"] == 2
    # the checkpoint's policy is a plain save_pretrained dir: reload it and sample from it
    policy, processor = model.load_policy(str(tmp_path / "checkpoint-2" / "policy"))
    rec = data.load_rl_records(world["eval"])[0]
    prompt = data.render_prompt(rec, "hi", processor)
    batch = data.collate(processor, [{"input_ids": prompt["ids"], "loss_mask": [0] * len(prompt["ids"]), "images": prompt["images"]}])
    out = policy.generate(**{k: v for k, v in batch.items() if k not in ("loss_mask", "labels")}, max_new_tokens=4)
    assert out.shape[1] > batch["input_ids"].shape[1]


def test_rollout_metrics_by_hand():
    def s(total, rounds, c1, c2, tokens):
        return {"total": total, "format": 0.5, "accuracy": 0.5 * c1, "reflection": 0.25, "effectiveness": 0.0,
                "length": 0.0, "rounds": rounds, "first_correct": c1, "final_correct": c2, "tokens": tokens}

    m = log.rollout_metrics([s(1.0, 2, 0, 1, 10), s(2.0, 2, 1, 1, 20), s(0.0, 0, 0, 0, 30), s(1.0, 1, 1, 1, 40)])
    assert m["reward_mean"] == 1.0 and m["reward_std"] == pytest.approx((2 / 3) ** 0.5)
    assert (m["accuracy"], m["first_accuracy"], m["format_rate"], m["two_round_rate"]) == (0.75, 0.5, 0.75, 0.5)
    assert (m["wrong_to_right"], m["right_to_right"], m["right_to_wrong"], m["wrong_to_wrong"]) == (0.25, 0.25, 0, 0)
    assert (m["correct_length_mean"], m["incorrect_length_mean"], m["response_length_mean"]) == (70 / 3, 30, 25)


def test_ranks_read_disjoint_prompts_and_epochs_cover_the_data():
    n, world_size = 10, 2
    per_rank = [[data.prompt_index(c * world_size + r, n, seed=0) for c in range(n // world_size)] for r in range(world_size)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))  # one epoch: every record exactly once
    assert [data.prompt_index(p, n, 0) for p in range(n, 2 * n)] != [data.prompt_index(p, n, 0) for p in range(n)]


def _run(cmd_args, env=None, **kw):
    return subprocess.Popen([sys.executable, "train_grpo.py", *cmd_args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_killed_run_resumes_exactly(world, tmp_path):
    """SIGKILL a run after its first checkpoint, resume it, and compare with an uninterrupted run of the same seed."""
    common = ["--max_steps", "4", "--save_every", "2", "--eval_every", "0"]
    full = _run(args(world, tmp_path / "full", *common))
    assert full.wait(timeout=900) == 0, full.stderr.read()

    killed = _run(args(world, tmp_path / "killed", *common))
    deadline = time.time() + 900
    while not (tmp_path / "killed" / "checkpoint-2").exists():
        assert killed.poll() is None, killed.stderr.read()
        assert time.time() < deadline
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = _run(args(world, tmp_path / "killed", *common, "--resume", "true"))
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()

    a, b = read(tmp_path / "full" / "metrics.jsonl"), read(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # the killed run's lines after its checkpoint were dropped
    for ra, rb in zip(a, b):
        for k in ("reward_mean", "accuracy", "loss", "grad_norm", "response_length_mean"):
            assert rb[k] == pytest.approx(ra[k], abs=1e-5), (ra["step"], k)
    assert any(r["grad_norm"] > 0 for r in a[2:])
    wa = model.load_policy(str(tmp_path / "full" / "checkpoint-4" / "policy"))[0].state_dict()
    wb = model.load_policy(str(tmp_path / "killed" / "checkpoint-4" / "policy"))[0].state_dict()
    w0 = model.load_policy(world["policy"])[0].state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(not torch.equal(wa[k], w0[k]) for k in wa), "training must have changed the weights"


@pytest.mark.slow
def test_two_process_ddp(world, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the README's CPU recipe: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train_grpo.py
    cmd = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "train_grpo.py",
           *args(world, tmp_path, "--max_steps", "2", "--save_every", "2", "--rollout_batch_size", "4")]
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, env={**os.environ, "ACCELERATE_USE_CPU": "true"},
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [r for r in read(tmp_path / "metrics.jsonl") if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["responses"] == 16 for r in rows)  # 4 prompts x 4 completions, gathered from both processes
    assert (tmp_path / "checkpoint-2" / "policy" / "model.safetensors").exists()


def test_plots_draw_the_training_dynamics(tmp_path):
    from nanosrpo import plots

    rows = [{"step": 0, "eval_accuracy": 0.2}] + [
        {"step": s, "reward_mean": 0.1 * s, "accuracy": 0.1 * s, "first_accuracy": 0.05 * s, "loss": 0.01,
         "correct_length_mean": 50, "incorrect_length_mean": 60, "response_length_mean": 55, "wrong_to_right": 0.1,
         "right_to_wrong": 0.05, "clip_ratio_low": 0.0, "clip_ratio_high": 0.01} for s in range(1, 5)
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = plots.plot_run(tmp_path)
    assert out is not None and out.stat().st_size > 10_000
