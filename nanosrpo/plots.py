"""Training-dynamics figures from metrics.jsonl (the paper's Fig. 3/4 panels), with matplotlib as an optional extra.

    python -m nanosrpo.plots out/run            # writes out/run/dynamics.png
"""

import json
import sys
from pathlib import Path

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


def plot_run(out_dir: str | Path) -> Path | None:
    """Draw the panels to out_dir/dynamics.png; returns the path, or None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib is not installed (pip install matplotlib); skipping figures")
        return None
    rows = read_metrics(Path(out_dir) / "metrics.jsonl")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), label=k, marker="." if k.startswith("eval") else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_dir) / "dynamics.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(plot_run(sys.argv[1] if len(sys.argv) > 1 else "out/run"))
