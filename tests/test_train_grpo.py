"""train_grpo.py end to end on the tiny world: metrics, checkpoints, exact resume after a kill, 2-process DDP."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanosrpo import config, data, log, model, tiny, vllm_engine
from tests.conftest import ROOT

REQUIRED = [
    "step",
    "reward_mean",
    "reward_std",
    "reward_format",
    "reward_accuracy",
    "reward_reflection",
    "reward_effectiveness",
    "reward_length",
    "accuracy",
    "first_accuracy",
    "wrong_to_right",
    "right_to_wrong",
    "right_to_right",
    "wrong_to_wrong",
    "format_rate",
    "response_length_mean",
    "correct_length_mean",
    "incorrect_length_mean",
    "clip_ratio_low",
    "clip_ratio_high",
    "ratio_capped",
    "kl",
    "loss",
    "grad_norm",
    "lr",
    "filtered_groups",
    "time_rollout_s",
    "time_train_s",
    "time_sync_s",
    "tokens_per_s",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The 0.2m tiny world plus a briefly SFT'd base policy: it writes some well-formed answers, so rewards vary
    within groups and the policy gradient is not zero (a random policy scores 0 everywhere and would test nothing)."""
    import train_sft

    cache = tmp_path_factory.mktemp("cache")
    paths = tiny.ensure_world(str(cache), size="0.2m")
    out = tmp_path_factory.mktemp("sft")
    train_sft.main(
        [
            "--stage",
            "base",
            "--cache_dir",
            str(cache),
            "--tiny_size",
            "0.2m",
            "--max_steps",
            "200",
            "--lr",
            "3e-3",
            "--out_dir",
            str(out),
        ]
    )
    paths["policy"] = str(checkpoint_policy(out))
    return paths


def checkpoint_policy(out):
    from nanosrpo.checkpoint import latest_checkpoint

    return latest_checkpoint(out) / "policy"


def args(world, out_dir, *extra):
    return [
        "--model",
        world["policy"],
        "--data",
        world["train"],
        "--eval_data",
        world["eval"],
        "--eval_size",
        "4",
        "--rollout_batch_size",
        "2",
        "--group_size",
        "4",
        "--train_batch_size",
        "4",
        "--micro_batch_size",
        "2",
        "--max_new_tokens",
        "64",
        "--out_dir",
        str(out_dir),
        "--plot",
        "false",
        "--eval_every",
        "2",
        *extra,
    ]


def read(path):
    return [json.loads(line) for line in open(path)]


def test_end_to_end_metrics_samples_and_checkpoint(world, tmp_path, capsys):
    import train_grpo

    # 8 sequences per step, 4 per update: two updates per step, so old log-probs and the clipped ratio are exercised
    train_grpo.main(args(world, tmp_path, "--max_steps", "2", "--save_every", "2", "--samples_every", "1"))
    rows = read(tmp_path / "metrics.jsonl")
    # the progress bar shows the held-out greedy accuracy of the last eval and its gain over step 0
    gain = rows[-1]["eval_accuracy"] - rows[0]["eval_accuracy"]
    assert f"eval={rows[-1]['eval_accuracy']:.3f} ({gain:+.3f} vs step 0)" in capsys.readouterr().err
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
    batch = data.collate(
        processor, [{"input_ids": prompt["ids"], "loss_mask": [0] * len(prompt["ids"]), "images": prompt["images"]}]
    )
    out = policy.generate(**{k: v for k, v in batch.items() if k not in ("loss_mask", "labels")}, max_new_tokens=4)
    assert out.shape[1] > batch["input_ids"].shape[1]


def test_rollout_metrics_by_hand():
    def s(total, rounds, c1, c2, tokens):
        return {
            "total": total,
            "format": 0.5,
            "accuracy": 0.5 * c1,
            "reflection": 0.25,
            "effectiveness": 0.0,
            "length": 0.0,
            "rounds": rounds,
            "first_correct": c1,
            "final_correct": c2,
            "tokens": tokens,
        }

    m = log.rollout_metrics([s(1.0, 2, 0, 1, 10), s(2.0, 2, 1, 1, 20), s(0.0, 0, 0, 0, 30), s(1.0, 1, 1, 1, 40)])
    assert m["reward_mean"] == 1.0 and m["reward_std"] == pytest.approx((2 / 3) ** 0.5)
    assert (m["accuracy"], m["first_accuracy"], m["format_rate"], m["two_round_rate"]) == (0.75, 0.5, 0.75, 0.5)
    assert (m["wrong_to_right"], m["right_to_right"], m["right_to_wrong"], m["wrong_to_wrong"]) == (0.25, 0.25, 0, 0)
    assert (m["correct_length_mean"], m["incorrect_length_mean"], m["response_length_mean"]) == (70 / 3, 30, 25)


def test_ranks_read_disjoint_prompts_and_epochs_cover_the_data():
    n, world_size = 10, 2
    per_rank = [
        [data.prompt_index(c * world_size + r, n, seed=0) for c in range(n // world_size)] for r in range(world_size)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))  # one epoch: every record exactly once
    assert [data.prompt_index(p, n, 0) for p in range(n, 2 * n)] != [data.prompt_index(p, n, 0) for p in range(n)]


def _run(cmd_args, env=None, **kw):
    return subprocess.Popen(
        [sys.executable, "train_grpo.py", *cmd_args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


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
    # docs/scale.md's CPU recipe: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train_grpo.py
    cmd = [
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
        "train_grpo.py",
        *args(world, tmp_path, "--max_steps", "2", "--save_every", "2", "--rollout_batch_size", "4"),
    ]
    p = subprocess.run(
        [sys.executable, *cmd],
        cwd=ROOT,
        env={**os.environ, "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [r for r in read(tmp_path / "metrics.jsonl") if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["responses"] == 16 for r in rows)  # 4 prompts x 4 completions, gathered from both processes
    assert (tmp_path / "checkpoint-2" / "policy" / "model.safetensors").exists()


def test_plots_draw_the_training_dynamics(tmp_path):
    from nanosrpo import plots

    rows = [{"step": 0, "eval_accuracy": 0.2}] + [
        {
            "step": s,
            "reward_mean": 0.1 * s,
            "accuracy": 0.1 * s,
            "first_accuracy": 0.05 * s,
            "loss": 0.01,
            "correct_length_mean": 50,
            "incorrect_length_mean": 60,
            "response_length_mean": 55,
            "wrong_to_right": 0.1,
            "right_to_wrong": 0.05,
            "clip_ratio_low": 0.0,
            "clip_ratio_high": 0.01,
        }
        for s in range(1, 5)
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = plots.plot_run(tmp_path)
    assert out is not None and out.stat().st_size > 10_000
    # the comparison figure of bench/miniature.py: one curve per arm, averaged over its runs
    fig = plots.plot_comparison(
        {"a": [tmp_path], "b": [tmp_path, tmp_path]},
        [("reward", "reward_mean"), ("eval", "eval_accuracy")],
        tmp_path / "figs" / "cmp.png",
    )
    assert fig is not None and fig.stat().st_size > 5_000


def test_rolling_mean_by_hand():
    from nanosrpo.plots import rolling_mean

    # trailing window of 3: [1], [1,2], [1,2,3], [2,3,4], [3,4,8]
    assert rolling_mean([1, 2, 3, 4, 8], window=3) == [1.0, 1.5, 2.0, 3.0, 5.0]
    assert rolling_mean([], window=3) == []


# ----------------------------------------------------------------------------------------------------- loop branches
def steps_of(out_dir):
    return [r for r in read(out_dir / "metrics.jsonl") if "reward_mean" in r]


def test_update_plan_refuses_uneven_splits():
    import train_grpo

    cfg = config.parse(
        config.GRPOConfig,
        ["--rollout_batch_size", "4", "--group_size", "8", "--train_batch_size", "16", "--ppo_epochs", "2"],
    )
    assert config.grpo_update_plan(cfg, world=2) == (8, 4)  # 32 sequences: 2 updates of 16 (8 per process), x 2 epochs
    cfg.train_batch_size = 12  # 32 sequences are not a whole number of updates of 12
    with pytest.raises(SystemExit, match="not a whole number of updates of --train_batch_size 12"):
        config.grpo_update_plan(cfg, world=1)
    with pytest.raises(SystemExit, match="divisible by the 2 processes"):
        config.grpo_update_plan(config.parse(config.GRPOConfig, ["--rollout_batch_size", "3"]), world=2)
    with pytest.raises(SystemExit, match="not a whole number"):  # refused before anything is built or loaded
        train_grpo.main(["--model", "/nonexistent", "--train_batch_size", "12"])


def test_gradient_checkpointing_recomputes_in_the_update(world, tmp_path, monkeypatch):
    """from_pretrained returns eval mode and generate() switches to it; transformers checkpoints only in train mode.
    Count decoder-layer forwards with gradients on: with checkpointing each micro-batch's forward runs twice."""
    import train_grpo

    real, counts = model.load_policy, []

    def spy(*a, **kw):
        policy, processor = real(*a, **kw)
        counts.append(0)
        i = len(counts) - 1
        policy.model.language_model.layers[0].register_forward_pre_hook(
            lambda mod, inp: counts.__setitem__(i, counts[i] + torch.is_grad_enabled())
        )
        return policy, processor

    monkeypatch.setattr(model, "load_policy", spy)
    for ckpt in ("false", "true"):
        train_grpo.main(
            args(world, tmp_path / ckpt, "--max_steps", "1", "--eval_every", "0", "--gradient_checkpointing", ckpt)
        )
    # 8 sequences, 2 updates of 4, micro-batches of 2: 4 forwards with grad, each recomputed in backward when on
    assert counts == [4, 8]


def test_dynamic_sampling_that_cannot_fill_the_batch_warns(world, tmp_path, capsys):
    import train_grpo

    # no group can pass (mean accuracy 1, where all are right alike): every draw is filtered, the batch is topped up
    # at zero advantage
    train_grpo.main(
        args(
            world,
            tmp_path,
            "--max_steps",
            "1",
            "--eval_every",
            "0",
            "--filter_accuracy",
            "true",
            "--filter_low",
            "1",
            "--filter_high",
            "1",
            "--max_draws",
            "3",
        )
    )
    (row,) = steps_of(tmp_path)
    assert (row["filtered_groups"], row["short_groups"]) == (6, 2)  # 3 draws x 2 prompts filtered; 2 groups short
    assert row["loss"] == 0 and row["grad_norm"] == 0  # zero advantages teach nothing
    assert "dynamic sampling drew --max_draws 3 batches and still lacked 2 groups" in capsys.readouterr().out
    state = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["cursor"] == 6  # every draw consumed prompts


def test_epochs_count_passes_over_the_data(world, tmp_path):
    import train_grpo

    small = tmp_path / "small.jsonl"
    small.write_text("".join(open(world["train"]).readlines()[:4]))
    images = os.path.dirname(world["train"])
    common = ["--max_steps", "0", "--epochs", "2", "--data", str(small), "--image_dir", images, "--eval_every", "0"]
    train_grpo.main(args(world, tmp_path / "plain", *common))  # 2 passes over 4 records, 2 prompts per step
    assert [r["step"] for r in steps_of(tmp_path / "plain")] == [1, 2, 3, 4]
    assert (tmp_path / "plain" / "checkpoint-4").exists()
    # dynamic sampling consumes 2 draws x 2 prompts = one pass per step: the 2 passes end after 2 steps
    train_grpo.main(
        args(
            world,
            tmp_path / "filtered",
            *common,
            "--filter_accuracy",
            "true",
            "--filter_low",
            "1",
            "--filter_high",
            "1",
            "--max_draws",
            "2",
        )
    )
    assert [r["step"] for r in steps_of(tmp_path / "filtered")] == [1, 2]
    assert (tmp_path / "filtered" / "checkpoint-2").exists()


def test_kl_to_the_frozen_reference(world, tmp_path):
    import train_grpo

    train_grpo.main(
        args(
            world,
            tmp_path,
            "--max_steps",
            "2",
            "--eval_every",
            "0",
            "--kl_coef",
            "0.1",
            "--lr",
            "1e-3",
            "--rollout_batch_size",
            "4",
        )
    )
    rows = steps_of(tmp_path)
    assert rows[0]["kl"] >= 0 and rows[-1]["kl"] > 0  # once the policy has moved, it differs from the frozen reference
    assert any(r["grad_norm"] > 0 for r in rows)


def test_ppo_epochs_move_the_ratio_and_clip(world, tmp_path):
    import train_grpo

    train_grpo.main(
        args(
            world,
            tmp_path,
            "--max_steps",
            "1",
            "--eval_every",
            "0",
            "--ppo_epochs",
            "2",
            "--lr",
            "1e-2",
            "--ratio_cap",
            "1.25",
        )
    )
    (row,) = steps_of(tmp_path)
    assert row["clip_ratio_low"] + row["clip_ratio_high"] > 0  # later updates are off-policy: ratio != 1, clipped
    assert 0 <= row["ratio_capped"] <= 1 and math.isfinite(row["loss"])  # logged; how often depends on the run


def test_ratio_cap_flag_and_preset():
    assert config.parse(config.GRPOConfig, []).ratio_cap == 0.0  # the tiny run: no cap
    assert config.parse(config.GRPOConfig, ["--preset", "qwen2.5-vl-7b"]).ratio_cap == 3.0  # the reference's
    with pytest.raises(SystemExit, match="--ratio_cap must be 0 .* above 1 \\+ --clip_high = 1.28, got 1.2"):
        config.parse(config.GRPOConfig, ["--ratio_cap", "1.2", "--clip_high", "0.28"])


def test_truncated_importance_sampling_runs(world, tmp_path):
    import train_grpo

    train_grpo.main(args(world, tmp_path, "--max_steps", "1", "--eval_every", "0", "--tis_cap", "2"))
    (row,) = steps_of(tmp_path)
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0


def test_hub_id_resolves_once_to_the_local_snapshot(tiny_dir, tmp_path):
    """A hub id (here in a fake offline hub cache) becomes the local snapshot directory once, in tiny.resolve, and
    that directory is what the engine reads: vLLM's engine read `<id>/config.json` as a path before."""
    repo = tmp_path / "hub" / "models--someone--tiny-vl"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    with pytest.raises(FileNotFoundError):
        vllm_engine._model_config("someone/tiny-vl")  # what a raw hub id does to the engine
    code = (
        "from nanosrpo import config, tiny, vllm_engine\n"
        "cfg = config.parse(config.GRPOConfig, ['--model', 'someone/tiny-vl', '--data', 'x', '--eval_data', ''])\n"
        "path = tiny.resolve(cfg)['model']\n"
        "print(path, vllm_engine._model_config(path)['model_type'])"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    path, model_type = p.stdout.split()[-2:]
    assert os.path.samefile(path, snapshot) and model_type == "qwen2_5_vl"


def test_prompt_cap_and_pixel_bounds(tiny_dir, tmp_path):
    from nanosrpo import rollout, synthetic

    _, processor = model.load_policy(str(tiny_dir))
    rec = data.load_rl_records(synthetic.write_rl_split(tmp_path, "rl", 1, seed=0))[0]
    n = len(rollout.render(rec, "sys", processor, 0)["ids"])
    assert len(rollout.render(rec, "sys", processor, n)["ids"]) == n
    with pytest.raises(data.DataError, match=f"record '{rec['id']}': the prompt is {n} tokens"):
        rollout.render(rec, "sys", processor, n - 1)
    # a 4x4 grid of 28-px cells is 112 x 112 px: 16 vision tokens; at most 56 x 56 px it becomes 2 x 2 = 4 tokens,
    # and the vLLM engine reads the same bound back from the processor
    model.set_pixel_bounds(processor, max_pixels=56 * 56)
    assert len(rollout.render(rec, "sys", processor, 0)["ids"]) == n - 12
    assert model.pixel_bounds(processor)["max_pixels"] == 56 * 56


def _response(first: bool, second: bool | None = None) -> str:
    """A well-formed response to a question whose gold is 21: one round (second None) or two."""
    # boxed: the released code's checker (variant "code") reads a bare "21" as no answer at all
    a = lambda right: "$\\boxed{21}$" if right else "$\\boxed{7}$"  # noqa: E731
    one = f"<think>count the cells</think> <answer>{a(first)}</answer>"
    two = f" <reflection>check</reflection> <think>again</think> <answer>{a(second)}</answer>"
    return one if second is None else one + two


def _scores(responses, **kw):
    from nanosrpo import rewards

    return [rewards.srpo_reward(r, "21", **kw) for r in responses]


def test_accuracy_score_is_r_acc_plus_i_eff_over_its_range():
    """The paper variant's filter score: (R_acc + I_eff) / 0.75, so right->right 1, wrong->right 2/3, right->wrong 1/3,
    wrong->wrong 0; a one-round answer 2/3 right, 0 wrong; malformed 0. Without I_eff: the first answer, 0 / 1."""
    from nanosrpo import rollout

    cfg = config.parse(config.GRPOConfig, [])
    outcomes = [(True, True), (False, True), (True, False), (False, False), (True, None), (False, None)]
    got = [rollout.accuracy_score(s, cfg) for s in _scores([_response(*o) for o in outcomes] + ["junk"])]
    assert got == pytest.approx([1, 2 / 3, 1 / 3, 0, 2 / 3, 0, 0])
    cfg = config.parse(config.GRPOConfig, ["--use_effectiveness", "false"])
    got = [rollout.accuracy_score(s, cfg) for s in _scores([_response(*o) for o in outcomes], use_effectiveness=False)]
    assert got == pytest.approx([1, 0, 1, 0, 1, 0])
    cfg = config.parse(config.GRPOConfig, ["--reward_variant", "code"])  # the released code's merged number
    got = [rollout.accuracy_score(s, cfg) for s in _scores([_response(*o) for o in outcomes[:4]], variant="code")]
    assert got == pytest.approx([0.75, 1.0, 0.25, 0.0])


def test_accuracy_filter_keeps_the_groups_that_teach_reflection():
    """With the preset's bounds (0.1-0.9) and the paper's reward: a group whose first answers are all wrong but whose
    reflection fixes two of eight (mean 1/6), and one whose first answers are all right but two are broken (mean 5/6),
    are kept (filtering on the first answer alone dropped both: means 0 and 1). A group with nothing to learn is
    dropped: all wrong->wrong, all right->right, all one-round right (every score 2/3: inside the bounds, but equal)."""
    from nanosrpo import rollout

    cfg = config.parse(config.GRPOConfig, ["--preset", "qwen2.5-vl-7b"])
    keep = lambda outcomes, **kw: rollout._keep(_scores([_response(*o) for o in outcomes], **kw), cfg)  # noqa: E731
    assert keep([(False, False)] * 6 + [(False, True)] * 2)
    assert keep([(True, True)] * 6 + [(True, False)] * 2)
    assert keep([(True, True)] * 4 + [(False, False)] * 4)
    assert not keep([(False, False)] * 8)
    assert not keep([(True, True)] * 8)
    assert not keep([(True, None)] * 8)
    assert not keep([(False, False)] * 7 + [(False, True)])  # one fix in eight: mean 1/12 < 0.1
    # the I_eff ablation: the reward has no term on the second answer, so neither has the filter
    cfg.use_effectiveness = False
    assert not keep([(False, False)] * 6 + [(False, True)] * 2, use_effectiveness=False)
    assert keep([(True, True)] * 4 + [(False, False)] * 4, use_effectiveness=False)
    # the released code's merged score and GRPO's 0 / 1
    cfg.use_effectiveness, cfg.reward_variant = True, "code"
    assert keep([(False, False)] * 7 + [(False, True)], variant="code")  # 1.0 / 8 = 0.125
    assert not keep([(True, True)] * 8, variant="code")  # every score 0.75: nothing to learn
    cfg.reward_variant = "grpo"
    assert keep([(True, None)] * 4 + [(False, None)] * 4, variant="grpo")
    assert not keep([(True, None)] * 8, variant="grpo")


# ----------------------------------------------------------------------------------------------------- top-up groups
class _Engine:
    """Completions whose texts are given per call: texts[call][prompt] is the prompt's group."""

    def __init__(self, texts):
        self.texts, self.calls = texts, 0

    def generate(self, prompts, n, *_, **__):
        out = [
            [{"ids": [7] * (3 + j), "text": t, "logprobs": None} for j, t in enumerate(group)]
            for group in self.texts[self.calls]
        ]
        self.calls += 1
        return out


class _Accelerator:
    process_index, num_processes, device = 0, 1, "cpu"

    def gather(self, t):
        return t


def test_top_up_groups_are_not_learned_and_not_counted(monkeypatch):
    """Dynamic sampling that runs short: 2 draws of 2 prompts, only the first group passes the filter, so the batch is
    that group plus one top-up. The top-up's loss mask is 0 everywhere: it adds nothing to the loss and nothing to its
    denominator, so the update is the kept group's alone (the reference trains only on full batches)."""
    from nanosrpo import grpo, rewards, rollout

    monkeypatch.setattr(rollout, "render", lambda rec, *_: {"ids": [1, 2], "images": []})  # 2 prompt tokens
    mixed, wrong = [_response(False, True), _response(False, False)], [_response(False, False)] * 2
    engine = _Engine([[mixed, wrong], [wrong, wrong]])
    records = [{"id": str(i), "answer": "21", "choices": None} for i in range(8)]
    cfg = config.parse(
        config.GRPOConfig,
        ["--rollout_batch_size", "2", "--group_size", "2", "--filter_accuracy", "true", "--max_draws", "2"],
    )
    batch = rollout.collect(
        engine, records, 0, cfg, lambda text, rec: rewards.srpo_reward(text, "21"), "sys", None, _Accelerator()
    )
    assert (batch["filtered"], batch["short"], batch["kept"]) == (3, 1, 1)
    samples = rollout.training_samples(batch, grpo.group_advantages(batch["rewards"], cfg.group_size))
    # completions of 3 and 4 tokens after a 2-token prompt; the kept group learns them, the top-up nothing
    assert [s["loss_mask"] for s in samples] == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0] * 5, [0] * 6]
    advantages = [s["advantage"] for s in samples]
    assert advantages[2:] == [0.0, 0.0] and advantages[0] > 0 > advantages[1]
    # the update's denominator: 7 tokens (token-mean) or 2 sequences (seq-mean), not 18 or 4
    assert rollout.loss_count(samples, [0, 1, 2, 3], "token-mean") == 7
    assert rollout.loss_count(samples, [3, 2, 1, 0], "seq-mean-token-mean") == 2
    assert rollout.loss_count(samples, [2, 3], "seq-mean-token-sum-norm") == 0


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_an_update_with_top_ups_is_the_kept_groups_update(aggregation):
    """The gradient of an update of 6 kept sequences and 2 top-up ones (loss mask 0, zero advantage), in micro-batches
    with the denominator loss_count gives, equals the gradient of the 6 kept sequences alone, KL term included."""
    from nanosrpo import grpo, rollout

    g = torch.Generator().manual_seed(0)
    B, T = 8, 6
    logprobs = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old, ref = logprobs + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64), logprobs - 0.2
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[6:] = 0.0
    lengths = [2, 6, 3, 4, 5, 1, 6, 3]
    mask = torch.tensor([[0] + [int(t < n) for t in range(T - 1)] for n in lengths], dtype=torch.float64)
    mask[6:] = 0.0  # what rollout.training_samples gives a top-up group
    samples = [{"loss_mask": row.long().tolist()} for row in mask]
    kw = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1, aggregation=aggregation, max_len=T)

    lp = logprobs[:6].clone().requires_grad_()
    grpo.policy_loss(lp, old[:6], adv[:6], mask[:6], ref_logprobs=ref[:6], **kw)[0].backward()
    want = lp.grad
    normalizer = float(rollout.loss_count(samples, list(range(B)), aggregation))
    assert normalizer == (float(mask.sum()) if aggregation == "token-mean" else 6.0)
    lp = logprobs.clone().requires_grad_()
    for mb in ([0, 6, 1, 2], [7, 3, 4, 5]):  # top-ups spread over the micro-batches
        loss, _ = grpo.policy_loss(
            lp[mb], old[mb], adv[mb], mask[mb], ref_logprobs=ref[mb], normalizer=normalizer, **kw
        )
        loss.backward()
    torch.testing.assert_close(lp.grad[:6], want)
    assert torch.equal(lp.grad[6:], torch.zeros(2, T, dtype=lp.grad.dtype))


def test_preset_prompt_and_bounds():
    from nanosrpo import prompts

    cfg = config.parse(config.GRPOConfig, ["--preset", "qwen2.5-vl-7b"])
    assert (cfg.max_pixels, cfg.max_prompt_length, cfg.system_prompt) == (501760, 1024, "boxed")
    assert prompts.system_prompt(True, cfg.system_prompt).endswith("write only the final answer as \\boxed{...}.")
    assert prompts.system_prompt(False) == prompts.GRPO_SYSTEM
    with pytest.raises(SystemExit, match="srpo or boxed"):
        prompts.system_prompt(True, "fancy")
