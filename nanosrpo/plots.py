"""Training-dynamics figures from metrics.jsonl (the paper's Figs. 3-8), with matplotlib as an optional extra.

    python -m nanosrpo.plots out/run            # writes out/run/dynamics.png

Per-step training metrics come from 64 sampled rollouts and swing by several points from step to step, so every
curve is drawn twice: the raw points faintly, and a rolling mean over `SMOOTH` steps on top, where a trend shows.
"""

import json
import sys
from pathlib import Path

SMOOTH = 10  # steps in the rolling mean

PANELS = [  # (title, [metric keys]) : one subplot each
    ("reward", ["reward_mean"]),
    ("accuracy", ["accuracy", "first_accuracy", "eval_accuracy"]),
    ("response length (tokens)", ["correct_length_mean", "incorrect_length_mean", "response_length_mean"]),
    ("reflection transitions", ["wrong_to_right", "right_to_wrong"]),
    ("clip ratio", ["clip_ratio_low", "clip_ratio_high"]),
    ("policy loss", ["loss"]),
]


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rolling_mean(values: list[float], window: int = SMOOTH) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start):
    out[i] = mean(values[max(0, i-window+1):i+1])."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping the steps that did not log it (eval_* are logged every eval_every)."""
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib is not installed (pip install matplotlib); skipping figures")
        return None
    return plt


def _draw(ax, steps, values, label, color=None, points=False):
    """Eval points (a few, each over the whole held-out set) as dots and lines; training metrics raw + smoothed."""
    if points:
        ax.plot(steps, values, marker="o", label=label, color=color)
        return
    line = ax.plot(steps, values, alpha=0.25, linewidth=0.8, color=color)[0]
    ax.plot(steps, rolling_mean(values), label=label, color=line.get_color())


def plot_run(out_dir: str | Path) -> Path | None:
    """Draw the panels to out_dir/dynamics.png; returns the path, or None (with a note) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = read_metrics(Path(out_dir) / "metrics.jsonl")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for k in keys:
            steps, values = series(rows, k)
            if steps:
                evals = k.startswith("eval")
                _draw(ax, steps, values, k if evals else f"{k} ({SMOOTH}-step mean)", points=evals)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_dir) / "dynamics.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def plot_comparison(
    arms: dict[str, list[Path]], panels: list[tuple[str, str]], out_path: Path, title: str = ""
) -> Path | None:
    """One panel per (title, metric key); one curve per arm: the metric averaged over the arm's runs (seeds) step by
    step, drawn as `_draw` does. arms: label -> run directories (each with a metrics.jsonl)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (panel, key) in zip(axes[0], panels):
        for i, (label, dirs) in enumerate(arms.items()):
            per_step: dict[int, list[float]] = {}
            for d in dirs:
                for s, v in zip(*series(read_metrics(Path(d) / "metrics.jsonl"), key)):
                    per_step.setdefault(s, []).append(v)
            if per_step:
                steps = sorted(per_step)
                _draw(
                    ax,
                    steps,
                    [sum(per_step[s]) / len(per_step[s]) for s in steps],
                    label,
                    color=f"C{i}",
                    points=key.startswith("eval"),
                )
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=70)
    plt.close(fig)
    return out_path


if __name__ == "__main__":
    print(plot_run(sys.argv[1] if len(sys.argv) > 1 else "out/run"))
