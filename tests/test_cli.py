"""A user's mistake on the command line is one clear line and a non-zero exit, never a traceback."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from nanosrpo import config
from tests.conftest import ROOT


def run(*argv):
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    return p.returncode, lines


@pytest.mark.parametrize("script", ["train_grpo.py", "train_sft.py", "curate.py", "evaluate.py"])
def test_mistyped_flag(script):
    code, lines = run(script, "--lrr", "1e-3")
    assert code != 0 and not any("Traceback" in line for line in lines)
    assert lines[-1] == "unknown option(s) ['--lrr', '1e-3']; see --help"


@pytest.mark.parametrize("script", ["train_grpo.py", "train_sft.py"])
def test_missing_data_file(script, tiny_dir, tmp_path):
    missing = tmp_path / "nope.jsonl"
    no_eval = ["--eval_data", ""] if script == "train_grpo.py" else []
    code, lines = run(
        script, "--model", str(tiny_dir), "--data", str(missing), *no_eval, "--out_dir", str(tmp_path / "out")
    )
    assert code == 2 and not any("Traceback" in line for line in lines)
    assert lines[-1] == f"error: {missing}: data file not found"


def test_bad_record_names_file_line_and_field(tiny_dir, tmp_path):
    bad = tmp_path / "rl.jsonl"
    bad.write_text(
        json.dumps({"id": "a", "question": "q", "answer": "1"}) + "\n" + json.dumps({"id": "b", "question": "q"}) + "\n"
    )
    code, lines = run(
        "train_grpo.py",
        "--model",
        str(tiny_dir),
        "--data",
        str(bad),
        "--eval_data",
        "",
        "--out_dir",
        str(tmp_path / "out"),
    )
    assert code == 2 and not any("Traceback" in line for line in lines)
    assert lines[-1] == f"error: {bad}:2: field 'answer' is missing or empty"


def test_a_failing_child_ends_the_parent_in_one_line():
    """tiny.ensure_policy and bench/miniature.py run the scripts as children: a child's failure is its own line, then
    one line from the parent naming the command, and no CalledProcessError traceback."""
    child = "import sys; sys.exit('error: the child says why')"
    parent = "from nanosrpo import config, tiny; import sys; "
    parent += f"config.run(lambda: tiny.run_child([sys.executable, '-c', {child!r}], 'the child'))"
    code, lines = run("-c", parent)
    assert code == 1 and not any("Traceback" in line for line in lines)
    assert lines[-2] == "error: the child says why"
    assert lines[-1].startswith("error: the child failed with exit status 1 (its own message is above): ")


def test_missing_model_directory(tmp_path):
    code, lines = run(
        "train_grpo.py",
        "--model",
        str(tmp_path / "no-model"),
        "--data",
        "x.jsonl",
        "--eval_data",
        "",
        "--out_dir",
        str(tmp_path / "out"),
    )
    assert code == 2 and not any("Traceback" in line for line in lines)
    assert lines[-1] == f"error: model '{tmp_path / 'no-model'}': no such directory"


# ------------------------------------------------------------------------------------------------ nonsense values
CLASSES = [config.GRPOConfig, config.SFTConfig, config.CurateConfig, config.EvalConfig]


def test_every_numeric_option_has_a_range():
    """A new numeric option gets a line in config.RANGES (or a reason not to); a RANGES entry names a real option."""
    numeric = {f.name for cls in CLASSES for f in dataclasses.fields(cls) if f.type in (int, float, "int", "float")}
    assert numeric - set(config.RANGES) == set()
    assert set(config.RANGES) - numeric == set()


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("preset", [[], ["--preset", "qwen2.5-vl-7b"]])
def test_defaults_and_presets_pass(cls, preset):
    config.parse(cls, preset)


@pytest.mark.parametrize(
    "cls, argv, line",
    [
        (config.GRPOConfig, ["--group_size", "0"], "--group_size must be at least 1, got 0"),
        (config.GRPOConfig, ["--micro_batch_size", "-2"], "--micro_batch_size must be at least 1, got -2"),
        (config.GRPOConfig, ["--filter_high", "1.5"], "--filter_high must be in [0, 1], got 1.5"),
        (
            config.GRPOConfig,
            ["--filter_low", "0.9", "--filter_high", "0.1"],
            "--filter_low 0.9 is above --filter_high 0.1: no group could pass",
        ),
        (
            config.GRPOConfig,
            ["--temperature", "0"],
            "--temperature must be above 0 (rollouts are sampled and scored at it), got 0",
        ),
        (
            config.GRPOConfig,
            ["--min_pixels", "1000", "--max_pixels", "10"],
            "--min_pixels 1000 is above --max_pixels 10",
        ),
        (config.GRPOConfig, ["--lr", "nan"], "--lr must be a finite number, got nan"),
        (config.GRPOConfig, ["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1), got 1"),
        (config.GRPOConfig, ["--eval_size", "0"], "--eval_size must be at least 1, got 0"),
        (config.GRPOConfig, ["--preset", "qwen2.5-vl-7b", "--top_p", "0"], "--top_p must be in (0, 1], got 0"),
        (config.GRPOConfig, ["--group_size", "two"], "argument --group_size: invalid int value: 'two'; see --help"),
        (config.SFTConfig, ["--grad_accum", "0"], "--grad_accum must be at least 1, got 0"),
        (config.SFTConfig, ["--warmup_ratio", "2"], "--warmup_ratio must be in [0, 1], got 2"),
        (config.SFTConfig, ["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (config.CurateConfig, ["--samples_per_question", "0"], "--samples_per_question must be at least 1, got 0"),
        (
            config.CurateConfig,
            ["--temperature", "0"],
            "--temperature must be above 0 for sampled attempts (or pass --greedy true), got 0",
        ),
        (config.EvalConfig, ["--n_samples", "0"], "--n_samples must be at least 1, got 0"),
        (
            config.EvalConfig,
            ["--n_samples", "4"],
            "--n_samples > 1 needs --temperature > 0 (greedy decoding gives the same response every time)",
        ),
    ],
)
def test_nonsense_values_are_refused_in_one_line(cls, argv, line):
    with pytest.raises(SystemExit) as e:
        config.parse(cls, argv)
    assert e.value.code == line


def test_zero_group_size_ends_in_one_line():
    code, lines = run("train_grpo.py", "--group_size", "0")
    assert code != 0 and lines == ["--group_size must be at least 1, got 0"]


# --------------------------------------------------------------------------------------------- one run per out_dir
def hold(out_dir):
    """A child process that claims out_dir, as a running script does, and keeps it until killed."""
    code = (
        f"import time; from nanosrpo import log; log.lock_out_dir({str(out_dir)!r}); print('held', flush=True); "
        "time.sleep(600)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("script", ["train_grpo.py", "train_sft.py", "curate.py", "evaluate.py"])
def test_busy_out_dir_is_refused_naming_the_pid(script, tmp_path):
    out = tmp_path / "run"
    holder = hold(out)
    try:
        code, lines = run(script, "--out_dir", str(out), "--cache_dir", str(tmp_path / "world"))
    finally:
        holder.kill()
        holder.wait()
    line = f"{out} is in use by another run (pid {holder.pid}); wait for it to end or choose another --out_dir"
    assert code != 0 and lines == [line]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # refused before writing anything
    assert not (tmp_path / "world").exists()  # or building anything


def test_a_killed_runs_lock_is_taken_over(tmp_path, monkeypatch):
    from nanosrpo import log

    out = tmp_path / "run"
    holder = hold(out)
    monkeypatch.setenv("RANK", "1")  # the other processes of a launch never claim (nor refuse) the folder
    log.lock_out_dir(out)
    monkeypatch.delenv("RANK")
    holder.kill()  # SIGKILL: no handler of its own runs; the kernel drops its flock
    holder.wait()
    assert (out / ".lock").read_text().strip() == str(holder.pid)  # the stale file stays, naming a dead pid
    log.lock_out_dir(out)
    log.lock_out_dir(out)  # again in this process: already ours
    assert (out / ".lock").read_text().strip() == str(os.getpid())
