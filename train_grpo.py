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

import math
import time

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from nanosrpo import checkpoint, config, data, engine, evaluation, forward, grpo, log, model, optim, prompts, rewards, rollout, tiny


def main(argv=None):
    cfg = config.parse(config.GRPOConfig, argv)
    # step_scheduler_with_optimizer=False: we step the schedule once per update (accelerate would step it per process)
    accelerator = Accelerator(log_with=cfg.report_to or None, project_dir=cfg.out_dir, step_scheduler_with_optimizer=False)
    world = accelerator.num_processes
    if cfg.attn_implementation == "flash_attention_2" and accelerator.mixed_precision not in ("bf16", "fp16"):
        raise SystemExit("--attn_implementation flash_attention_2 needs bf16 mixed precision (flash-attn cannot run the "
                         "fp32 policy): accelerate launch --config_file accelerate_fsdp.yaml (or --mixed_precision bf16)")
    model.use_cpu_cores(accelerator, cfg.cpu_threads)
    per_update, updates_per_step = config.grpo_update_plan(cfg, world)  # refuses uneven splits before anything loads
    two_round = cfg.reward_variant != "grpo"  # SRPO asks for think/answer/reflection/think/answer; GRPO for one round
    system = prompts.system_prompt(reflection=two_round, style=cfg.system_prompt)

    # ---- the policy and the data (the tiny world is built on first use, one process at a time)
    with accelerator.main_process_first():  # SRPO starts from the reflection cold start; the GRPO baseline from base
        paths = tiny.resolve(cfg, policy="reflect" if two_round else "base")
    policy, processor = model.load_policy(paths["model"], attn_implementation=cfg.attn_implementation)
    model.set_pixel_bounds(processor, cfg.min_pixels, cfg.max_pixels)
    # Every record is checked here, on every process, before the first step: a prompt over --max_prompt_length (image
    # tokens counted from the images' sizes) or with more images than vLLM takes would otherwise stop one process
    # mid-run while the others wait for it in a collective. (Eval prompts are not capped, only vLLM's image count.)
    max_images = cfg.vllm_max_images if cfg.engine == "vllm" else 0
    records = data.load_rl_records(paths["data"], cfg.image_dir or None, processor, system, cfg.max_prompt_length,
                                   max_images)
    eval_records = (data.load_rl_records(paths["eval_data"], cfg.image_dir or None, max_images=max_images)
                    [: cfg.eval_size] if paths["eval_data"] else [])
    tok = data.tokenizer_of(processor)
    if cfg.freeze_vision and model.is_multimodal(policy):
        model.freeze_vision(policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # A run is max_steps steps, or (max_steps = 0) as many as `epochs` passes over the data take; the schedule counts
    # the updates of the plain case (dynamic sampling consumes prompts faster and ends the passes sooner).
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * len(records) / cfg.rollout_batch_size)
    # --fsdp: FSDP2 as accelerate_fsdp.yaml on GPUs, where accelerate would use DDP (CPU); before the optimizer, since
    # sharding replaces the parameters, and kept out of accelerator.prepare, which would wrap the policy in DDP
    fsdp = cfg.fsdp and accelerator.distributed_type != DistributedType.FSDP
    if fsdp:
        policy = model.shard_policy(policy, accelerator)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    total_updates = max_steps * updates_per_step
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, math.ceil(cfg.warmup_ratio * total_updates), total_updates, min_lr_rate=cfg.min_lr_ratio
    )
    if fsdp:
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    ref_policy = (model.load_reference(paths["model"], accelerator, cfg.attn_implementation, fsdp=fsdp)
                  if cfg.kl_coef > 0 else None)
    gen = engine.make(cfg, accelerator.unwrap_model(policy), processor, paths["model"])

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

    def reward(text: str, rec: dict) -> dict:  # the SRPO reward of one completion (paper Eqs. 4-8)
        return rewards.srpo_reward(
            text, rec["answer"], choices=rec["choices"], variant=cfg.reward_variant, alpha=cfg.alpha,
            use_effectiveness=cfg.use_effectiveness, use_length=cfg.use_length,
            count_tokens=lambda s: len(tok(s, add_special_tokens=False)["input_ids"]),  # f_len counts policy tokens
        )

    # Old log-probs, decided once: with one update per step and no TIS the sampling policy *is* the current one, so the
    # loss takes old = lp.detach() (ratio 1: the plain policy gradient) and no extra forward is spent. Otherwise (several
    # updates per step, or TIS comparing trainer and engine) they come from one no-grad pass before the first update.
    on_policy = updates_per_step == 1 and cfg.tis_cap == 0
    # Micro-batch layout: with sdpa, one copy of each group's prompt (data.shared_batch, nanosrpo.attention: the same
    # log-probs for a fraction of the work); with flash-attn, padding-free rows (data.packed_batch); else padded.
    layout = ("packed" if cfg.attn_implementation == "flash_attention_2"
              else "shared" if cfg.share_prompts and model.shares_prompts(policy) else "padded")

    shown, eval0 = {}, None  # the bar keeps the last held-out greedy accuracy (and its gain) from one eval to the next
    if start_step == 0 and cfg.eval_every:  # where the policy starts
        m0 = {"step": 0, **evaluation.greedy_eval(gen, eval_records, system, processor, cfg.max_new_tokens)}
        metrics_log.write(m0)
        eval0 = m0["eval_accuracy"]
        shown["eval"] = f"{eval0:.3f}"
    bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, disable=not accelerator.is_main_process)
    for step in bar:
        t0 = time.time()
        # Seeded per (step, rank): a resumed run samples exactly what the uninterrupted run would have.
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + accelerator.process_index)

        # ---- 1-4. rollouts: prompts -> groups of completions -> rewards -> advantages (with dynamic sampling)
        batch = rollout.collect(gen, records, cursor, cfg, reward, system, processor, accelerator)
        cursor, samples, advantages = batch["cursor"], batch["samples"], batch["advantages"]
        last = step + 1 == max_steps or (not cfg.max_steps and cursor * world >= cfg.epochs * len(records))
        gen.sleep()  # vLLM sleep mode (GPU): free the KV cache and offload its weights while the trainer works
        t_rollout = time.time() - t0

        # ---- 5. the update: ppo_epochs x updates of per_update sequences, each in micro-batches of policy_loss
        t1 = time.time()
        policy.train()  # generate() runs in eval mode; gradient checkpointing runs only in train mode
        with torch.no_grad(), accelerator.autocast():  # one pass over all samples each, before any update
            every = (samples, cfg.micro_batch_size, processor, accelerator.device, None, layout)  # all samples, in order
            old_lp = None if on_policy else forward.logprobs_by_sample(policy, data.micro_batches(*every), cfg.temperature)
            ref_lp = None if ref_policy is None else forward.logprobs_by_sample(ref_policy, data.micro_batches(*every), cfg.temperature)
        order_gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        loss_sum, stats_all, grad_norms = 0.0, [], []
        for _ in range(cfg.ppo_epochs):
            # whole groups in random order (mini-batches count prompts, as verl's do): a micro-batch shares its prompts
            order = [g * cfg.group_size + j for g in torch.randperm(len(samples) // cfg.group_size, generator=order_gen).tolist()
                     for j in range(cfg.group_size)]
            for update in (order[u : u + per_update] for u in range(0, len(order), per_update)):
                # the aggregation's denominator over the whole update, all processes: its loss tokens or its sequences
                # (top-up groups have none: rollout.collect); an update of top-ups alone has loss 0, not 0 / 0
                mine = rollout.loss_count(samples, update, cfg.aggregation)
                normalizer = accelerator.reduce(torch.tensor(float(mine), device=accelerator.device), "sum").item()
                normalizer = max(1.0, normalizer)
                n_micro = math.ceil(len(update) / cfg.micro_batch_size)  # collated one at a time, as they are used
                for j, (idx, mb) in enumerate(data.micro_batches(samples, cfg.micro_batch_size, processor, accelerator.device, update, layout)):
                    with optim.grad_sync(accelerator, policy, last=j == n_micro - 1), accelerator.autocast():
                        lp = forward.sequence_logprobs(policy, mb, temperature=cfg.temperature)
                        old = lp.detach() if on_policy else data.stack_rows([old_lp[i] for i in idx], lp.shape[1]).to(lp.device)
                        ref = None if ref_lp is None else data.stack_rows([ref_lp[i] for i in idx], lp.shape[1]).to(lp.device)
                        tis = None  # truncated importance weights min(pi_trainer / pi_engine, cap)
                        if cfg.tis_cap > 0:
                            engine_lp = data.stack_rows([samples[i]["engine_lp"] for i in idx], lp.shape[1]).to(lp.device)
                            tis = (old - engine_lp).exp().clamp(max=cfg.tis_cap)
                        loss, stats = grpo.policy_loss(
                            lp, old, advantages[idx].to(lp.device), mb["loss_mask"], clip_low=cfg.clip_low,
                            clip_high=cfg.clip_high, ref_logprobs=ref, kl_coef=cfg.kl_coef, aggregation=cfg.aggregation,
                            max_len=cfg.max_new_tokens, token_weights=tis, normalizer=normalizer,
                            ratio_cap=cfg.ratio_cap,
                        )
                        accelerator.backward(loss * world)  # DDP/FSDP average gradients over processes: * world sums
                    loss_sum += loss.item()
                    stats_all.append(stats)
                grad_norms.append(optim.clip_and_step(accelerator, policy, optimizer, scheduler, cfg.max_grad_norm))
        if accelerator.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the allocator's cached blocks back before vLLM wakes up and claims memory
        t_train = time.time() - t1

        # ---- 6. sync the engine, then log
        t_sync = gen.sync(accelerator.unwrap_model(policy))
        m = {"step": step + 1, **log.rollout_metrics([s for gs in gather_object([g["scores"] for g in batch["groups"]]) for s in gs])}
        counts = accelerator.reduce(torch.tensor([loss_sum, batch["filtered"], batch["short"], sum(len(s["input_ids"]) for s in samples)],
                                                 dtype=torch.float64, device=accelerator.device), "sum").tolist()
        m.update(
            loss=counts[0] / len(grad_norms),  # each update's loss (all its micro-batches, all processes), averaged
            grad_norm=sum(grad_norms) / len(grad_norms),
            lr=scheduler.get_last_lr()[0],
            filtered_groups=int(counts[1]),
            short_groups=int(counts[2]),
            time_rollout_s=t_rollout,
            time_train_s=t_train,
            time_sync_s=t_sync,
            tokens_per_s=counts[3] / (time.time() - t0),
            **{k: sum(s[k] for s in stats_all) / len(stats_all)
               for k in ("clip_ratio_low", "clip_ratio_high", "ratio_capped", "kl")},
        )
        if m["short_groups"]:
            accelerator.print(f"warning: step {step + 1}: dynamic sampling drew --max_draws {cfg.max_draws} batches and "
                              f"still lacked {m['short_groups']} groups that pass the accuracy filter; topped up with "
                              f"filtered groups at zero advantage")
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
            m.update(evaluation.greedy_eval(gen, eval_records, system, processor, cfg.max_new_tokens))
        metrics_log.write(m)
        if cfg.report_to:
            accelerator.log(m, step=step + 1)
        if "eval_accuracy" in m:
            gain = "" if eval0 is None else f" ({m['eval_accuracy'] - eval0:+.3f} vs step 0)"
            shown["eval"] = f"{m['eval_accuracy']:.3f}{gain}"
        bar.set_postfix(reward=f"{m['reward_mean']:.2f}", acc=f"{m['accuracy']:.2f}", **shown, s=f"{time.time() - t0:.1f}")
        g = batch["groups"][0]
        if accelerator.is_main_process and cfg.samples_every and step % cfg.samples_every == 0:
            log.write_samples(cfg.out_dir, step + 1, g["rec"], g["completions"], g["scores"])
        if (step + 1) % cfg.save_every == 0 or last:
            checkpoint.save_checkpoint(accelerator, policy, processor, cfg.out_dir, step + 1, {"cursor": cursor},
                                       cfg.keep_checkpoints, optimizer=optimizer, scheduler=scheduler,
                                       export_dtype=checkpoint.export_dtype(cfg.export_dtype, accelerator))
        if last:  # max_steps, or `epochs` passes over the data (dynamic sampling gets there in fewer steps)
            break

    metrics_log.close()
    if accelerator.is_main_process and cfg.plot:
        from nanosrpo import plots

        plots.plot_run(cfg.out_dir)
    if cfg.report_to:  # closes the trackers (not called otherwise: it would tear down the process group under vLLM)
        accelerator.end_training()


if __name__ == "__main__":
    config.run(main)
