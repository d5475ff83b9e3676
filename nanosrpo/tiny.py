"""The embedded default: the tiny offline world, built on first use and cached.

`accelerate launch train_grpo.py` with no arguments must run with no network, so every piece of the usual pipeline has a
tiny stand-in made here: a random Qwen2.5-VL-architecture policy + tokenizer (model.build_tiny), and the synthetic
grid-counting task (synthetic.py) written as real JSONL + PNG datasets. Building takes seconds; later runs reuse it.

Layout under cache_dir/<size>[-text]/:
  init/                  random-init policy (save_pretrained)
  data/train.jsonl       RL records            data/eval.jsonl   held-out eval records
  data/sft_base.jsonl    one-round chains of thought (stand-in for the pretrained Instruct model's skills)
  data/sft_reflect.jsonl two-round oracle responses (the reflection cold start, ~30% correct / 70% flawed)
"""

import shutil
import time
from pathlib import Path

from nanosrpo import model, prompts, synthetic

N_TRAIN, N_EVAL, N_SFT = 4000, 200, 8000
TRAIN_SEED, EVAL_SEED, SFT_SEED = 1, 2, 3  # disjoint seeds: eval problems are never trained on


def world_dir(cache_dir: str, size: str, text_only: bool) -> Path:
    return Path(cache_dir) / (f"{size}-text" if text_only else size)


def ensure_world(cache_dir: str, size: str = "1m", text_only: bool = False, difficulty: int = 1) -> dict[str, str]:
    """Build (once) and return the paths of the tiny world. Call on one process at a time (main_process_first)."""
    root = world_dir(cache_dir, size, text_only)
    paths = {
        "root": str(root),
        "init": str(root / "init"),
        "train": str(root / "data" / "train.jsonl"),
        "eval": str(root / "data" / "eval.jsonl"),
        "sft_base": str(root / "data" / "sft_base.jsonl"),
        "sft_reflect": str(root / "data" / "sft_reflect.jsonl"),
    }
    if (root / "DONE").exists():
        return paths
    t0 = time.time()
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    info = model.build_tiny(tmp / "init", size=size, text_only=text_only)
    d = tmp / "data"
    synthetic.write_rl_split(d, "train", N_TRAIN, TRAIN_SEED, difficulty, text_only)
    synthetic.write_rl_split(d, "eval", N_EVAL, EVAL_SEED, difficulty, text_only)
    synthetic.write_sft_split(d, "sft_base", N_SFT, SFT_SEED, prompts.GRPO_SYSTEM, difficulty, False, text_only=text_only)
    synthetic.write_sft_split(d, "sft_reflect", N_SFT, SFT_SEED, prompts.SRPO_SYSTEM, difficulty, True, text_only=text_only)
    (tmp / "DONE").write_text(f"params={info['params']} seconds={time.time() - t0:.1f}\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)  # atomic: a half-built world is never mistaken for a finished one
    return paths


# The tiny recipe (measured: README "The tiny world"): the base learns to read the grid (vision tower trained too: it
# starts random, unlike a pretrained ViT) to a first-attempt accuracy that leaves RL room; the cold start then teaches
# the two-round reflection format on top of it.
RECIPE = {
    "base": ["--max_steps", "400", "--lr", "3e-3", "--freeze_vision", "false"],
    "reflect": ["--max_steps", "600", "--lr", "3e-3", "--freeze_vision", "false"],
}


def ensure_policy(cache_dir: str, size: str = "1m", text_only: bool = False, stage: str = "reflect") -> str:
    """Path of the tiny world's base (stage="base") or reflection-SFT (stage="reflect") policy, trained on first use.

    base    = the random init trained on data/sft_base.jsonl (one-round chains): the stand-in for a pretrained model
    reflect = base trained on data/sft_reflect.jsonl (two-round oracle responses): the reflection cold start
    Each is `python train_sft.py --stage STAGE` with the RECIPE's flags, run in a child process, cached as
    <world>/base and <world>/reflect (save_pretrained dirs; the runs' metrics.jsonl and run.json stay in
    <world>/<stage>-run). Delete those to rebuild. Call on one process at a time (accelerator.main_process_first()).
    """
    import os
    import subprocess
    import sys

    from nanosrpo.checkpoint import latest_checkpoint

    if stage not in ("base", "reflect"):
        raise ValueError(f"stage must be 'base' or 'reflect', got {stage!r}")
    cache_dir = str(Path(cache_dir).resolve())  # the child runs in the repo root
    root = world_dir(cache_dir, size, text_only)
    dest = root / stage
    if (dest / "config.json").exists():
        return str(dest)
    ensure_world(cache_dir, size, text_only)
    if stage == "reflect":
        ensure_policy(cache_dir, size, text_only, stage="base")
    repo = Path(__file__).resolve().parent.parent
    run_dir, tmp = root / f"{stage}-run", root / f"{stage}-run.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # The child must train single-process even when we run under `accelerate launch` / torchrun: without their
    # variables it does not try to join our process group. (The OMP_NUM_THREADS=1 they export does not starve it:
    # a single CPU process takes every core, see model.use_cpu_cores.)
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    cmd = [sys.executable, str(repo / "train_sft.py"), "--stage", stage, "--cache_dir", cache_dir, "--tiny_size", size,
           "--text_only", str(text_only), "--out_dir", str(tmp), *RECIPE[stage]]
    print(f"building the tiny {stage} policy (once, cached in {dest}): {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=repo, env=env, check=True)
    ckpt = latest_checkpoint(tmp)
    shutil.rmtree(run_dir, ignore_errors=True)
    tmp.rename(run_dir)
    (run_dir / ckpt.name / "policy").rename(dest)  # atomic: dest appears complete or not at all
    for done in run_dir.glob("checkpoint-*"):  # optimizer states etc.: nobody resumes a finished tiny run
        shutil.rmtree(done, ignore_errors=True)
    return str(dest)
