"""The paper's experiment in miniature: base vs GRPO vs SFT-only vs SRPO (+ the Table 4 ablations), on the tiny world.

    python bench/miniature.py                          # everything (about 30 min on a 2-core CPU); resumes if rerun
    python bench/miniature.py --seeds 0 --arms srpo    # a subset
    python bench/miniature.py --report_only true       # redraw the table and figures from what is there

Each stage is the project's own script with its own defaults, run as a child process (its output passes through):
  base      the tiny base policy (stands in for the pretrained Instruct model)          tiny.ensure_policy("base")
  sft-only  base -> curate.py (its own attempts, oracle reflections, 30/70) -> train_sft.py
            (tiny.ensure_policy(reflect_data="curated"), cached in the tiny world like the base)
  RL arms, one run per seed, the same RL budget (--rl_steps, 30 by default; --rl_lr, 5e-5) at the paper's sampling
  temperature 1.0, otherwise train_grpo.py's defaults:
    grpo          base     -> train_grpo.py --reward_variant grpo (one-round prompt)
    srpo          sft-only -> train_grpo.py (the paper's reward)
    srpo_no_eff   sft-only -> train_grpo.py --use_effectiveness false
    srpo_no_len   sft-only -> train_grpo.py --use_length false
    srpo_code     sft-only -> train_grpo.py --reward_variant code (the released code's reward)
    default       (only if asked for) the README's main command: sft-only -> train_grpo.py with no flags at all
                  (its own steps and temperature, see config.GRPOConfig)
  evaluate.py on the held-out split for base, sft-only and every RL run: greedy, and 4 samples at temperature 1.0.
Then <out_dir>/table.md (mean and range over seeds), results.json, and figures/*.png (training dynamics, GRPO vs SRPO).

Resuming: a finished stage leaves its outputs (a trained policy, an eval's results.json) and is skipped on a rerun; an
interrupted RL run continues from its last checkpoint (train_grpo.py --resume), an interrupted eval from its
predictions.jsonl. Wall times per stage accumulate in <out_dir>/times.json.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nanosrpo import config, tiny  # noqa: E402

ARMS = {  # arm -> (starting policy, train_grpo.py flags, evaluate.py prompt)
    "grpo": ("base", ["--reward_variant", "grpo"], "grpo"),
    "srpo": ("sft-only", [], "srpo"),
    "srpo_no_eff": ("sft-only", ["--use_effectiveness", "false"], "srpo"),
    "srpo_no_len": ("sft-only", ["--use_length", "false"], "srpo"),
    "srpo_code": ("sft-only", ["--reward_variant", "code"], "srpo"),
    "default": ("sft-only", [], "srpo"),
}
LABELS = {
    "base": "base (one round)",
    "sft-only": "SFT-only (curated cold start)",
    "grpo": "GRPO (base, one round)",
    "srpo": "SRPO (curated cold start)",
    "srpo_no_eff": "SRPO w/o I_eff",
    "srpo_no_len": "SRPO w/o f_len",
    "srpo_code": "SRPO, released code's reward",
    "default": "SRPO, train_grpo.py's defaults (the default run)",
}


@dataclass
class MiniatureConfig:
    out_dir: str = field(default="out/miniature", metadata={"help": "runs, evals, table.md, figures/ go here"})
    cache_dir: str = field(default="out/tiny", metadata={"help": "the tiny world (shared with the default run)"})
    seeds: str = field(default="0,1,2", metadata={"help": "RL seeds, comma-separated"})
    arms: str = field(
        default=",".join(a for a in ARMS if a != "default"),  # the default run only when asked for
        metadata={"help": f"RL arms, comma-separated, of: {', '.join(ARMS)}"},
    )
    rl_steps: int = field(
        default=30, metadata={"help": "GRPO steps per RL run, the same for every arm (0: train_grpo.py's default)"}
    )
    rl_lr: float = field(
        default=5e-5,
        metadata={
            "help": "GRPO learning rate of every RL arm (the arms were compared at 5e-5, the T 1.0 setting; "
            "the default run's 2e-5 is tuned for T 0.7)"
        },
    )
    n_samples: int = field(default=4, metadata={"help": "sampled responses per eval problem (temperature 1.0)"})
    report_only: bool = field(default=False, metadata={"help": "only (re)write table.md and the figures"})


def run(cmd: list[str], what: str) -> None:
    print(f"\n=== {what}: {' '.join(str(c) for c in cmd)}", flush=True)
    subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, check=True)


class Times:
    """Wall seconds per stage, accumulated over invocations (a resumed stage adds its remaining time)."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds = json.loads(path.read_text()) if path.exists() else {}

    def timed(self, name: str, fn) -> None:
        t0 = time.time()
        fn()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - t0
        self.path.write_text(json.dumps(self.seconds, indent=1) + "\n")
        print(f"=== {name}: done ({self.seconds[name] / 60:.1f} min in all)", flush=True)


def final_policy(run_dir: Path) -> Path | None:
    """The policy a finished train_grpo.py run saved last (None while the run is unfinished)."""
    if not (run_dir / "DONE").exists():
        return None
    ckpts = sorted(run_dir.glob("checkpoint-*/policy"), key=lambda p: int(p.parent.name.split("-")[1]))
    return ckpts[-1]


def evaluate(policy: Path, prompt: str, out: Path, cfg: MiniatureConfig, times: Times, name: str) -> None:
    """evaluate.py greedy and sampled (n_samples at temperature 1.0) on the tiny held-out split; skips what is done."""
    for mode, flags in (("greedy", []), ("sampled", ["--temperature", "1.0", "--n_samples", cfg.n_samples])):
        if not (out / mode / "results.json").exists():
            cmd = [
                "evaluate.py",
                "--model",
                policy,
                "--prompt",
                prompt,
                "--cache_dir",
                cfg.cache_dir,
                "--out_dir",
                out / mode,
                *flags,
            ]
            times.timed(f"eval {name} {mode}", lambda: run(cmd, f"evaluate {name} ({mode})"))


def main(argv=None):
    cfg = config.parse(MiniatureConfig, argv)
    seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    arms = [a.strip() for a in cfg.arms.split(",") if a.strip()]
    if unknown := [a for a in arms if a not in ARMS]:
        raise SystemExit(f"unknown --arms {unknown}; known: {', '.join(ARMS)}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    times = Times(out / "times.json")
    if not cfg.report_only:
        os.environ.setdefault("TQDM_MININTERVAL", "5")  # children's progress bars: a line every 5 s, not a flood
        # ---- the starting policies (cached in the tiny world, built once)
        starts = {}
        for name, stage, data in (("base", "base", "synthetic"), ("sft-only", "reflect", "curated")):
            times.timed(
                f"build {name}",
                lambda: starts.__setitem__(name, tiny.ensure_policy(cfg.cache_dir, stage=stage, reflect_data=data)),
            )
        for name, prompt in (("base", "grpo"), ("sft-only", "srpo")):
            evaluate(Path(starts[name]), prompt, out / "eval" / name, cfg, times, name)
        # ---- the RL arms, seed-major: a partial table after one pass already has every arm
        for seed in seeds:
            for arm in arms:
                start, flags, prompt = ARMS[arm]
                run_dir = out / "runs" / f"{arm}-s{seed}"
                if final_policy(run_dir) is None:
                    # every arm but the default run: the same budget, sampled at the paper's temperature
                    budget = (
                        []
                        if arm == "default"
                        else ["--temperature", "1.0", "--lr", cfg.rl_lr]
                        + (["--max_steps", cfg.rl_steps] if cfg.rl_steps else [])
                    )
                    cmd = [
                        "train_grpo.py",
                        "--model",
                        starts[start],
                        "--cache_dir",
                        cfg.cache_dir,
                        "--seed",
                        seed,
                        "--out_dir",
                        run_dir,
                        "--resume",
                        "true",
                        *budget,
                        *flags,
                    ]
                    times.timed(f"rl {arm}-s{seed}", lambda: run(cmd, f"{LABELS[arm]}, seed {seed}"))
                    (run_dir / "DONE").write_text("finished\n")
                evaluate(final_policy(run_dir), prompt, out / "eval" / f"{arm}-s{seed}", cfg, times, f"{arm}-s{seed}")
    print(report(out, arms, seeds, times.seconds))


# ----------------------------------------------------------------------------------------------------- the report
COLUMNS = [  # (results.json key, header): evaluate.py's figures, greedy unless the header says sampled
    ("accuracy", "final acc."),
    ("first_accuracy", "first acc."),
    ("wrong_to_right", "wrong→right"),
    ("right_to_wrong", "right→wrong"),
    ("format_rate", "format"),
    ("mean_response_tokens", "tokens"),
]


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _cell(values: list[float], tokens: bool = False) -> str:
    """mean, and the range over seeds when there are several"""
    fmt = (lambda v: f"{v:.0f}") if tokens else (lambda v: f"{v:.3f}")
    mean = sum(values) / len(values)
    return fmt(mean) if len(values) == 1 else f"{fmt(mean)} ({fmt(min(values))}–{fmt(max(values))})"


def report(out: Path, arms: list[str], seeds: list[int], seconds: dict) -> str:
    """table.md + results.json + figures/ from whatever evals and runs exist; returns the table."""
    rows, results = [], {}
    names = [n for n in ("base", "sft-only") if (out / "eval" / n / "greedy" / "results.json").exists()]
    for name in names + arms:
        runs = [name] if name in names else [f"{name}-s{s}" for s in seeds]
        greedy = [r for r in (_load(out / "eval" / run / "greedy" / "results.json") for run in runs) if r]
        sampled = [r for r in (_load(out / "eval" / run / "sampled" / "results.json") for run in runs) if r]
        if not greedy:
            continue
        results[name] = {"greedy": greedy, "sampled": sampled}
        cells = [_cell([g[k] for g in greedy], tokens=k == "mean_response_tokens") for k, _ in COLUMNS]
        cells.append(_cell([r["accuracy"] for r in sampled]) if sampled else "–")
        rl = [seconds[f"rl {run}"] for run in runs if f"rl {run}" in seconds]
        cells.append(f"{sum(rl) / len(rl) / 60:.1f}" if rl else f"{seconds.get(f'build {name}', 0) / 60:.1f}")
        rows.append(f"| {LABELS[name]} | {len(greedy)} | " + " | ".join(cells) + " |")
    header = (
        "| policy | seeds | " + " | ".join(h for _, h in COLUMNS) + " | sampled final acc. | train min |\n"
        "|---|---:|" + "---:|" * (len(COLUMNS) + 2)
    )
    table = header + "\n" + "\n".join(rows) + "\n"
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"results": results, "seconds": seconds}, indent=1) + "\n")

    from nanosrpo import plots

    runs = {
        LABELS[a]: [
            out / "runs" / f"{a}-s{s}" for s in seeds if (out / "runs" / f"{a}-s{s}" / "metrics.jsonl").exists()
        ]
        for a in ("grpo", "srpo", "default")
        if a in arms
    }
    runs = {k: v for k, v in runs.items() if v}
    if runs:
        fig = out / "figures"
        plots.plot_comparison(
            runs,
            [
                ("reward (sampled)", "reward_mean"),
                ("accuracy (sampled, final)", "accuracy"),
                ("held-out accuracy (greedy)", "eval_accuracy"),
            ],
            fig / "reward_accuracy.png",
        )
        plots.plot_comparison(
            runs,
            [
                ("correct responses: tokens", "correct_length_mean"),
                ("incorrect responses: tokens", "incorrect_length_mean"),
                ("clip ratio (high)", "clip_ratio_high"),
            ],
            fig / "lengths_clip.png",
        )
        two_round = {k: v for k, v in runs.items() if "GRPO" not in k}
        plots.plot_comparison(
            two_round,
            [
                ("wrong→right (sampled)", "wrong_to_right"),
                ("right→wrong (sampled)", "right_to_wrong"),
                ("first-answer accuracy (sampled)", "first_accuracy"),
            ],
            fig / "transitions.png",
        )
    return table


if __name__ == "__main__":
    config.run(main)
