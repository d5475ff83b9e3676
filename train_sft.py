"""Supervised fine-tuning on chat records: SRPO's reflection-oriented cold start (stage 1), and the tiny world's base.

    accelerate launch train_sft.py                  # tiny world: the reflection cold start of the tiny base model
    python train_sft.py --stage base                # tiny world: the base model itself (random init, one-round CoT)
    accelerate launch train_sft.py --preset qwen2.5-vl-7b --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --data sft.jsonl --image_dir images/ --out_dir out/sft-7b
    python train_sft.py --help                      # every option; a YAML file of options may come first

--stage only says what "tiny" means for --model and --data:
  reflect (default)  model = the tiny base (trained on first use and cached, see tiny.ensure_policy),
                     data = the tiny world's two-round oracle records (sft_reflect.jsonl, ~30/70 correct/flawed)
  base               model = the tiny world's random init, data = one-round chains of thought (sft_base.jsonl): the
                     stand-in for the pretrained Instruct model that real users start from
tiny.ensure_policy builds and caches the tiny policies by running these commands with the measured flags of
tiny.RECIPE (into a temporary --out_dir); the reflection policy train_grpo.py starts from is trained, by default, on
curate.py's records (the base's own attempts, reflected on by the oracle) passed as --data, not on sft_reflect.jsonl.
DDP on a CPU-only machine (gloo): `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train_sft.py`
or `torchrun --nproc_per_node 2 train_sft.py`; on GPUs, `accelerate launch --config_file accelerate_fsdp.yaml ...`.

The algorithm: every record becomes token ids + a loss mask that is 1 only on assistant tokens; records are batched
by length (little padding); the loss is the cross-entropy summed over assistant tokens and divided by the number of
assistant tokens in the whole optimizer step (all micro-batches, all processes), so every target token weighs the
same; AdamW with a linear warmup then cosine decay, gradient clipping. The vision tower and merger are frozen by
default, as in the reference runs.

Writes to --out_dir: run.json (config, versions, data hash), metrics.jsonl (per step: loss, lr, grad_norm, tokens_per_s,
padding_frac), and checkpoint-{step}/ every --save_every steps and at the end; each holds state/ (for --resume: model,
optimizer, scheduler, RNG, data position) and policy/ (save_pretrained: what train_grpo.py --model takes). The last
checkpoint's policy/ is the result, and the script prints its path.
"""

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from nanosrpo import checkpoint, config, data, forward, log, model, optim, tiny


def tokenize(records: list[dict], processor, cfg, is_main: bool) -> list[dict]:
    """Records -> token ids + an assistant-only loss mask + image paths (images are re-read per batch, not held in
    memory), a chunk at a time (data.tokenize_chats: image tokens counted from the image sizes). A record longer
    than --max_length is skipped rather than cut, since a cut could split an image's tokens or drop the closing
    <|im_end|>."""
    samples, chunk = [], 64
    for start in tqdm(
        range(0, len(records), chunk), desc=f"tokenizing ({chunk} a chunk)", disable=not is_main, leave=False
    ):
        part = records[start : start + chunk]
        for rec, s in zip(part, data.tokenize_chats(processor, [r["messages"] for r in part])):
            if len(s["input_ids"]) <= cfg.max_length:
                images = data.message_images(rec["messages"])  # paths
                samples.append({"input_ids": s["input_ids"], "loss_mask": s["loss_mask"], "images": images})
    n_skipped = len(records) - len(samples)
    if n_skipped and is_main:
        print(f"skipped {n_skipped}/{len(records)} records longer than --max_length {cfg.max_length}")
    return samples


def batch_plan(samples: list[dict], cfg, world: int):
    """(plan, per_epoch, total_steps, plan_sha): every optimizer step's micro-batches, fixed by the seed, so a resumed
    run sees the same data. A global micro-batch holds batch_size sequences per process, similar in length (see
    data.length_bucketed_batches), reshuffled every epoch; plan_sha fingerprints the plan for --resume."""
    lengths = [len(s["input_ids"]) for s in samples]
    global_batch = cfg.batch_size * world
    per_epoch = len(data.length_bucketed_batches(lengths, global_batch, cfg.bucket, cfg.seed))
    steps_per_epoch = per_epoch // cfg.grad_accum
    total_steps = cfg.max_steps if cfg.max_steps > 0 else int(cfg.epochs * steps_per_epoch)
    if total_steps <= 0 or per_epoch == 0:
        raise SystemExit(
            f"{len(samples)} usable records make no full optimizer step of {cfg.batch_size} x {world} processes x "
            f"{cfg.grad_accum} accumulation; lower --batch_size/--grad_accum or add data"
        )
    n_epochs = math.ceil(total_steps * cfg.grad_accum / per_epoch)
    epochs = [data.length_bucketed_batches(lengths, global_batch, cfg.bucket, cfg.seed + e) for e in range(n_epochs)]
    plan = [batch for epoch in epochs for batch in epoch]  # reshuffled every epoch
    plan_sha = hashlib.sha256(json.dumps([plan[: total_steps * cfg.grad_accum], lengths]).encode()).hexdigest()[:16]
    return plan, per_epoch, total_steps, plan_sha


def prepare_training(cfg, accelerator, policy, total_steps: int):
    """(policy, optimizer, scheduler): AdamW with a linear warmup then cosine decay, prepared for this process.

    --fsdp: FSDP2 as accelerate_fsdp.yaml on GPUs, where accelerate would use DDP (CPU); before the optimizer, since
    sharding replaces the parameters, and kept out of accelerator.prepare, which would wrap the policy in DDP.
    """
    fsdp = cfg.fsdp and accelerator.distributed_type != DistributedType.FSDP
    if fsdp:
        policy = model.shard_policy(policy, accelerator)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    if fsdp:
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:
        policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    return policy, optimizer, scheduler


def accumulate_gradients(policy, mine: list[list[dict]], processor, accelerator, packed: bool):
    """One optimizer step's gradient over this process's micro-batches `mine`: the cross-entropy summed over assistant
    tokens, divided by the assistant tokens of the whole step on all processes (the mean over the accumulated batch;
    token t is predicted from position t-1, so the first token of a sequence is never a target).
    Returns (loss sum, that number of targets, real tokens, computed tokens: the padding counts)."""
    n_local = sum(sum(s["loss_mask"][1:]) for mb in mine for s in mb)
    n_target = accelerator.reduce(torch.tensor(n_local, device=accelerator.device), "sum").item()
    loss_sum = torch.zeros((), device=accelerator.device)
    n_real = n_padded = 0
    for i, mb in enumerate(mine):
        mb = [{**s, "images": [data.load_image(p) for p in s["images"]]} for s in mb]
        batch = (data.packed_batch if packed else data.collate)(processor, mb)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        real = batch["seq_lens"].sum().item() if packed else batch["attention_mask"].sum().item()
        n_real, n_padded = n_real + real, n_padded + (real if packed else batch["attention_mask"].numel())
        with optim.grad_sync(accelerator, policy, last=i == len(mine) - 1), accelerator.autocast():
            # GRPO's log-probs (forward.sequence_logprobs: float32 a chunk of positions at a time, never the full
            # vocabulary's logits for the batch; packed rows unpacked) at temperature 1: the cross-entropy summed
            # over assistant tokens. [B, T], right-padded; a sequence's first token is never a target.
            lp = forward.sequence_logprobs(policy, batch)
            mb_loss = -(lp * batch["loss_mask"])[:, 1:].sum()
            # DDP/FSDP average gradients over processes; multiplying by `world` turns that average into the sum.
            accelerator.backward(mb_loss * accelerator.num_processes / n_target)
        loss_sum += mb_loss.detach()
    return loss_sum, n_target, n_real, n_padded


def main(argv=None):
    cfg = config.parse(config.SFTConfig, argv)
    if cfg.stage not in ("base", "reflect"):
        raise SystemExit(f"--stage must be base or reflect, got {cfg.stage!r}")
    # Mixed precision keeps fp32 master weights and runs the matmuls in bf16; CPUs train in plain fp32. The scheduler
    # is stepped by us once per optimizer step (accelerate would otherwise step it once per process). cpu=True on a
    # machine without GPUs makes `torchrun --nproc_per_node N train_sft.py` DDP over gloo.
    gpu = torch.cuda.is_available()
    precision = "bf16" if cfg.bf16 and gpu else "no"
    accelerator = Accelerator(cpu=not gpu, mixed_precision=precision, step_scheduler_with_optimizer=False)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    model.use_cpu_cores(accelerator, cfg.cpu_threads)
    set_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    log.lock_out_dir(out_dir)  # one run per --out_dir: a second one ends here, naming the first one's pid
    resume_from = checkpoint.latest_checkpoint(out_dir)  # None: a fresh run
    if resume_from is not None and not cfg.resume:
        raise SystemExit(f"{out_dir} already has {resume_from.name}: pass --resume to continue it, or a new --out_dir")

    # ---- the policy and the data. "tiny" is the offline tiny world, built on first use (one process at a time).
    with accelerator.main_process_first():
        base = cfg.stage == "base"
        paths = tiny.resolve(cfg, policy="init" if base else "base", data="sft_base" if base else "sft_reflect")
        model_path, data_path = paths["model"], paths["data"]
    policy, processor = model.load_policy(model_path, attn_implementation=cfg.attn_implementation)  # fp32 master
    packed = cfg.attn_implementation == "flash_attention_2"  # padding-free micro-batches (data.packed_batch)
    n_frozen = model.freeze_vision(policy) if cfg.freeze_vision else 0
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
    records = data.load_sft_records(data_path, cfg.image_dir or None)
    samples = tokenize(records, processor, cfg, is_main)
    plan, per_epoch, total_steps, plan_sha = batch_plan(samples, cfg, world)

    # ---- optimizer, schedule, and (when resuming) everything as it was at the checkpoint.
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)  # counted before FSDP shards them
    policy, optimizer, scheduler = prepare_training(cfg, accelerator, policy, total_steps)
    start_step = 0
    if resume_from is not None:
        state = checkpoint.load_checkpoint(
            accelerator, resume_from, model=policy, optimizer=optimizer, scheduler=scheduler
        )
        if state.get("plan_sha") != plan_sha:
            raise SystemExit(
                f"{resume_from}: the batch plan changed (data, --batch_size, --grad_accum, --epochs/--max_steps, "
                f"--bucket, --seed or the number of processes); resume with the same settings or use a new --out_dir"
            )
        start_step = state["step"]
    metrics = log.MetricsWriter(out_dir, enabled=is_main, resume_step=start_step if resume_from else None)
    if is_main:
        log.write_run_info(
            out_dir,
            cfg,
            data=data_path,
            model_path=model_path,
            records=len(records),
            skipped_too_long=len(records) - len(samples),
            world_size=world,
            total_steps=total_steps,
            frozen_vision_tensors=n_frozen,
            resumed_from=str(resume_from) if resume_from else None,
        )
        print(
            f"{model_path}: {n_train / 1e6:.2f}M trainable parameters; {len(samples)} records from {data_path}; "
            f"{total_steps} steps of {cfg.batch_size * world * cfg.grad_accum} sequences; out_dir {out_dir}"
        )

    # ---- the training loop: one optimizer step per iteration, grad_accum micro-batches each.
    policy.train()
    pbar = tqdm(total=total_steps, initial=start_step, desc="sft", disable=not is_main)
    rank = accelerator.process_index
    for step in range(start_step, total_steps):
        t0 = time.time()
        micro = plan[step * cfg.grad_accum : (step + 1) * cfg.grad_accum]
        mine = [[samples[i] for i in b[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]] for b in micro]
        loss_sum, n_target, n_real, n_padded = accumulate_gradients(policy, mine, processor, accelerator, packed)
        lr = scheduler.get_last_lr()[0]
        grad_norm = optim.clip_and_step(accelerator, policy, optimizer, scheduler, cfg.max_grad_norm)

        # ---- metrics (summed over processes), progress, checkpoints.
        totals = torch.tensor([loss_sum.item(), n_real, n_padded], device=accelerator.device)
        totals = accelerator.reduce(totals, "sum").tolist()
        row = {
            "step": step + 1,
            "loss": totals[0] / n_target,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": totals[1] / (time.time() - t0),
            "padding_frac": 1 - totals[1] / totals[2],
            "epoch": (step + 1) * cfg.grad_accum / per_epoch,
        }
        metrics.write(row)
        pbar.update(1)
        pbar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", pad=f"{row['padding_frac']:.2f}")
        if (cfg.save_every > 0 and (step + 1) % cfg.save_every == 0) or step + 1 == total_steps:
            state = {"micro_batch": (step + 1) * cfg.grad_accum, "plan_sha": plan_sha, "epoch": row["epoch"]}
            export = checkpoint.export_dtype(cfg.export_dtype, accelerator)
            checkpoint.save_checkpoint(
                accelerator,
                policy,
                processor,
                out_dir,
                step + 1,
                state,
                keep=cfg.keep_checkpoints,
                optimizer=optimizer,
                scheduler=scheduler,
                export_dtype=export,
            )
    pbar.close()
    metrics.close()
    final = checkpoint.latest_checkpoint(out_dir)
    if is_main:
        print(f"done: {final / 'policy'}")
    accelerator.end_training()
    return final


if __name__ == "__main__":
    config.run(main)
