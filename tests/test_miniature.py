"""bench/miniature.py's bookkeeping: the table's means, seed ranges and comparisons, the validation split, the lr
choice, what counts as a finished run, bad --arms."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("miniature", ROOT / "bench" / "miniature.py")
miniature = importlib.util.module_from_spec(spec)
spec.loader.exec_module(miniature)


def _results(path, acc, first=0.5, r2w=0.05):
    path.mkdir(parents=True)
    keys = {"accuracy": acc, "first_accuracy": first, "wrong_to_right": 0.1, "right_to_wrong": r2w}
    (path / "results.json").write_text(json.dumps(keys))


def test_table_means_ranges_gains_and_comparisons(tmp_path):
    accs = {"base": (0.5, 0.7), "sft-only": (0.6, 0.8), "grpo": (0.55, 0.75), "srpo": (0.9, 0.95)}
    for name, per_seed in accs.items():
        for seed, acc in enumerate(per_seed):
            _results(tmp_path / "eval" / f"{name}-s{seed}" / "greedy", acc)
            _results(tmp_path / "eval" / f"{name}-s{seed}" / "sampled", acc - 0.1)
    (tmp_path / "lr_sweep.json").write_text(json.dumps({"srpo": {"chosen": 5e-5}}))
    table = miniature.report(tmp_path, ["grpo", "srpo", "two_step"], [0, 1], {})
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    # no row without an eval (cot-sft, two_step); the rows in Table 3's order
    assert list(rows)[1:] == [miniature.LABELS[n] for n in ("base", "grpo", "sft-only", "srpo")]
    srpo = rows[miniature.LABELS["srpo"]]
    assert "| sft-only | – | 2 | 0.925 (0.900 to 0.950) | 0.825 (0.800 to 0.850) |" in srpo  # mean (min to max)
    assert "| +22.5 (+15.0 to +30.0) |" in srpo  # RL added, per seed: 0.9 - 0.6, 0.95 - 0.8
    assert srpo.endswith("| 5e-05 |")  # the sweep's choice
    assert "| base | – | 2 | 0.650 (0.550 to 0.750) |" in rows[miniature.LABELS["grpo"]]
    assert "| 44.4 | 2 |" in rows[miniature.LABELS["base"]]  # the paper's figure for orientation
    said = {line for line in table.splitlines() if line.startswith("- ")}
    assert any("SRPO beats GRPO" in s and "+27.5" in s and "beyond the spread" in s for s in said)
    assert any("helps on its own" in s and "+10.0" in s and "on all 2 seeds, but within the spread" in s for s in said)
    assert not any("two-step" in s for s in said)  # no eval, no sentence
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["srpo"]["greedy"]["1"]["accuracy"] == 0.95


@pytest.mark.parametrize(
    "a, b, verdict",
    [
        ({0: 0.8, 1: 0.9}, {0: 0.6, 1: 0.7}, "beyond the spread"),
        ({0: 0.6, 1: 0.7}, {0: 0.8, 1: 0.9}, "no: the opposite"),
        ({0: 0.6, 1: 0.9}, {0: 0.5, 1: 0.8}, "ahead on all 2 seeds, but within the spread"),
        ({0: 0.6, 1: 0.8}, {0: 0.7, 1: 0.7}, "no difference beyond the spread"),
        ({0: 0.9}, {0: 0.5}, "one seed, so no spread"),
    ],
)
def test_compare_states_whether_a_gap_is_beyond_the_seeds(a, b, verdict):
    assert verdict in miniature.compare(a, b)


def test_validation_split_is_curates_and_disjoint(tmp_path):
    from nanosrpo import tiny

    root = tiny.world_dir(str(tmp_path / "cache"), "1m", False)
    (root / "data").mkdir(parents=True)
    (root / "DONE").write_text("")
    recs = [{"id": f"q{i}", "question": "?", "image": f"images/q{i}.png", "answer": "1"} for i in range(400)]
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    paths = miniature.write_splits(str(tmp_path / "cache"), tmp_path / "out")
    train, val = ([json.loads(x) for x in paths[k].read_text().splitlines()] for k in ("train", "val"))
    import curate

    assert {r["id"] for r in val} == {r["id"] for r in recs if curate.is_val(r["id"], 0.05)} and 5 < len(val) < 40
    assert len(train) + len(val) == 400 and not {r["id"] for r in train} & {r["id"] for r in val}
    assert val[0]["image"] == [str((root / "data" / "images" / f"{val[0]['id']}.png").resolve())]


def test_the_sweep_picks_the_best_validation_score_ties_to_the_smaller(tmp_path, monkeypatch):
    scores = {1e-5: 0.7, 2e-5: 0.8, 5e-5: 0.8}
    val = tmp_path / "val.jsonl"
    val.write_text("{}\n" * 7)

    def rl_run(arm, start, lr, seed, splits, cfg, out, times):  # train_grpo.py's metrics.jsonl, evals at both ends
        run_dir = out / "runs" / miniature.run_name(arm, lr, seed)
        run_dir.mkdir(parents=True)
        rows = [{"step": 0, "eval_accuracy": 0.9}, {"step": 1, "accuracy": 0.95}]  # the start's score is not the run's
        rows += [{"step": 2, "loss": 0.1, "eval_accuracy": scores[lr]}, {"step": 2, "note": "a line without an eval"}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    monkeypatch.setattr(miniature, "rl_run", rl_run)
    cfg, times = miniature.MiniatureConfig(), miniature.Times(tmp_path / "times.json")
    starts, splits = {("sft-only", 0): "start"}, {"val": val}
    assert miniature.choose_lr("srpo", sorted(scores), 0, starts, splits, cfg, tmp_path, times) == 2e-5
    sweep = json.loads((tmp_path / "lr_sweep.json").read_text())["srpo"]
    assert sweep == {"seed": 0, "val_accuracy": {"1e-05": 0.7, "2e-05": 0.8, "5e-05": 0.8}, "chosen": 2e-5}
    assert miniature.choose_lr("srpo", [3e-5], 0, starts, splits, cfg, tmp_path, times) == 3e-5  # one value: no sweep


def test_rl_runs_eval_the_whole_validation_split_at_both_ends_only(tmp_path, monkeypatch):
    val = tmp_path / "val.jsonl"
    val.write_text("{}\n" * 7)
    ran = []

    def run(cmd, what):  # train_grpo.py, as far as rl_run sees it: its command, and an out_dir
        ran.append([str(c) for c in cmd])
        Path(cmd[cmd.index("--out_dir") + 1]).mkdir(parents=True)

    monkeypatch.setattr(miniature, "run", run)
    monkeypatch.setattr(miniature, "final_policy", lambda run_dir: run_dir / "policy" if ran else None)
    cfg, times = miniature.MiniatureConfig(rl_steps=30), miniature.Times(tmp_path / "times.json")
    miniature.rl_run("srpo", "start", 5e-5, 1, {"train": "t", "val": val}, cfg, tmp_path, times)
    flags = dict(zip(ran[0][1::2], ran[0][2::2]))  # after the script's name: flag value pairs
    assert flags["--eval_size"] == "7" and flags["--eval_every"] == flags["--max_steps"] == "30"
    assert flags["--eval_data"] == str(val) and flags["--lr"] == "5e-05" and flags["--seed"] == "1"


def test_a_run_counts_as_finished_only_with_its_marker(tmp_path):
    (tmp_path / "checkpoint-10" / "policy").mkdir(parents=True)
    (tmp_path / "checkpoint-20" / "policy").mkdir(parents=True)
    assert miniature.final_policy(tmp_path) is None  # checkpoints of an interrupted run: resume it, don't evaluate it
    (tmp_path / "DONE").write_text("finished\n")
    assert miniature.final_policy(tmp_path) == tmp_path / "checkpoint-20" / "policy"


def test_unknown_arm_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="unknown --arms"):
        miniature.main(["--arms", "srpo,spro", "--out_dir", str(tmp_path)])
