"""Training throughput and MFU of Qwen2.5-VL-7B (or 3B) on one GPU: a randomly initialised model, no download.

    python bench/gpu.py                          # 7B, the qwen2.5-vl-7b preset's micro-batch shape, every variant
    python bench/gpu.py --size 3b --steps 3      # the 3B model, fewer timed steps
    python bench/gpu.py --json out/gpu.json      # the figures as JSON too

What one timed step is: the GRPO update's forward + backward of one micro-batch, as train_grpo.py runs it
(forward.sequence_logprobs, then grpo.policy_loss, then backward; vision tower frozen, as the preset has it), in bf16.
The micro-batch has the preset's shape: micro_batch_size (4) sequences, each an image of the preset's max_pixels
(501,760 px: 640 vision tokens) in a rendered SRPO prompt, then a completion of a length drawn uniformly from
[--min_response, max_new_tokens = 2048] (seeded), so the sequences are uneven, as real rollouts are.
The micro-batch's sequences are completions of one prompt, as train_grpo.py's micro-batches are (it orders an update
group by group). Variants: attention sdpa and flash_attention_2 (when flash-attn imports) x layout padded
(data.collate), packed (data.packed_batch, one row, no padding) and, with sdpa, shared (data.shared_batch: the prompt
once, nanosrpo.attention) x gradient checkpointing on and off. A variant that runs out of memory is
reported as OOM. Weights are bf16 here (one GPU cannot hold the 7B model's fp32 master copy, its gradients and the
activations; under FSDP mixed precision the forward and backward compute in bf16 all the same).

FLOPs (train_flops below; the MFU counts useful work only: a padded batch's pad tokens are not counted):
    6 * N * T                  N: the language model's matmul parameters (decoder layers + lm_head; the input
                               embedding is a lookup, not a matmul); T: the real tokens of the micro-batch.
                               Forward 2NT, backward 4NT (input and weight gradients).
  + 12 * L * h * sum_i s_i^2   attention scores and their use (QK^T and AV, forward + backward), PaLM's
                               12 * L * h * s per token (Chowdhery et al. 2022, appendix B) for a sequence of
                               s_i tokens, counted over the full s x s square as PaLM does (not halved for the
                               causal mask). L layers, h = heads * head_dim.
  + 2 * N_vis * P              the frozen vision tower: forward only (no gradient is needed below it), P patches;
                               its windowed attention is left out.
  The shared layout computes less: the prompt (P tokens) once per micro-batch, each completion's l_i tokens
  attending to P + l_i keys (shared_flops: 6 N (P + sum l_i) + 12 L h (P^2 + sum l_i (P + l_i)) + the tower once).
MFU = FLOPs / step time / the GPU's dense bf16 peak (PEAK_TFLOPS by device name, or --peak_tflops). Across layouts
compare "seq tok/s": the samples' tokens (each sample's prompt counted, as the update consumes them) per second.

Engine sync: the time of the full-state-dict gather that gen.sync streams into vLLM (model.trainer_weights,
dtype bf16, frozen tensors skipped) on a model sharded like the FSDP run (model.shard_like_fsdp over one process,
fp32 master shards as train_grpo.py keeps them): each tensor is cast, then all-gathered (full_tensor).

Refuses on a machine without a CUDA GPU (one line, exit status 1).
"""

import argparse
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
DEVICE = "cuda"

# Dense bf16 peak TFLOP/s (no sparsity) by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
]

# Qwen/Qwen2.5-VL-{7B,3B}-Instruct's released config.json: the dimensions (special token ids come from the
# processor used here). Checked: 7B builds 8,292,166,656 parameters, 3B 3,754,622,976 (tests/test_gpu_bench.py).
SIZES = {
    "7b": dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064, tied=False),
    "3b": dict(hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2, vocab=151936, tied=True),
}
# Both sizes share the vision tower (depth 32, hidden 1280, MLP 3420, 16 heads, windows of 112 px with full
# attention in blocks 7, 15, 23, 31) and the text side's M-RoPE sections [16, 24, 24], rope_theta 1e6.
VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    tokens_per_second=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    hidden_act="silu",
)


def qwen25_vl_config(size: str, token_ids: dict | None = None):
    """The Qwen2_5_VLConfig of the released model of this size (token_ids: the processor's special token ids)."""
    from transformers import Qwen2_5_VLConfig

    s, ids = SIZES[size], token_ids or {}
    text = dict(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=s["tied"],
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config={**VISION, "out_hidden_size": s["hidden"]}, tie_word_embeddings=s["tied"], **ids
    )


def train_flops(
    n_params: int, n_layers: int, hidden: int, seq_lens: list[int], n_vision_params: int = 0, n_patches: int = 0
) -> int:
    """FLOPs of one training forward + backward (see the module docstring): 6 N T + 12 L h sum(s_i^2) + 2 N_vis P."""
    return (
        6 * n_params * sum(seq_lens)
        + 12 * n_layers * hidden * sum(s * s for s in seq_lens)
        + 2 * n_vision_params * n_patches
    )


def shared_flops(
    n_params: int,
    n_layers: int,
    hidden: int,
    prompt_len: int,
    completion_lens: list[int],
    n_vision_params: int = 0,
    n_patches: int = 0,
) -> int:
    """FLOPs of one training forward + backward of a shared-prompt micro-batch (the prompt once, completions behind
    it)."""
    tokens = prompt_len + sum(completion_lens)
    attention = prompt_len * prompt_len + sum(n * (prompt_len + n) for n in completion_lens)
    return 6 * n_params * tokens + 12 * n_layers * hidden * attention + 2 * n_vision_params * n_patches


def peak_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None


# ----------------------------------------------------------------------------------------------------- the data
def make_samples(processor, n: int, max_pixels: int, min_response: int, max_response: int, seed: int) -> list[dict]:
    """n GRPO samples as rollout.training_samples makes them: a rendered SRPO prompt with one image of max_pixels, then
    a completion of random token ids (the tokenizer's ordinary tokens) of a seeded random length."""
    from PIL import Image

    from nanosrpo import data, prompts

    g = torch.Generator().manual_seed(seed)
    tok = data.tokenizer_of(processor)
    special = set(tok.all_special_ids) | {
        tok.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>")
    }
    ordinary = torch.tensor([i for i in range(len(tok)) if i not in special])
    side = int(math.sqrt(max_pixels * 1.6))  # a 16:10 image of about max_pixels (the processor rounds to 28 px)
    image = Image.new("RGB", (side, int(max_pixels / side)), (200, 120, 40))
    rec = {"question": "How many cells of the grid are filled? " * 4, "images": ["image.png"], "choices": None}
    text = processor.apply_chat_template(
        data.prompt_messages(rec, prompts.system_prompt(reflection=True)), tokenize=False, add_generation_prompt=True
    )
    prompt = data.encode(processor, text, [image])
    samples = []
    for _ in range(n):
        length = int(torch.randint(min_response, max_response + 1, (1,), generator=g))
        completion = ordinary[torch.randint(len(ordinary), (length,), generator=g)].tolist()
        samples.append(
            {
                "input_ids": prompt + completion,
                "loss_mask": [0] * len(prompt) + [1] * length,
                "images": [image],
                "group": 0,
                "prompt_len": len(prompt),
            }
        )  # all completions of one prompt (see main)
    return samples


# ----------------------------------------------------------------------------------------------------- measuring
def train_step(model, batch: dict) -> None:
    """One micro-batch of the GRPO update: log-probs, the clipped loss (on-policy ratio 1, random advantages),
    backward."""
    from nanosrpo import forward, grpo

    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        lp = forward.sequence_logprobs(model, batch)
        adv = torch.randn(lp.shape[0], device=lp.device)
        loss, _ = grpo.policy_loss(lp, lp.detach(), adv, batch["loss_mask"], max_len=lp.shape[1])
    loss.backward()
    model.zero_grad(set_to_none=True)


def measure(model, batches: list[dict], steps: int, warmup: int) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        train_step(model, batch)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def gather_time(size: str, token_ids: dict, repeats: int = 2) -> dict:
    """Seconds to stream model.trainer_weights(dtype=bf16, skip_frozen=True) out of an FSDP2-sharded fp32 model
    (one process: the all-gather runs over one rank, so this is the cast + gather-call cost, not network time)."""
    import torch.distributed as dist
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nanosrpo import model as M

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=0, world_size=1)
    with torch.device(DEVICE):
        policy = Qwen2_5_VLForConditionalGeneration(qwen25_vl_config(size, token_ids)).float()
    M.freeze_vision(policy)
    M.shard_like_fsdp(policy)
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0, n_bytes, n = time.perf_counter(), 0, 0
        for _, t in M.trainer_weights(policy, dtype=torch.bfloat16, skip_frozen=True):
            n_bytes, n = n_bytes + t.numel() * t.element_size(), n + 1
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    del policy
    torch.cuda.empty_cache()
    return {"gather_s": min(out), "tensors": n, "gib": n_bytes / 2**30}


def measure_variants(policy, processor, groups: list[list[dict]], args, work: dict) -> list[dict]:
    """Every attention x layout x checkpointing variant of the training step on the same micro-batches: one printed
    row each (an OOM is a row too), returned as dicts. work: the useful tokens and FLOPs per micro-batch, the peak."""
    from nanosrpo import data

    tokens, peak = work["tokens"], work["peak"]
    attns = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    if len(attns) == 1:
        print(
            "flash-attn is not installed: flash_attention_2 rows skipped (pip install flash-attn --no-build-isolation)"
        )
    rows = []
    header = (
        f"{'attention':<18} {'layout':<7} {'ckpt':<5} {'tokens':>7} {'computed':>8} {'s/step':>7} "
        f"{'seq tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}"
    )
    print(header)
    for attn in attns:
        policy.set_attn_implementation(attn)
        if attn == "sdpa":
            from nanosrpo import attention

            attention.enable(policy)  # as model.load_policy does: sdpa for ordinary batches, plus the shared layout
        for layout in ("padded", "packed") + (("shared",) if attn == "sdpa" else ()):
            make = {"padded": data.collate, "packed": data.packed_batch, "shared": data.shared_batch}[layout]
            batches = [
                {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in make(processor, g).items()}
                for g in groups
            ]
            useful = work["flops_shared"] if layout == "shared" else work["flops"]
            for ckpt in (True, False):
                if ckpt:
                    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                else:
                    policy.gradient_checkpointing_disable()
                row = {"attention": attn, "layout": layout, "checkpointing": ckpt}
                try:
                    row.update(measure(policy, batches, args.steps, args.warmup))
                except torch.OutOfMemoryError:
                    policy.zero_grad(set_to_none=True)
                    gc.collect()
                    torch.cuda.empty_cache()
                    row["oom"] = True
                computed = sum(b["input_ids"].numel() for b in batches) / len(batches)  # pad tokens included
                row.update(tokens=tokens, computed_tokens=computed, flops=useful)
                if "oom" in row:
                    print(f"{attn:<18} {layout:<7} {'on' if ckpt else 'off':<5} {tokens:>7.0f} {computed:>8.0f}   OOM")
                else:
                    tflops = useful / row["step_s"] / 1e12
                    row.update(tokens_per_s=tokens / row["step_s"], tflops=tflops, mfu=tflops / peak if peak else None)
                    mfu = f"{100 * row['mfu']:.1f}%" if peak else "?"
                    print(
                        f"{attn:<18} {layout:<7} {'on' if ckpt else 'off':<5} {tokens:>7.0f} {computed:>8.0f} "
                        f"{row['step_s']:>7.3f} {row['tokens_per_s']:>9.0f} {tflops:>8.1f} {mfu:>6} "
                        f"{row['peak_gib']:>9.1f}"
                    )
                rows.append(row)
    return rows


def load_processor(max_pixels: int):
    """(processor, the special token ids of the model config): a real Qwen2.5-VL processor (the tiny world's tokenizer
    + the stock image processor) with the preset's pixel bound. Only its special token ids reach the model, and
    completions are random ids, so the big vocabulary is still the released one's."""
    from nanosrpo import data, tiny
    from nanosrpo import model as M

    with tempfile.TemporaryDirectory() as tmp:
        tiny.build_tiny(tmp, size="0.2m")
        processor = M.load_processor(tmp)
    M.set_pixel_bounds(processor, max_pixels=max_pixels)
    tok = data.tokenizer_of(processor)
    names = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}
    names.update(vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    return processor, {k: tok.convert_tokens_to_ids(t) for k, t in names.items()}


def useful_work(processor, groups: list[list[dict]], cfg, n_lm: int, n_vis: int) -> dict:
    """Useful work per micro-batch, on average over the ones the steps cycle through: real tokens, and FLOPs in the
    padded and packed layouts alike and in the shared one, which does less for the same samples (the prompt and its
    image once). cfg: the model's text config."""
    from nanosrpo import data

    lens = [[len(s["input_ids"]) for s in g] for g in groups]
    tokens = sum(sum(x) for x in lens) / len(groups)
    patches = sum(int(data.collate(processor, g)["image_grid_thw"].prod(1).sum()) for g in groups) / len(groups)
    L, head_dim = cfg.num_hidden_layers, cfg.hidden_size // cfg.num_attention_heads
    h, P = cfg.num_attention_heads * head_dim, groups[0][0]["prompt_len"]
    flops = sum(train_flops(n_lm, L, h, x) for x in lens) / len(groups) + 2 * n_vis * patches
    flops_shared = sum(shared_flops(n_lm, L, h, P, [n - P for n in x]) for x in lens) / len(groups)
    flops_shared += 2 * n_vis * patches / len(groups[0])
    return {"tokens": tokens, "flops": flops, "flops_shared": flops_shared}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="7b")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (CUDA kernels, allocator)")
    ap.add_argument("--micro_batches", type=int, default=4, help="distinct micro-batches the steps cycle through")
    ap.add_argument(
        "--min_response", type=int, default=256, help="completion lengths are drawn from [this, max_new_tokens]"
    )
    ap.add_argument(
        "--peak_tflops", type=float, default=0.0, help="the GPU's dense bf16 peak (0: from the device name)"
    )
    ap.add_argument("--no_gather", action="store_true", help="skip the engine-sync gather timing")
    ap.add_argument("--json", default="", help="also write the figures here")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py measures a CUDA GPU and there is none here (torch.cuda.is_available() is False)")

    from transformers import Qwen2_5_VLForConditionalGeneration

    from nanosrpo import config
    from nanosrpo import model as M

    preset = config.parse(config.GRPOConfig, ["--preset", "qwen2.5-vl-7b"])  # the preset over GRPOConfig's defaults
    B, max_new, max_pixels = preset.micro_batch_size, preset.max_new_tokens, preset.max_pixels
    device = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(device)

    processor, token_ids = load_processor(max_pixels)
    samples = make_samples(processor, B * args.micro_batches, max_pixels, args.min_response, max_new, seed=0)
    groups = [samples[i : i + B] for i in range(0, len(samples), B)]

    with torch.device(DEVICE):
        policy = Qwen2_5_VLForConditionalGeneration(qwen25_vl_config(args.size, token_ids)).to(torch.bfloat16)
    M.freeze_vision(policy)
    policy.train()
    lm, cfg = policy.model.language_model, policy.config.get_text_config()
    n_lm = (
        sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n) + cfg.vocab_size * cfg.hidden_size
    )
    n_vis = sum(p.numel() for p in policy.model.visual.parameters())
    n_all = sum(p.numel() for p in policy.parameters())

    print(f"device: {device} | torch {torch.__version__} | peak bf16 {peak or '?'} TFLOP/s")
    print(
        f"model: Qwen2.5-VL-{args.size.upper()} config, random init, bf16: {n_all / 1e9:.3f}B parameters "
        f"(language-model matmuls N = {n_lm / 1e9:.3f}B, vision tower {n_vis / 1e9:.3f}B, frozen)"
    )
    lens = [[len(s["input_ids"]) for s in g] for g in groups]
    print(f"micro-batch: {B} sequences (preset qwen2.5-vl-7b), lengths {lens}")
    print("FLOPs = 6*N*T + 12*L*h*sum(s_i^2) + 2*N_vis*patches (real tokens only; see the docstring)\n")

    work = useful_work(processor, groups, cfg, n_lm, n_vis)
    rows = measure_variants(policy, processor, groups, args, {**work, "peak": peak})
    del policy
    torch.cuda.empty_cache()

    sync = None
    if not args.no_gather:
        sync = gather_time(args.size, token_ids)
        print(
            f"\nengine sync gather (model.trainer_weights, bf16, frozen vision skipped, FSDP2 over 1 GPU): "
            f"{sync['gather_s']:.2f} s for {sync['tensors']} tensors, {sync['gib']:.1f} GiB "
            f"({sync['gib'] / sync['gather_s']:.0f} GiB/s)"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": device,
                    "size": args.size,
                    "peak_tflops": peak,
                    "params": n_all,
                    "n_lm": n_lm,
                    "n_vision": n_vis,
                    "lengths": lens,
                    "rows": rows,
                    "sync": sync,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
