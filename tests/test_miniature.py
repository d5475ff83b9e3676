"""bench/miniature.py's bookkeeping: the table's means and seed ranges, what counts as a finished run, bad --arms."""

import importlib.util
import json

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("miniature", ROOT / "bench" / "miniature.py")
miniature = importlib.util.module_from_spec(spec)
spec.loader.exec_module(miniature)


def _results(path, acc, first=0.5, tokens=100.0):
    path.mkdir(parents=True)
    keys = {
        "accuracy": acc,
        "first_accuracy": first,
        "wrong_to_right": 0.1,
        "right_to_wrong": 0.05,
        "format_rate": 1.0,
        "mean_response_tokens": tokens,
    }
    (path / "results.json").write_text(json.dumps(keys))


def test_table_means_and_seed_ranges(tmp_path):
    _results(tmp_path / "eval" / "base" / "greedy", 0.5)
    for seed, acc in ((0, 0.6), (1, 0.8)):
        _results(tmp_path / "eval" / f"grpo-s{seed}" / "greedy", acc, tokens=100 + seed)
        _results(tmp_path / "eval" / f"grpo-s{seed}" / "sampled", acc - 0.1)
    table = miniature.report(tmp_path, ["grpo", "srpo"], [0, 1], {"rl grpo-s0": 60.0, "rl grpo-s1": 180.0})
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert set(rows) == {miniature.LABELS["base"], miniature.LABELS["grpo"]}  # srpo has no evals yet: no row
    grpo = rows[miniature.LABELS["grpo"]]
    assert "| 2 | 0.700 (0.600–0.800) |" in grpo  # two seeds: mean (min–max)
    assert "| 100 (100–101) |" in grpo  # tokens as integers
    assert "| 0.600 (0.500–0.700) | 2.0 |" in grpo  # sampled accuracy, then mean RL minutes (1 and 3)
    assert "| 1 | 0.500 |" in rows[miniature.LABELS["base"]]
    assert json.loads((tmp_path / "results.json").read_text())["results"]["grpo"]["greedy"][1]["accuracy"] == 0.8


def test_a_run_counts_as_finished_only_with_its_marker(tmp_path):
    (tmp_path / "checkpoint-10" / "policy").mkdir(parents=True)
    (tmp_path / "checkpoint-20" / "policy").mkdir(parents=True)
    assert miniature.final_policy(tmp_path) is None  # checkpoints of an interrupted run: resume it, don't evaluate it
    (tmp_path / "DONE").write_text("finished\n")
    assert miniature.final_policy(tmp_path) == tmp_path / "checkpoint-20" / "policy"


def test_unknown_arm_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="unknown --arms"):
        miniature.main(["--arms", "srpo,spro", "--out_dir", str(tmp_path)])
