"""The paper's experiment in miniature, on the tiny world: Table 3's arms (and, asked for, Table 4's reward
ablations), each over several pipeline seeds, every RL arm at the learning rate a small sweep picked on validation data.

    python bench/miniature.py                          # everything, resumable: a rerun skips what is finished
    python bench/miniature.py --seeds 0 --arms srpo    # a subset
    python bench/miniature.py --arms srpo,srpo_no_eff,srpo_no_len,srpo_code   # Table 4's ablations
    python bench/miniature.py --report_only true       # redraw the table and figures from what is there

A pipeline seed S varies the whole pipeline, not only RL: the base build (`train_sft.py --stage base --seed S`),
curate.py's sampled attempts (`--seed S`), both SFTs (`--seed S`) and every RL run (`--seed S`). Seed 0 is the
default world's, shared with the main command. Each stage is the project's own script, run as a child process (the
evals: evaluate.py's main() in this process).
Starting policies, per seed (tiny.ensure_policy(..., seed=S), cached in the tiny world like the main command's):
  base      the tiny base (stands in for the pretrained Instruct model)
  cot-sft   plain-CoT SFT: the base trained on the one-round twins of the curated records (a correct attempt as it
            was, a flawed one as the teacher's corrected round), the same records, steps and rate as the cold start
  sft-only  the reflection cold start: the base trained on the curated two-round records (tiny.RECIPE)
RL arms, train_grpo.py from their start with the same budget (--rl_steps at the paper's temperature 1.0):
  cot_grpo     cot-sft   --reward_variant grpo       plain-CoT SFT + GRPO (one-round prompt and reward)
  grpo         base      --reward_variant grpo       GRPO
  two_step     sft-only  --reward_variant two_step   GRPO + two-step thinking (format + final answer only)
  srpo_no_sft  base      the paper's reward          SRPO without the reflection SFT
  srpo         sft-only  the paper's reward          SRPO
  Table 4, only when asked for: srpo_no_eff (--use_effectiveness false), srpo_no_len (--use_length false),
  srpo_code (--reward_variant code); default: the main command's own settings from sft-only (no sweep).
The learning rate: every RL arm runs each of --lrs on the first seed, and each run scores itself greedy on the
validation split at its last step (train_grpo.py's in-run eval; it evaluates only at the start and the end here). That
split is the training questions curate.py keeps out of every SFT's data (its --val_fraction split by question) and RL
trains without (every arm trains on the rest). The best value (ties: the smaller) is the arm's lr on every seed, and its
sweep run is the first seed's table run. The held-out eval split is never used to choose.
Evaluation: evaluate.py on the held-out split, greedy and --n_samples at temperature 1.0.
Writes <out_dir>/table.md (Table 3's layout: mean and range over seeds, what RL added over its own start, the
comparisons stated), results.json, lr_sweep.json, times.json (wall seconds per stage) and figures/*.png.
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nanosrpo import config, tiny  # noqa: E402

STARTS = {"base": ("base", "grpo"), "cot-sft": ("cot", "grpo"), "sft-only": ("reflect", "srpo")}  # stage, prompt
ARMS = {  # arm -> (starting policy, train_grpo.py flags, evaluate.py prompt)
    "cot_grpo": ("cot-sft", ["--reward_variant", "grpo"], "grpo"),
    "grpo": ("base", ["--reward_variant", "grpo"], "grpo"),
    "two_step": ("sft-only", ["--reward_variant", "two_step"], "srpo"),
    "srpo_no_sft": ("base", [], "srpo"),
    "srpo": ("sft-only", [], "srpo"),
    "srpo_no_eff": ("sft-only", ["--use_effectiveness", "false"], "srpo"),
    "srpo_no_len": ("sft-only", ["--use_length", "false"], "srpo"),
    "srpo_code": ("sft-only", ["--reward_variant", "code"], "srpo"),
    "default": ("sft-only", [], "srpo"),
}
TABLE3 = ["cot_grpo", "grpo", "two_step", "srpo_no_sft", "srpo"]  # the default --arms
ORDER = ["base", "cot-sft", "cot_grpo", "grpo", "two_step", "sft-only", "srpo_no_sft", "srpo"]  # the table's rows
ORDER += ["srpo_no_eff", "srpo_no_len", "srpo_code", "default"]
LABELS = {
    "base": "base (one round)",
    "cot-sft": "plain-CoT SFT",
    "cot_grpo": "plain-CoT SFT + GRPO",
    "grpo": "GRPO (from the base)",
    "two_step": "GRPO + two-step thinking (cold start, no reflection rewards)",
    "sft-only": "reflection SFT only (the cold start)",
    "srpo_no_sft": "SRPO without the reflection SFT",
    "srpo": "**SRPO** (cold start + reflection-aware GRPO)",
    "srpo_no_eff": "SRPO w/o I_eff",
    "srpo_no_len": "SRPO w/o f_len",
    "srpo_code": "SRPO, the released code's reward",
    "default": "SRPO, train_grpo.py's defaults (the main command)",
}
# The paper's Qwen2.5-VL-7B averages, for orientation only (a 7B model on real benchmarks, not this task): the two
# figures the issue that asked for this table quotes from Table 3; its other rows were not reachable from here.
PAPER_7B = {"base": 44.4, "sft-only": 46.6}
# The comparisons the table states: (a, b, what a beyond b would mean)
COMPARISONS = [
    ("sft-only", "base", "the reflection cold start helps on its own"),
    ("cot-sft", "base", "plain-CoT SFT on the same attempts helps on its own"),
    ("sft-only", "cot-sft", "the reflection format is worth more than the same data as plain CoT"),
    ("srpo", "grpo", "SRPO beats GRPO"),
    ("srpo", "cot_grpo", "SRPO beats plain-CoT SFT + GRPO"),
    ("srpo", "two_step", "the reflection rewards (I_ref, I_eff, f_len) matter beyond two-step thinking"),
    ("srpo", "srpo_no_sft", "the reflection SFT matters to SRPO"),
    ("srpo", "sft-only", "SRPO's RL adds to its cold start"),
]


@dataclass
class MiniatureConfig:
    out_dir: str = field(default="out/miniature", metadata={"help": "runs, evals, table.md, figures/ go here"})
    cache_dir: str = field(default="out/tiny", metadata={"help": "the tiny world (shared with the default run)"})
    seeds: str = field(default="0,1,2", metadata={"help": "pipeline seeds, comma-separated (the first runs the sweep)"})
    arms: str = field(default=",".join(TABLE3), metadata={"help": f"RL arms, comma-separated, of: {', '.join(ARMS)}"})
    rl_steps: int = field(default=30, metadata={"help": "GRPO steps of every RL run (0: train_grpo.py's default)"})
    lrs: str = field(
        default="2e-5,5e-5,1e-4",
        metadata={"help": "learning rates swept per RL arm on the first seed (one value: no sweep)"},
    )
    n_samples: int = field(default=2, metadata={"help": "sampled responses per eval problem (temperature 1.0)"})
    report_only: bool = field(default=False, metadata={"help": "only (re)write table.md and the figures"})


def run(cmd: list, what: str) -> None:
    print(f"\n=== {what}: {' '.join(str(c) for c in cmd)}", flush=True)
    tiny.run_child([sys.executable, *cmd], what, cwd=REPO)


class Times:
    """Wall seconds per stage, accumulated over invocations (a resumed stage adds its remaining time)."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds = json.loads(path.read_text()) if path.exists() else {}

    def timed(self, name: str, fn):
        t0 = time.time()
        result = fn()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - t0
        self.path.write_text(json.dumps(self.seconds, indent=1) + "\n")
        print(f"=== {name}: done ({self.seconds[name] / 60:.1f} min in all)", flush=True)
        return result


def final_policy(run_dir: Path) -> Path | None:
    """The policy a finished train_grpo.py run saved last (None while the run is unfinished)."""
    if not (run_dir / "DONE").exists():
        return None
    ckpts = sorted(run_dir.glob("checkpoint-*/policy"), key=lambda p: int(p.parent.name.split("-")[1]))
    return ckpts[-1]


def write_splits(cache_dir: str, out: Path) -> dict[str, Path]:
    """The RL training questions split by question as curate.py splits its SFT records (curate.is_val, its default
    --val_fraction): rl_train.jsonl (every RL arm trains on it) and val.jsonl (the sweep's judge, in no SFT's data).
    Image paths are made absolute, so the files can live in out_dir."""
    import curate

    fraction = config.CurateConfig.val_fraction
    train = Path(tiny.ensure_world(cache_dir)["train"])
    paths = {"train": out / "data" / "rl_train.jsonl", "val": out / "data" / "val.jsonl"}
    if all(p.exists() for p in paths.values()):
        return paths
    paths["train"].parent.mkdir(parents=True, exist_ok=True)
    lines = {"train": [], "val": []}
    for line in train.read_text().splitlines():
        rec = json.loads(line)
        images = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
        rec["image"] = [str((train.parent / p).resolve()) for p in images]
        lines["val" if curate.is_val(rec["id"], fraction) else "train"].append(json.dumps(rec))
    for name, p in paths.items():
        p.write_text("\n".join(lines[name]) + "\n")
    return paths


def evaluate(policy, prompt: str, out: Path, cfg, times: Times, name: str) -> None:
    """evaluate.py on the held-out split, greedy and n_samples at temperature 1.0; skips what is done.

    Unlike the other stages, in this process (evaluate.py's main()): the 48 evals of a full table are seconds each,
    and a child's start-up (imports, about 3 s) would add minutes. It changes no result: main() seeds its own
    sampling, as a child would."""
    for mode, flags in [("greedy", []), ("sampled", ["--temperature", "1.0", "--n_samples", cfg.n_samples])]:
        if not (out / mode / "results.json").exists():
            argv = ["--model", policy, "--prompt", prompt, "--cache_dir", cfg.cache_dir, "--out_dir", out / mode]
            argv = [str(a) for a in [*argv, *flags]]
            print(f"\n=== evaluate {name} ({mode}): evaluate.py {' '.join(argv)}", flush=True)
            times.timed(f"eval {name} {mode}", lambda: evaluate_script().main(argv))


def evaluate_script():
    """evaluate.py as a module, loaded from its file (`import evaluate` could find Hugging Face's library instead)."""
    import importlib.util

    if "nanosrpo_evaluate" not in sys.modules:
        spec = importlib.util.spec_from_file_location("nanosrpo_evaluate", REPO / "evaluate.py")
        sys.modules["nanosrpo_evaluate"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["nanosrpo_evaluate"])
    return sys.modules["nanosrpo_evaluate"]


def run_name(arm: str, lr, seed: int) -> str:
    """The folder name of one RL run in runs/: the default run has no swept lr."""
    return f"{arm}-s{seed}" if arm == "default" else f"{arm}-lr{lr:g}-s{seed}"


def rl_run(arm: str, start: str, lr, seed: int, splits: dict, cfg, out: Path, times: Times) -> Path:
    """One train_grpo.py run of `arm` from `start` (resumed if interrupted); the path of its final policy."""
    _, flags, _ = ARMS[arm]
    name = run_name(arm, lr, seed)
    run_dir = out / "runs" / name
    if final_policy(run_dir) is None:
        cmd = ["train_grpo.py", "--model", start, "--cache_dir", cfg.cache_dir, "--seed", seed, "--out_dir", run_dir]
        cmd += ["--resume", "true", *flags]
        if arm != "default":  # the same budget for every arm, sampled at the paper's temperature, on rl_train
            cmd += ["--temperature", "1.0", "--lr", lr, "--data", splits["train"], "--eval_data", splits["val"]]
            # the whole validation split, greedy, at the start and the last step only: the last is the sweep's judge
            cmd += ["--eval_size", len(Path(splits["val"]).read_text().splitlines())]
            cmd += ["--max_steps", cfg.rl_steps, "--eval_every", cfg.rl_steps] if cfg.rl_steps else []
        times.timed(f"rl {name}", lambda: run(cmd, f"{LABELS[arm]}, lr {lr}, seed {seed}"))
        (run_dir / "DONE").write_text("finished\n")
    return final_policy(run_dir)


def final_val_accuracy(run_dir: Path) -> float:
    """The greedy accuracy on the validation split that a finished run logged at its last step (train_grpo.py's
    in-run eval: the same decoding and scoring as evaluate.py, on the whole split, so no second pass is needed)."""
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_accuracy" in r]
    return evals[-1]["eval_accuracy"]


def choose_lr(arm: str, lrs: list[float], seed: int, starts: dict, splits: dict, cfg, out: Path, times: Times):
    """The sweep: the arm at every lr on `seed`, each judged by its greedy accuracy on the validation split at its
    last step; the best (ties: the smaller). Recorded in out/lr_sweep.json."""
    if arm == "default":
        return None
    start = ARMS[arm][0]
    scores = {}
    for lr in lrs if len(lrs) > 1 else []:
        rl_run(arm, starts[start, seed], lr, seed, splits, cfg, out, times)
        scores[lr] = final_val_accuracy(out / "runs" / run_name(arm, lr, seed))
    best = max(lrs, key=lambda lr: (scores[lr], -lr)) if scores else lrs[0]
    sweep_path = out / "lr_sweep.json"
    sweep = json.loads(sweep_path.read_text()) if sweep_path.exists() else {}
    sweep[arm] = {"seed": seed, "val_accuracy": {f"{lr:g}": v for lr, v in scores.items()}, "chosen": best}
    sweep_path.write_text(json.dumps(sweep, indent=1) + "\n")
    return best


def main(argv=None):
    cfg = config.parse(MiniatureConfig, argv)
    seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    arms = [a.strip() for a in cfg.arms.split(",") if a.strip()]
    if unknown := [a for a in arms if a not in ARMS]:
        raise SystemExit(f"unknown --arms {unknown}; known: {', '.join(ARMS)}")
    lrs = sorted(float(v) for v in cfg.lrs.split(",") if v.strip())
    if not seeds or not lrs:
        raise SystemExit("--seeds and --lrs need at least one value each")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    times = Times(out / "times.json")
    if not cfg.report_only:
        os.environ.setdefault("TQDM_MININTERVAL", "5")  # children's progress bars: a line every 5 s, not a flood
        splits = write_splits(cfg.cache_dir, out)
        starts, chosen = {}, {}
        for seed in seeds:  # seed-major: after the first seed's pass the table has every row
            # ---- the starting policies of this pipeline seed (cached in the tiny world), evaluated as rows
            for name, (stage, prompt) in STARTS.items():
                starts[name, seed] = times.timed(
                    f"build {name}-s{seed}", lambda: tiny.ensure_policy(cfg.cache_dir, stage=stage, seed=seed)
                )
                evaluate(starts[name, seed], prompt, out / "eval" / f"{name}-s{seed}", cfg, times, f"{name}-s{seed}")
            # ---- the RL arms; the first seed sweeps each arm's lr on the validation split first
            for arm in arms:
                if arm not in chosen:
                    chosen[arm] = choose_lr(arm, lrs, seed, starts, splits, cfg, out, times)
                start, _, prompt = ARMS[arm]
                policy = rl_run(arm, starts[start, seed], chosen[arm], seed, splits, cfg, out, times)
                evaluate(policy, prompt, out / "eval" / f"{arm}-s{seed}", cfg, times, f"{arm}-s{seed}")
    print(report(out, arms, seeds, times.seconds))


# ----------------------------------------------------------------------------------------------------- the report
def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _cell(values: list[float], scale: float = 1.0, signed: bool = False) -> str:
    """mean, and the range over seeds when there are several"""
    fmt = (lambda v: f"{v * scale:+.1f}") if signed else (lambda v: f"{v:.3f}")
    if not values:
        return "–"
    mean = sum(values) / len(values)
    return fmt(mean) if len(values) == 1 else f"{fmt(mean)} ({fmt(min(values))} to {fmt(max(values))})"


def compare(a: dict[int, float], b: dict[int, float]) -> str:
    """Whether a is ahead of b beyond the spread of the pipeline seeds: the seed ranges do not overlap ("beyond the
    spread"); a is ahead on every seed but the ranges overlap ("on every seed, within the spread"); or neither."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return ""
    diffs = [a[s] - b[s] for s in seeds]
    mean = 100 * sum(diffs) / len(diffs)
    lo_a, hi_a, lo_b, hi_b = min(a.values()), max(a.values()), min(b.values()), max(b.values())
    if len(seeds) < 2:
        verdict = "one seed, so no spread to judge it by"
    elif lo_a > hi_b:
        verdict = "yes, beyond the spread of the seeds (the ranges do not overlap)"
    elif hi_a < lo_b:
        verdict = "no: the opposite, beyond the spread of the seeds"
    elif all(d > 0 for d in diffs):
        verdict = f"ahead on all {len(seeds)} seeds, but within the spread (the ranges overlap)"
    elif all(d < 0 for d in diffs):
        verdict = f"no: behind on all {len(seeds)} seeds, within the spread"
    else:
        verdict = "no difference beyond the spread of the seeds"
    per_seed = ", ".join(f"{100 * d:+.1f}" for d in diffs)
    return f"{mean:+.1f} points on average (per seed: {per_seed}): {verdict}"


def report(out: Path, arms: list[str], seeds: list[int], seconds: dict) -> str:
    """table.md + results.json + figures/ from whatever evals and runs exist; returns the table."""
    greedy, sampled, results = {}, {}, {}
    for name in [n for n in ORDER if n in STARTS or n in arms]:
        g = {s: _load(out / "eval" / f"{name}-s{s}" / "greedy" / "results.json") for s in seeds}
        p = {s: _load(out / "eval" / f"{name}-s{s}" / "sampled" / "results.json") for s in seeds}
        greedy[name] = {s: r["accuracy"] for s, r in g.items() if r}
        sampled[name] = {s: r["accuracy"] for s, r in p.items() if r}
        results[name] = {"greedy": {s: r for s, r in g.items() if r}, "sampled": {s: r for s, r in p.items() if r}}
    sweep = _load(out / "lr_sweep.json") or {}
    rows = []
    for name, acc in greedy.items():
        if not acc:
            continue
        start = ARMS[name][0] if name in ARMS else None
        added = [acc[s] - greedy[start][s] for s in acc if start and s in greedy[start]]
        first = [results[name]["greedy"][s]["first_accuracy"] for s in acc]
        r2w = [results[name]["greedy"][s]["right_to_wrong"] for s in acc]
        lr = sweep.get(name, {}).get("chosen", "–") if name in ARMS else "–"
        cells = [
            LABELS[name],
            start or "–",
            f"{PAPER_7B[name]}" if name in PAPER_7B else "–",
            str(len(acc)),
            _cell(list(acc.values())),
            _cell(list(sampled[name].values())),
            _cell(added, 100, signed=True) if added else "–",
            _cell(first),
            _cell(r2w),
            f"{lr:g}" if isinstance(lr, float) else str(lr),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    header = (
        "| arm | starts from | paper, 7B avg. | seeds | held-out greedy final acc. | sampled final acc. (T 1.0) "
        "| RL added (points) | greedy first acc. | greedy right→wrong | lr |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header, *rows, "", "Comparisons (held-out greedy final accuracy, paired by pipeline seed):", ""]
    for a, b, claim in COMPARISONS:
        if text := compare(greedy.get(a, {}), greedy.get(b, {})):
            lines.append(f"- {LABELS[a]} vs {LABELS[b]} ({claim}?): {text}.")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(
        json.dumps({"results": results, "lr_sweep": sweep, "seconds": seconds}, indent=1) + "\n"
    )
    plot(out, arms, seeds, sweep)
    return table


def plot(out: Path, arms: list[str], seeds: list[int], sweep: dict) -> None:
    """figures/: training dynamics of the table's runs, GRPO against SRPO (and the default run if there)."""
    from nanosrpo import plots

    def dirs(arm):
        if arm != "default" and arm not in sweep:
            return []
        lr = sweep.get(arm, {}).get("chosen")
        runs = [out / "runs" / run_name(arm, lr, s) for s in seeds]
        return [d for d in runs if (d / "metrics.jsonl").exists()]

    def plain(arm):  # the label without its markdown
        return LABELS[arm].replace("**", "")

    runs = {plain(a): dirs(a) for a in ("grpo", "two_step", "srpo", "default") if a in arms}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return
    fig = out / "figures"
    panels = [
        ("reward (sampled)", "reward_mean"),
        ("accuracy (sampled, final)", "accuracy"),
        ("validation accuracy (greedy)", "eval_accuracy"),
    ]
    plots.plot_comparison(runs, panels, fig / "reward_accuracy.png")
    panels = [
        ("correct responses: tokens", "correct_length_mean"),
        ("incorrect responses: tokens", "incorrect_length_mean"),
        ("clip ratio (high)", "clip_ratio_high"),
    ]
    plots.plot_comparison(runs, panels, fig / "lengths_clip.png")
    two_round = {k: v for k, v in runs.items() if k != plain("grpo")}
    panels = [
        ("wrong→right (sampled)", "wrong_to_right"),
        ("right→wrong (sampled)", "right_to_wrong"),
        ("first-answer accuracy (sampled)", "first_accuracy"),
    ]
    plots.plot_comparison(two_round, panels, fig / "transitions.png")


if __name__ == "__main__":
    config.run(main)
