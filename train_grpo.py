"""train_grpo.py: reflection-aware GRPO, SRPO's second stage.

    accelerate launch train_grpo.py                                  # the tiny offline world, learns in minutes on CPU
    accelerate launch --config_file accelerate_fsdp.yaml train_grpo.py --preset qwen2.5-vl-7b \
        --model <reflection-SFT checkpoint> --data rl.jsonl          # the paper's run on 8 GPUs

One step, top to bottom:
  1. draw prompts, render them with the SRPO system prompt (images attached)
  2. sample group_size completions per prompt with the engine, keeping the sampled token ids
  3. score each completion with the SRPO reward; group-normalised advantages
  4. (optional) accuracy filter with dynamic sampling: draw more prompts until the batch is full
  5. ppo_epochs x updates of train_batch_size sequences of the clipped policy loss, in micro-batches; AdamW, cosine
  6. sync the new weights into the engine; log, eval, checkpoint
"""

import functools
import math
import time

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from nanosrpo import (
    checkpoint,
    config,
    data,
    engine,
    evaluation,
    forward,
    grpo,
    log,
    model,
    optim,
    prompts,
    rewards,
    rollout,
    tiny,
)


# ----------------------------------------------------------------------------------------------------- setup
def load_policy_and_data(cfg, accelerator, system: str, two_round: bool):
    """(paths, policy, processor, records, eval_records): SRPO starts from the reflection cold start, the GRPO baseline
    from the base policy (the tiny world is built on first use, one process at a time).

    Every record is checked here, on every process, before the first step: a prompt over --max_prompt_length (image
    tokens counted from the images' sizes) or with more images than vLLM takes would otherwise stop one process
    mid-run while the others wait for it in a collective. (Eval prompts are not capped, only vLLM's image count.)
    """
    with accelerator.main_process_first():
        paths = tiny.resolve(cfg, policy="reflect" if two_round else "base")
    policy, processor = model.load_policy(paths["model"], attn_implementation=cfg.attn_implementation)
    model.set_pixel_bounds(processor, cfg.min_pixels, cfg.max_pixels)
    max_images = cfg.vllm_max_images if cfg.engine == "vllm" else 0
    image_dir = cfg.image_dir or None
    records = data.load_rl_records(paths["data"], image_dir, processor, system, cfg.max_prompt_length, max_images)
    eval_records = []
    if paths["eval_data"]:
        eval_records = data.load_rl_records(paths["eval_data"], image_dir, max_images=max_images)[: cfg.eval_size]
    if cfg.freeze_vision and model.is_multimodal(policy):
        model.freeze_vision(policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return paths, policy, processor, records, eval_records


def prepare_training(cfg, accelerator, policy, paths: dict, total_updates: int):
    """(policy, optimizer, scheduler, ref_policy): AdamW, a warmup then cosine schedule over the run's updates, the
    frozen KL reference (None without a KL term), all prepared for this process.

    --fsdp: FSDP2 as accelerate_fsdp.yaml on GPUs, where accelerate would use DDP (CPU); before the optimizer, since
    sharding replaces the parameters, and kept out of accelerator.prepare, which would wrap the policy in DDP.
    """
    fsdp = cfg.fsdp and accelerator.distributed_type != DistributedType.FSDP
    if fsdp:
        policy = model.shard_policy(policy, accelerator)
    params = [p for p in policy.parameters() if p.requires_grad]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * total_updates)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup, total_updates, min_lr_rate=cfg.min_lr_ratio
    )
    if fsdp:
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    ref_policy = None
    if cfg.kl_coef > 0:
        ref_policy = model.load_reference(paths["model"], accelerator, cfg.attn_implementation, fsdp=fsdp)
    return policy, optimizer, scheduler, ref_policy


def srpo_reward(text: str, rec: dict, cfg, tok) -> dict:
    """The SRPO reward of one completion (paper Eqs. 4-8), with the run's variant and ablations; f_len counts policy
    tokens."""
    return rewards.srpo_reward(
        text,
        rec["answer"],
        choices=rec["choices"],
        variant=cfg.reward_variant,
        alpha=cfg.alpha,
        use_effectiveness=cfg.use_effectiveness,
        use_length=cfg.use_length,
        count_tokens=lambda s: len(tok(s, add_special_tokens=False)["input_ids"]),
    )


# ------------------------------------------------------------------------------------------------ step 5: the update
def old_and_ref_logprobs(samples, policy, ref_policy, batches, cfg, accelerator, on_policy: bool) -> None:
    """The update's constant log-probs, into each sample before the first update (data.carried takes them into its
    micro-batches): "old_logprobs", the sampling policy's, unless the loss can take the current ones (on_policy), and
    "ref_logprobs", the frozen reference's, for the KL term. One no-grad pass over all samples each."""
    with torch.no_grad(), accelerator.autocast():
        old = None if on_policy else forward.logprobs_by_sample(policy, batches(samples), cfg.temperature)
        ref = None if ref_policy is None else forward.logprobs_by_sample(ref_policy, batches(samples), cfg.temperature)
    for key, rows in (("old_logprobs", old), ("ref_logprobs", ref)):
        for s, row in zip(samples, rows or []):
            s[key] = row


def update(policy, optimizer, scheduler, samples, batches, cfg, accelerator, step, per_update, on_policy):
    """ppo_epochs passes over the step's samples, each cut into updates of per_update samples: whole groups in a random
    order (mini-batches count prompts, as verl's do). An update accumulates its micro-batches' gradients, then takes
    one AdamW step. Returns (each micro-batch's loss and stats, each update's gradient norm), in order."""
    order_gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    micro, grad_norms = [], []
    for _ in range(cfg.ppo_epochs):
        groups = torch.randperm(len(samples) // cfg.group_size, generator=order_gen).tolist()
        order = [g * cfg.group_size + j for g in groups for j in range(cfg.group_size)]
        for u in range(0, len(order), per_update):
            micro += accumulate_gradients(
                policy, samples, order[u : u + per_update], batches, cfg, accelerator, on_policy
            )
            grad_norms.append(optim.clip_and_step(accelerator, policy, optimizer, scheduler, cfg.max_grad_norm))
    return micro, grad_norms


def accumulate_gradients(policy, samples, update, batches, cfg, accelerator, on_policy: bool) -> list[tuple]:
    """One update's gradient: the policy loss of each micro-batch of samples[update], backward one at a time, each
    over the whole update's denominator, so the sum is exactly the update's loss. Returns [(loss, stats)]."""
    # the aggregation's denominator over the whole update, all processes: its loss tokens or its sequences (top-up
    # groups have none: rollout.training_samples); an update of top-ups alone has loss 0, not 0 / 0
    mine = torch.tensor(float(rollout.loss_count(samples, update, cfg.aggregation)), device=accelerator.device)
    normalizer = max(1.0, accelerator.reduce(mine, "sum").item())
    n_micro = math.ceil(len(update) / cfg.micro_batch_size)  # collated one at a time, as they are used
    out = []
    for j, (_, mb) in enumerate(batches(samples, indices=update)):
        with optim.grad_sync(accelerator, policy, last=j == n_micro - 1), accelerator.autocast():
            loss, stats = micro_batch_loss(policy, mb, cfg, normalizer, on_policy)
            accelerator.backward(loss * accelerator.num_processes)  # DDP/FSDP average gradients: * world sums them
        out.append((loss.item(), stats))
    return out


def micro_batch_loss(policy, mb: dict, cfg, normalizer: float, on_policy: bool):
    """grpo.policy_loss of one micro-batch: its log-probs under the policy, and the advantages and old / reference /
    engine log-probs it carries (data.carried)."""
    lp = forward.sequence_logprobs(policy, mb, temperature=cfg.temperature)
    old = lp.detach() if on_policy else mb["old_logprobs"]  # on-policy: ratio 1, the plain policy gradient
    tis = None  # truncated importance weights min(pi_trainer / pi_engine, cap)
    if cfg.tis_cap > 0:
        tis = (old - mb["engine_logprobs"]).exp().clamp(max=cfg.tis_cap)
    return grpo.policy_loss(
        lp,
        old,
        mb["advantages"],
        mb["loss_mask"],
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        ref_logprobs=mb.get("ref_logprobs"),
        kl_coef=cfg.kl_coef,
        aggregation=cfg.aggregation,
        max_len=cfg.max_new_tokens,
        token_weights=tis,
        normalizer=normalizer,
        ratio_cap=cfg.ratio_cap,
    )


# ------------------------------------------------------------------------------------------------- step 6: the books
def step_metrics(step, batch, samples, micro, grad_norms, lr, accelerator, times) -> dict:
    """The step's row of metrics.jsonl: the rollouts' scores (log.rollout_metrics) and the counts summed over all
    processes, the update's loss (each update's, all its micro-batches and processes, averaged over updates), gradient
    norm, clip / cap / KL statistics (means over micro-batches), and the timings."""
    scores = [s for gs in gather_object([g["scores"] for g in batch["groups"]]) for s in gs]
    tokens = sum(len(s["input_ids"]) for s in samples)
    mine = [sum(loss for loss, _ in micro), batch["filtered"], batch["short"], tokens]
    counts = accelerator.reduce(torch.tensor(mine, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    stats = [s for _, s in micro]
    return {
        "step": step + 1,
        **log.rollout_metrics(scores),
        "loss": counts[0] / len(grad_norms),
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "lr": lr,
        "filtered_groups": int(counts[1]),
        "short_groups": int(counts[2]),
        "time_rollout_s": times["rollout"],
        "time_train_s": times["train"],
        "time_sync_s": times["sync"],
        "tokens_per_s": counts[3] / (time.time() - times["start"]),
        **{
            k: sum(s[k] for s in stats) / len(stats)
            for k in ("clip_ratio_low", "clip_ratio_high", "ratio_capped", "kl")
        },
    }


def show(m: dict, cfg, bar, shown: dict, eval0, accelerator, seconds: float) -> None:
    """The step on the console: the warning of a short dynamic-sampling batch, and the progress bar, which keeps the
    last held-out greedy accuracy (and its gain since step 0) from one eval to the next."""
    if m["short_groups"]:
        accelerator.print(
            f"warning: step {m['step']}: dynamic sampling drew --max_draws {cfg.max_draws} batches and "
            f"still lacked {m['short_groups']} groups that pass the accuracy filter; topped up with "
            f"filtered groups at zero advantage"
        )
    if "eval_accuracy" in m:
        gain = "" if eval0 is None else f" ({m['eval_accuracy'] - eval0:+.3f} vs step 0)"
        shown["eval"] = f"{m['eval_accuracy']:.3f}{gain}"
    bar.update(1)  # by hand, not `for step in bar`: the loop's last step `break`s, and the bar would end at N-1/N
    bar.set_postfix(reward=f"{m['reward_mean']:.2f}", acc=f"{m['accuracy']:.2f}", **shown, s=f"{seconds:.1f}")


def main(argv=None):
    cfg = config.parse(config.GRPOConfig, argv)
    # step_scheduler_with_optimizer=False: we step the schedule once per update (accelerate would step it per process)
    accelerator = Accelerator(
        log_with=cfg.report_to or None, project_dir=cfg.out_dir, step_scheduler_with_optimizer=False
    )
    world = accelerator.num_processes
    if cfg.attn_implementation == "flash_attention_2" and accelerator.mixed_precision not in ("bf16", "fp16"):
        raise SystemExit(
            "--attn_implementation flash_attention_2 needs bf16 mixed precision (flash-attn cannot run the fp32 "
            "policy): accelerate launch --config_file accelerate_fsdp.yaml (or --mixed_precision bf16)"
        )
    model.use_cpu_cores(accelerator, cfg.cpu_threads)
    per_update, updates_per_step = config.grpo_update_plan(cfg, world)  # refuses uneven splits before anything loads
    log.lock_out_dir(cfg.out_dir)  # one run per --out_dir: a second one ends here, naming the first one's pid
    two_round = cfg.reward_variant != "grpo"  # SRPO asks for think/answer/reflection/think/answer; GRPO for one round
    system = prompts.system_prompt(reflection=two_round, style=cfg.system_prompt)

    # ---- the policy, the data, the optimizer and the engine
    paths, policy, processor, records, eval_records = load_policy_and_data(cfg, accelerator, system, two_round)
    # A run is max_steps steps, or (max_steps = 0) as many as `epochs` passes over the data take; the schedule counts
    # the updates of the plain case (dynamic sampling consumes prompts faster and ends the passes sooner).
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * len(records) / cfg.rollout_batch_size)
    policy, optimizer, scheduler, ref_policy = prepare_training(
        cfg, accelerator, policy, paths, max_steps * updates_per_step
    )
    gen = engine.make(cfg, accelerator.unwrap_model(policy), processor, paths["model"])
    reward = functools.partial(srpo_reward, cfg=cfg, tok=data.tokenizer_of(processor))

    start_step, cursor = 0, 0  # cursor: prompt positions consumed per process (see data.prompt_index)
    if cfg.resume and (ckpt := checkpoint.latest_checkpoint(cfg.out_dir)):
        state = checkpoint.load_checkpoint(accelerator, ckpt, model=policy, optimizer=optimizer, scheduler=scheduler)
        start_step, cursor = state["step"], state["cursor"]
        gen.sync(accelerator.unwrap_model(policy))
        accelerator.print(f"resumed from {ckpt} at step {start_step}")
    metrics_log = log.MetricsWriter(cfg.out_dir, enabled=accelerator.is_main_process, resume_step=start_step or None)
    if accelerator.is_main_process:
        log.write_run_info(cfg.out_dir, cfg, data=paths["data"], policy=paths["model"], world_size=world)
    if cfg.report_to:
        accelerator.init_trackers("nanosrpo", config=config.to_dict(cfg))

    # Old log-probs, decided once: with one update per step and no TIS the sampling policy *is* the current one, so
    # the loss takes old = lp.detach() (ratio 1: the plain policy gradient) and no extra forward is spent. Otherwise
    # (several updates per step, or TIS comparing trainer and engine) they come from one no-grad pass before the first
    # update.
    on_policy = updates_per_step == 1 and cfg.tis_cap == 0
    # Micro-batch layout: with sdpa, one copy of each group's prompt (data.shared_batch, nanosrpo.attention: the same
    # log-probs for a fraction of the work); with flash-attn, padding-free rows (data.packed_batch); else padded.
    layout = "shared" if cfg.share_prompts and model.shares_prompts(policy) else "padded"
    layout = "packed" if cfg.attn_implementation == "flash_attention_2" else layout
    batches = functools.partial(
        data.micro_batches, size=cfg.micro_batch_size, processor=processor, layout=layout, device=accelerator.device
    )
    export = checkpoint.export_dtype(cfg.export_dtype, accelerator)
    saving = dict(keep=cfg.keep_checkpoints, optimizer=optimizer, scheduler=scheduler, export_dtype=export)

    shown, eval0 = {}, None  # the bar keeps the last held-out greedy accuracy (and its gain) from one eval to the next
    if start_step == 0 and cfg.eval_every:  # where the policy starts
        m0 = {"step": 0, **evaluation.greedy_eval(gen, eval_records, system, processor, cfg.max_new_tokens)}
        metrics_log.write(m0)
        eval0 = m0["eval_accuracy"]
        shown["eval"] = f"{eval0:.3f}"
    bar = tqdm(desc="grpo", initial=start_step, total=max_steps, disable=not accelerator.is_main_process)
    for step in range(start_step, max_steps):
        t0 = time.time()
        # Seeded per (step, rank): a resumed run samples exactly what the uninterrupted run would have.
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + accelerator.process_index)

        # ---- 1-4. prompts -> groups of completions -> rewards (with dynamic sampling) -> group advantages
        batch = rollout.collect(gen, records, cursor, cfg, reward, system, processor, accelerator)
        cursor = batch["cursor"]
        advantages = grpo.group_advantages(batch["rewards"], cfg.group_size, normalize_std=cfg.normalize_std)
        samples = rollout.training_samples(batch, advantages)  # prompt + completion ids, loss mask, advantage
        gen.sleep()  # vLLM sleep mode (GPU): free the KV cache and offload its weights while the trainer works
        t_rollout = time.time() - t0

        # ---- 5. the update: ppo_epochs x updates of per_update sequences, each in micro-batches of policy_loss
        t1 = time.time()
        policy.train()  # generate() runs in eval mode; gradient checkpointing runs only in train mode
        old_and_ref_logprobs(samples, policy, ref_policy, batches, cfg, accelerator, on_policy)
        micro, grad_norms = update(
            policy, optimizer, scheduler, samples, batches, cfg, accelerator, step, per_update, on_policy
        )
        if accelerator.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the allocator's cached blocks back before vLLM wakes up and claims memory
        t_train = time.time() - t1

        # ---- 6. sync the engine, then log, eval, checkpoint
        t_sync = gen.sync(accelerator.unwrap_model(policy))
        times = {"start": t0, "rollout": t_rollout, "train": t_train, "sync": t_sync}
        m = step_metrics(step, batch, samples, micro, grad_norms, scheduler.get_last_lr()[0], accelerator, times)
        last = step + 1 == max_steps or (not cfg.max_steps and cursor * world >= cfg.epochs * len(records))
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
            m.update(evaluation.greedy_eval(gen, eval_records, system, processor, cfg.max_new_tokens))
        metrics_log.write(m)
        if cfg.report_to:
            accelerator.log(m, step=step + 1)
        show(m, cfg, bar, shown, eval0, accelerator, time.time() - t0)
        if accelerator.is_main_process and cfg.samples_every and step % cfg.samples_every == 0:
            g = batch["groups"][0]
            log.write_samples(cfg.out_dir, step + 1, g["rec"], g["completions"], g["scores"])
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last:  # 0: only the final one
            checkpoint.save_checkpoint(
                accelerator, policy, processor, cfg.out_dir, step + 1, {"cursor": cursor}, **saving
            )
        if last:  # max_steps, or `epochs` passes over the data (dynamic sampling gets there in fewer steps)
            break

    bar.close()
    metrics_log.close()
    if accelerator.is_main_process and cfg.plot:
        from nanosrpo import plots

        plots.plot_run(cfg.out_dir)
    if cfg.report_to:  # closes the trackers (not called otherwise: it would tear down the process group under vLLM)
        accelerator.end_training()


if __name__ == "__main__":
    config.run(main)
