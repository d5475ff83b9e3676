"""What a run writes next to its outputs: one JSON line of metrics per step, and the facts that decided the run.

Public API (shared by train_sft.py and train_grpo.py; keep it small and stable):
  MetricsWriter(out_dir, enabled=True, resume_step=None)   .write(dict) appends one line to out_dir/metrics.jsonl
                                                            (a fresh run starts the file anew, a resumed one keeps
                                                            the lines up to resume_step)
  write_run_info(out_dir, cfg, **extra)                     writes out_dir/run.json: config, seed, versions, git
                                                            commit, sha256 of data files, start time
  lock_out_dir(out_dir)                                     claims out_dir for this run (every script, first thing
                                                            before it writes there); a busy one ends in one line

Only the main process writes: callers pass enabled=accelerator.is_main_process (write_run_info is called on the main
process only). Nothing here ever fails a run for the sake of bookkeeping (a missing git, say).
"""

import datetime
import fcntl
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import asdict, is_dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class MetricsWriter:
    """Append-only metrics.jsonl: one JSON object per line, flushed at once so `tail -f` and a killed run see it all.

    A fresh run (resume_step=None) starts an empty file. A run that continues from a checkpoint passes that
    checkpoint's step: the lines logged up to it are kept, the ones the dead run wrote after it are dropped (those
    steps are about to be redone), so the file always reads as one run.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._f = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self._f = open(self.path, "a")

    def write(self, metrics: dict) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps(metrics, default=_jsonable) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return float("inf")  # a half-written last line of a killed run: drop it


def _jsonable(x):
    """Tensors and numpy scalars become numbers; anything else its str()."""
    if hasattr(x, "item"):
        return x.item()
    return str(x)


_held = {}  # out_dir -> the open .lock file whose flock this process holds (until it exits)


def lock_out_dir(out_dir: str | Path) -> None:
    """Claim out_dir for this run, or end in one line naming the run that has it: two runs writing into one folder
    interleave (and truncate) each other's metrics.jsonl and overwrite each other's checkpoints.

    The claim is an flock on out_dir/.lock, which holds the owner's pid for that line. The kernel drops an flock when
    its holder exits, however it exits, so a killed run leaves nothing locked (its .lock is then just a file, taken
    over by the next run: --resume works). Held until the process exits; claiming a folder this process already holds
    does nothing. Under a launcher only rank 0 claims: the other processes of a run are that run.
    """
    if os.environ.get("RANK", "0") != "0":
        return
    key = Path(out_dir).resolve()
    if key in _held:
        return
    key.mkdir(parents=True, exist_ok=True)
    f = open(key / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise SystemExit(
            f"{out_dir} is in use by another run (pid {pid}); wait for it to end or choose another --out_dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[key] = f


def sha256_of(path: str | Path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_commit(repo: str | Path = REPO_ROOT) -> str | None:
    """The repo's HEAD commit (+ '-dirty' with uncommitted changes), or None without git or commits. Never raises."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "vllm"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            pass
    return out


def write_run_info(out_dir: str | Path, cfg, **extra) -> Path:
    """Write out_dir/run.json: everything a run decided, so a result can be traced back to what produced it.

    cfg: the script's config dataclass. extra: anything else worth keeping (world size, resolved model path, ...);
    values of keys named `data`/`*_data`/`*_file` that are existing files are recorded with their sha256 as well.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    data_hashes = {}
    for key, value in extra.items():
        if (key == "data" or key.endswith(("_data", "_file"))) and isinstance(value, (str, Path)):
            data_hashes[str(value)] = sha256_of(value)
    info = {
        "config": config,
        "seed": config.get("seed"),
        "versions": versions(),
        "git_commit": git_commit(),
        "data_sha256": data_hashes,
        "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    path = out_dir / "run.json"
    path.write_text(json.dumps(info, indent=2, default=_jsonable) + "\n")
    return path


def rollout_metrics(scores: list[dict]) -> dict:
    """Step metrics from every completion's score dict (reward parts + rewards.outcome + "tokens"), all processes.

    accuracy is the final answer (A2 of a two-round response, A1 of a one-round one); the four reflection
    transitions are fractions of all responses (they add up to two_round_rate). Means over nothing are None.
    """

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    two = [s for s in scores if s["rounds"] == 2]
    n = len(scores)
    totals = [s["total"] for s in scores]
    m = mean(totals)
    out = {
        "responses": n,
        "reward_mean": m,
        "reward_std": (sum((t - m) ** 2 for t in totals) / max(1, n - 1)) ** 0.5,
        **{
            f"reward_{k}": mean(s[k] for s in scores)
            for k in ("format", "accuracy", "reflection", "effectiveness", "length")
        },
        "accuracy": mean(s["final_correct"] for s in scores),
        "first_accuracy": mean(s["first_correct"] for s in scores),
        "format_rate": mean(s["rounds"] > 0 for s in scores),
        "two_round_rate": len(two) / n,
    }
    for name, c1, c2 in (
        ("right_to_right", 1, 1),
        ("wrong_to_right", 0, 1),
        ("right_to_wrong", 1, 0),
        ("wrong_to_wrong", 0, 0),
    ):
        out[name] = sum(s["first_correct"] == c1 and s["final_correct"] == c2 for s in two) / n
    out["response_length_mean"] = mean(s["tokens"] for s in scores)
    out["correct_length_mean"] = mean(s["tokens"] for s in scores if s["final_correct"])
    out["incorrect_length_mean"] = mean(s["tokens"] for s in scores if not s["final_correct"])
    return out


def write_samples(
    out_dir: str | Path, step: int, rec: dict, completions: list[dict], scores: list[dict], k: int = 4
) -> None:
    """Append a few full completions of one prompt with their reward breakdown to samples.jsonl: read what the
    policy actually writes, not just its averages."""
    with open(Path(out_dir) / "samples.jsonl", "a") as f:
        for c, s in list(zip(completions, scores))[:k]:
            f.write(
                json.dumps({"step": step, "id": rec["id"], "answer": rec["answer"], "completion": c["text"], **s})
                + "\n"
            )
