"""train_grpo.py: reflection-aware GRPO, SRPO's second stage.

    accelerate launch train_grpo.py                                  # the tiny offline world, learns in minutes on CPU
    accelerate launch --config_file accelerate_fsdp.yaml train_grpo.py --preset qwen2.5-vl-7b \
        --model <reflection-SFT checkpoint> --data rl.jsonl          # the paper's run on 8 GPUs

One step, top to bottom (DESIGN.md's data flow):
  1. sample prompts, render them with the SRPO system prompt (images attached)
  2. generate group_size completions per prompt with the engine, keeping the sampled token ids
  3. score each completion with the SRPO reward; group-normalised advantages
  4. (optional) accuracy filter with dynamic sampling: draw more prompts until the batch is full
  5. old log-probs, then ppo_epochs x mini-batches of the clipped policy loss, AdamW, cosine schedule
  6. sync the new weights into the engine; log, eval, checkpoint
"""

import math
import time
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from nanosrpo import checkpoint, config, data, engine, evaluation, grpo, log, model, prompts, rewards, tiny


def main(argv=None):
    cfg = config.parse(config.GRPOConfig, argv)
    # step_scheduler_with_optimizer=False: we step the schedule once per update (accelerate would step it per process)
    acc = Accelerator(log_with=cfg.report_to or None, project_dir=cfg.out_dir, step_scheduler_with_optimizer=False)
    rank, world = acc.process_index, acc.num_processes
    model.use_cpu_cores(acc, cfg.cpu_threads)
    if cfg.rollout_batch_size % world or cfg.train_batch_size % world:
        raise SystemExit(f"rollout_batch_size and train_batch_size must be divisible by the {world} processes")
    two_round = cfg.reward != "grpo"  # SRPO asks for think/answer/reflection/think/answer; the GRPO baseline for one round
    system = prompts.system_prompt(reflection=two_round)

    # ---- the policy and the data (the tiny world is built on first use, one process at a time)
    with acc.main_process_first():
        if config.TINY in (cfg.model, cfg.data, cfg.eval_data):
            world_paths = tiny.ensure_world(cfg.cache_dir, cfg.tiny_size, cfg.text_only)
        policy_path = cfg.model
        if cfg.model == config.TINY:  # SRPO starts from the reflection cold start; the GRPO baseline from the base model
            stage = "reflect" if two_round else "base"
            policy_path = tiny.ensure_policy(cfg.cache_dir, cfg.tiny_size, cfg.text_only, stage=stage)
        data_path = world_paths["train"] if cfg.data == config.TINY else cfg.data
        eval_path = world_paths["eval"] if cfg.eval_data == config.TINY else cfg.eval_data
        records = data.load_rl_records(data_path, cfg.image_dir or None)
        eval_records = data.load_rl_records(eval_path, cfg.image_dir or None)[: cfg.eval_size] if eval_path else []
    policy, processor = model.load_policy(policy_path)
    tok = data.tokenizer_of(processor)
    if cfg.freeze_vision and model.is_multimodal(policy):
        model.freeze_vision(policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_policy = None
    if cfg.kl_coef > 0:  # only then is a frozen copy of the initial policy loaded at all
        ref_policy = model.load_policy(policy_path)[0].requires_grad_(False).eval().to(acc.device)

    seqs_per_rank = cfg.rollout_batch_size // world * cfg.group_size
    per_update = cfg.train_batch_size // world
    updates_per_step = max(1, seqs_per_rank // per_update) * cfg.ppo_epochs
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * len(records) / cfg.rollout_batch_size)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    total_updates = max_steps * updates_per_step
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, math.ceil(cfg.warmup_ratio * total_updates), total_updates, min_lr_rate=cfg.min_lr_ratio
    )
    policy, optimizer, scheduler = acc.prepare(policy, optimizer, scheduler)
    gen = engine.make(cfg, acc.unwrap_model(policy), processor, policy_path)

    start_step, cursor = 0, 0  # cursor: prompt positions consumed per process (see data.prompt_index)
    if cfg.resume and (ckpt := checkpoint.latest_checkpoint(cfg.out_dir)):
        state = checkpoint.load_checkpoint(acc, ckpt)
        start_step, cursor = state["step"], state["cursor"]
        gen.sync(acc.unwrap_model(policy))
        acc.print(f"resumed from {ckpt} at step {start_step}")
    metrics_log = log.MetricsWriter(cfg.out_dir, enabled=acc.is_main_process, resume_step=start_step if start_step else None)
    if acc.is_main_process:
        log.write_run_info(cfg.out_dir, cfg, data=data_path, policy=policy_path, world_size=world)
    if cfg.report_to:
        acc.init_trackers("nanosrpo", config=config.to_dict(cfg))

    def count_tokens(text: str) -> int:  # f_len measures length in policy tokens
        return len(tok(text, add_special_tokens=False)["input_ids"])

    if start_step == 0 and cfg.eval_every:  # where the policy starts
        metrics_log.write({"step": 0, **evaluation.greedy_eval(gen, eval_records, system, processor, cfg.max_new_tokens)})
    bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, disable=not acc.is_main_process)
    for step in bar:
        t0 = time.time()
        # Seeded per (step, rank): a resumed run samples exactly what the uninterrupted run would have.
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)

        # ---- 1-4. rollouts: prompts -> completions -> rewards -> advantages, with optional dynamic sampling
        quota = cfg.rollout_batch_size // world
        kept, dropped = [], []
        for _ in range(cfg.max_draws):
            batch = [records[data.prompt_index((cursor + i) * world + rank, len(records), cfg.seed)] for i in range(quota)]
            cursor += quota
            prompt_batch = [data.render_prompt(rec, system, processor) for rec in batch]
            outs = gen.generate(prompt_batch, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                logprobs=cfg.is_cap > 0)
            for rec, prompt, group in zip(batch, prompt_batch, outs):
                scored = [  # the SRPO reward breakdown + what happened (rounds, first/final answer correct)
                    {**rewards.srpo_reward(c["text"], rec["answer"], count_tokens, cfg.reward, cfg.alpha, rec["choices"],
                                           cfg.use_effectiveness, cfg.use_length),
                     **rewards.outcome(c["text"], rec["answer"], rec["choices"]), "tokens": len(c["ids"])}
                    for c in group
                ]
                g = {"rec": rec, "prompt": prompt, "completions": group, "scores": scored}
                keep = not cfg.filter_accuracy or grpo.keep_group(
                    [s["total"] for s in scored], [s["final_correct"] for s in scored], cfg.filter_low, cfg.filter_high
                )
                (kept if keep else dropped).append(g)
            # every process draws until all have a full batch: processes must run the same number of updates
            if not cfg.filter_accuracy or acc.gather(torch.tensor([int(len(kept) >= quota)], device=acc.device)).all():
                break
        filtered = len(dropped)
        groups = (kept + dropped)[:quota]  # a short batch is topped up with filtered groups, their advantages zeroed
        rewards_t = torch.tensor([s["total"] for g in groups for s in g["scores"]])
        advantages = grpo.group_advantages(rewards_t, cfg.group_size, normalize_std=cfg.normalize_std)
        for i, g in enumerate(groups):
            if i >= len(kept):
                advantages[i * cfg.group_size : (i + 1) * cfg.group_size] = 0.0
        samples = [
            {"input_ids": g["prompt"]["ids"] + c["ids"], "loss_mask": [0] * len(g["prompt"]["ids"]) + [1] * len(c["ids"]),
             "images": g["prompt"]["images"], "engine_lp": torch.tensor([0.0] * len(g["prompt"]["ids"]) + (c["logprobs"] or []))}
            for g in groups for c in g["completions"]
        ]
        gen.sleep()  # vLLM sleep mode (GPU): free the KV cache and offload its weights while the trainer works
        t_rollout = time.time() - t0

        # ---- 5. the policy update: old log-probs, then ppo_epochs x mini-batches x micro-batches of policy_loss
        t1 = time.time()
        micro = lambda idx: {k: v.to(acc.device) for k, v in data.collate(processor, [samples[i] for i in idx]).items()}  # noqa: E731
        in_order = lambda: (micro(range(s, min(s + cfg.micro_batch_size, len(samples)))) for s in range(0, len(samples), cfg.micro_batch_size))  # noqa: E731
        old_lp = ref_lp = None
        with acc.autocast():
            # off-policy after the first update (or to compare with the engine): the sampling policy's log-probs
            if updates_per_step > 1 or cfg.is_cap > 0:
                old_lp = grpo.logprobs_by_sample(policy, in_order(), cfg.temperature)
            if ref_policy is not None:
                ref_lp = grpo.logprobs_by_sample(ref_policy, in_order(), cfg.temperature)
        order_gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        losses, stats_all, grad_norms = [], [], []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(samples), generator=order_gen).tolist()
            for u in range(0, len(order), per_update):
                update = order[u : u + per_update]
                chunks = [update[s : s + cfg.micro_batch_size] for s in range(0, len(update), cfg.micro_batch_size)]
                for j, idx in enumerate(chunks):
                    b = micro(idx)
                    sync_grads = j == len(chunks) - 1  # DDP: all-reduce gradients once per update, not per micro-batch
                    with nullcontext() if sync_grads else acc.no_sync(policy), acc.autocast():
                        lp = grpo.sequence_logprobs(policy, b, temperature=cfg.temperature)
                        width = lp.shape[1]
                        # on-policy (one update per step): old = current, ratio = 1, the loss is the plain policy gradient
                        old = lp.detach() if old_lp is None else grpo.stack_rows([old_lp[i] for i in idx], width).to(lp.device)
                        ref = None if ref_lp is None else grpo.stack_rows([ref_lp[i] for i in idx], width).to(lp.device)
                        tis = None
                        if cfg.is_cap > 0:  # truncated importance weights min(pi_trainer / pi_engine, cap)
                            engine_lp = grpo.stack_rows([samples[i]["engine_lp"] for i in idx], width).to(lp.device)
                            tis = (old - engine_lp).exp().clamp(max=cfg.is_cap)
                        loss, stats = grpo.policy_loss(
                            lp, old, advantages[idx].to(acc.device), b["loss_mask"], cfg.clip_low, cfg.clip_high,
                            ref, cfg.kl_coef, cfg.aggregation, max_len=cfg.max_new_tokens, token_weights=tis,
                        )
                        acc.backward(loss * len(idx) / len(update))  # micro-batch means, weighted into the update's mean
                    losses.append(loss.item())
                    stats_all.append(stats)
                grad_norms.append(acc.clip_grad_norm_(params, cfg.max_grad_norm).item())
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        t_train = time.time() - t1

        # ---- 6. sync the engine, then log
        t_sync = gen.sync(acc.unwrap_model(policy))
        m = {"step": step + 1, **log.rollout_metrics([s for gs in gather_object([g["scores"] for g in groups]) for s in gs])}
        m.update(
            loss=sum(losses) / len(losses),
            grad_norm=sum(grad_norms) / len(grad_norms),
            lr=scheduler.get_last_lr()[0],
            filtered_groups=acc.gather(torch.tensor([filtered], device=acc.device)).sum().item(),
            time_rollout_s=t_rollout,
            time_train_s=t_train,
            time_sync_s=t_sync,
            tokens_per_s=acc.gather(torch.tensor([sum(len(s["input_ids"]) for s in samples)], device=acc.device)).sum().item()
            / (time.time() - t0),
            **{k: sum(s[k] for s in stats_all) / len(stats_all) for k in ("clip_ratio_low", "clip_ratio_high", "kl")},
        )
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == max_steps):
            m.update(evaluation.greedy_eval(gen, eval_records, system, processor, cfg.max_new_tokens))
        metrics_log.write(m)
        if cfg.report_to:
            acc.log(m, step=step + 1)
        bar.set_postfix(reward=f"{m['reward_mean']:.2f}", acc=f"{m['accuracy']:.2f}", s=f"{time.time() - t0:.1f}")
        if acc.is_main_process and cfg.samples_every and step % cfg.samples_every == 0:
            log.write_samples(cfg.out_dir, step + 1, groups[0]["rec"], groups[0]["completions"], groups[0]["scores"])
        if (step + 1) % cfg.save_every == 0 or step + 1 == max_steps:
            checkpoint.save_checkpoint(acc, policy, processor, cfg.out_dir, step + 1, {"cursor": cursor}, cfg.keep_checkpoints)

    metrics_log.close()
    if acc.is_main_process and cfg.plot:
        from nanosrpo import plots

        plots.plot_run(cfg.out_dir)
    if cfg.report_to:  # closes the trackers (not called otherwise: it would tear down the process group under vLLM)
        acc.end_training()


if __name__ == "__main__":
    main()
