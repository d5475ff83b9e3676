"""GPU memory plan of the GRPO stage, per GPU, from a model config alone (no weights, no download, no GPU).

    python bench/memory_plan.py --preset qwen2.5-vl-7b --gpus 8 --gpu_gb 80    # the paper's run, on paper
    python bench/memory_plan.py --model_config path/to/config.json ...         # any local Qwen2.5-VL / Qwen2 config
    python bench/memory_plan.py --check_tiny                                   # the formulas against a real CPU step

What is being planned: `accelerate launch --config_file accelerate_fsdp.yaml train_grpo.py --preset qwen2.5-vl-7b`,
i.e. FSDP2 full shard over --gpus processes (one per GPU), mixed precision bf16, and one vLLM engine per rank on the
same GPU (TP = 1), asleep (level 1) while the trainer works. The preset's numbers are read from
nanosrpo.config.PRESETS["qwen2.5-vl-7b"]["GRPOConfig"] (over GRPOConfig's defaults), not copied here.

Notation (bytes unless said otherwise)
  P      all parameters (language model + vision tower + merger)       N   GPUs = FSDP world size
  P_tr   trainable parameters (the preset freezes visual.*: P_tr = P - P_vision)
  h, I, L, nH, nKV, d, V   hidden size, MLP size, decoder layers, query heads, kv heads, head dim, vocabulary
  B      micro_batch_size sequences       T = prompt + max_new_tokens tokens, the worst case: a micro-batch is
         padded to its longest sequence, and we take that one at the prompt cap (--prompt_len, 1024, image tokens
         included) plus a full-length response (1024 + 2048 = 3072 for the preset)
  s      bytes of the compute dtype: 2 (bf16 on GPU), 4 (fp32 in the CPU check)        c = min(1024, B*T) rows

Parameter counts (exact for Qwen2.5-VL / Qwen2, checked against sum(p.numel()) in tests/test_memory_plan.py)
  decoder layer  = h*nH*d + nH*d + 2*(h*nKV*d + nKV*d) + nH*d*h + 3*h*I + 2*h   (q, k, v with bias; o; SwiGLU; 2 norms)
  language model = V*h (embed) + L*layer + h (final norm) + V*h (lm_head, 0 when tied)
  vision block   = 2*vh + (vh*3vh + 3vh) + (vh*vh + vh) + 2*(vh*vI + vI) + (vI*vh + vh)
  vision         = in_chans*tp*p*p*vh (patch conv) + depth*block + vh + (vh*m^2)^2 + vh*m^2 + vh*m^2*h + h (merger)

What the trainer keeps (train_grpo.py + accelerate 1.15 FSDP2, accelerate_fsdp.yaml)
  weights      4*P / N     model.load_policy loads float32; FSDP2 shards every parameter (frozen ones too) and keeps
                           the fp32 shard as the master copy; MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)
                           casts only what it all-gathers for compute.
  gradients    4*P_tr / N  fp32, sharded like the parameter (reduce-scattered in bf16, then cast). Freed between
                           updates (zero_grad(set_to_none=True)), alive across the micro-batches of one update.
  AdamW        8*P_tr / N  exp_avg + exp_avg_sq in fp32 (+ a 4-byte step per tensor), sharded, alive all run.
  FSDP buffers 2*(root + root_tr + max(tail + tail_tr + layer, 2*layer + layer_tr, embed + embed_tr))   bf16,
               transient (_tr: the trainable part, whose unsharded bf16 gradients exist until reduce-scatter).
               accelerate wraps each decoder layer and vision block, the input embedding (untied) and a "tail" unit
               [final norm, lm_head] that is NOT resharded after forward, and the root (patch embed, merger) that
               stays unsharded all step. At the start of backward the tail's params and its unsharded bf16 grads are
               alive together with the prefetched last layer; later two layers (current + prefetch) and one layer's
               unsharded grads; at the end the embedding's params and grads. We take the largest of the three.
  activations  one micro-batch of B sequences of T tokens, per token:
    A_layer = 2*(4h + 2*s*h)   two RMSNorms: the fp32 input (HF upcasts) + the normalised and the weighted output
            + 4*s*nH*d         q after RoPE, k and v repeated to nH heads, the SDPA output (o_proj's input is a view
                               of it). The micro-batches are padded, so a mask is passed and transformers repeats kv
                               instead of using enable_gqa; the fused SDPA kernels keep no T x T scores, but
            + s*T              SDPA turns the boolean mask into an additive one in the compute dtype, a [B, 1, T, T]
                               copy per layer, and keeps it for backward (measured on CPU; see the check)
            + 4*nH             SDPA's fp32 logsumexp
            + 4*s*I            SwiGLU: gate output (SiLU input), SiLU output, up output, down_proj input
    (Korthikanti et al. 2022's 34*s*h-per-token transformer layer, adapted: no dropout masks, no attention scores,
     GQA repeated, SwiGLU's three I-wide tensors, RMSNorm's fp32 upcast; the per-layer mask copy is SDPA's.)
    stored  = B*T*(L*A_layer + 2*s*d)               no checkpointing (+ the M-RoPE cos/sin, shared by the layers)
    stored  = B*T*(L*s*h     + 2*s*d) + B*T*T       gradient checkpointing: each layer's input + the bool mask
    head    = B*T*(4h + 2*s*h)                      the final RMSNorm (its output is lm_head's input)
    logits  = B*T*s*V          the model materialises bf16 logits [B, T, V] once (forward.sequence_logprobs)
    loss backward   = 2*B*T*s*V + k*4*V*c    sequence_logprobs scores 1024-row chunks under checkpointing; in
                      backward each chunk's slice gradient is a full-size [B*T, V] tensor (autograd's SliceBackward)
                      added into the logits' gradient buffer (another full [B*T, V]); plus a chunk's fp32 working
                      set: k = 3 tensors of [c, V] (the float copy, / temperature, logsumexp's backward); k = 2 in
                      fp32, where .float() is a no-op
    layer backward  = B*T*(A_layer + 2*s*I + 2*s*h)  with checkpointing (one layer recomputed + its gradient
                      temporaries), B*T*(2*s*I + 2*s*h) without
    peak    = stored + max(head + logits + loss backward, layer backward)   (head and logits are freed before the
              layers' backward)
    No-grad passes (old log-probs with several updates per step, the reference) hold the logits and one chunk only.
  KL reference (kl_coef > 0 only): model.load_reference loads it in bf16 and, under FSDP, shards it like the policy:
               2*P / N per GPU (a full fp32 copy would be 4*P). The preset has kl_coef = 0.

vLLM colocated (nanosrpo/engine.py VLLMEngine, vLLM 0.32 GPU worker)
  budget       util * M       vLLM reserves gpu_memory_utilization * total GPU memory M for itself (weights +
                              activations + CUDA graphs + KV cache) and refuses to start with less than that free.
  weights      2*P            bf16, one full copy per GPU (TP = 1, one engine per rank; vision tower included)
  activations  est.           its profiling forward: max_num_batched_tokens (16384 on >= 70 GiB GPUs) tokens through
                              one layer, K*s*(3I + 2h + nH*d + 2*nKV*d), plus the sampler's fp32 logits and probs for
                              max_num_seqs (256) rows, 2*4*256*V. vLLM measures its own number at start-up.
  CUDA graphs  assumed 1 GiB  (not derived from the config; vLLM logs its estimate at start-up)
  KV cache     budget - weights - activations - CUDA graphs;  2*L*nKV*d*s bytes per token.
  sleep (level 1) while training: the weights go to pinned CPU memory (2*P of host RAM per rank), the KV cache is
               discarded; what stays on the GPU is the CUDA-graph pool (assumed 1 GiB).
  Plus per process, assumed (not from the config): CUDA context + NCCL buffers, --overhead_gb (default 1.0).

Checkpoints (nanosrpo/checkpoint.py, every --save_every steps and at the end), per rank, on disk and in host RAM
  state/       torch.distributed.checkpoint: each rank writes its own file with what it holds,
               (4*P + 8*P_tr) / N   its fp32 weight shards (frozen ones too) + its AdamW m, v shards
               (+ one 4-byte Adam step per tensor, a scheduler and the RNG states: KB). Host RAM while saving or
               resuming: DCP copies tensor by tensor between GPU and file (its FileSystemWriter stages 10 MB ahead), so
               about the rank's largest shard, 4*max(V*h, layer tensors)/N; a resume reads into the existing shards.
  policy/      the export handed on: one copy of all weights in --export_dtype (bf16 in the preset), 2*P on disk,
               gathered one tensor at a time (cast to bf16 on the shard, then all-gathered: 2 x the largest tensor of
               transient GPU memory on every rank) into rank 0's host RAM: 2*P there, nothing on the others.
  (Before: accelerate's save_state under FULL_STATE_DICT gathered 4*P of weights and 8*P_tr of AdamW into rank 0's
  host RAM and wrote them from there, plus a 4*P fp32 policy/; a resume loaded them all into rank 0 again.)

Phases per GPU:
  training = weights + gradients + AdamW + FSDP buffers + activations(peak) + vLLM asleep + overhead (+ reference)
  rollout  = weights + AdamW + vLLM budget + overhead (+ reference); gradients are None, FSDP resharded, activations
             freed. vLLM re-maps its weights and KV cache with its own allocator, not from torch's cache; its
             wake_up first calls gc.collect() and torch's empty_cache() (vllm/device_allocator/cumem.py, 0.32), which
             hands the trainer's freed blocks back to the driver.

--check_tiny: the same formulas against reality on CPU: tiny.build_tiny(size="10m"), one real GRPO micro-batch
(data.collate of a synthetic-task prompt with its image + a completion; forward.sequence_logprobs + grpo.policy_loss;
backward; AdamW) in fp32, 1 process, no FSDP, at a few shapes. Memory is counted by torch.profiler(profile_memory=True):
every allocation and free of PyTorch's CPU allocator while profiling, replayed in time order, gives the live tensor
bytes and their peak (what torch.cuda.max_memory_allocated reports on a GPU). Not RSS: RSS includes malloc's caches,
Python objects and page granularity, and its peak cannot be reset between phases.
"""

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanosrpo import config  # noqa: E402

GiB = 2**30
PRESET = "qwen2.5-vl-7b"

# Qwen/Qwen2.5-VL-7B-Instruct's config.json on the Hugging Face hub: the fields the plan needs, same names and layout
# (text fields at the top level, the vision tower under vision_config). Not downloaded here (no hub access); the values
# agree with the model's printed module shapes (Embedding(152064, 3584), q_proj 3584->3584, k_proj 3584->512,
# gate_proj 3584->18944, 28 decoder layers; 32 vision blocks of 1280, MLP 3420, merger 5120->3584) and the model
# card's 8.29B parameters (param_counts gives 8,292,166,656; tests/test_memory_plan.py checks it against
# transformers' Qwen2_5_VLForConditionalGeneration built from this dict on the meta device).
QWEN25_VL_7B_CONFIG = {
    "model_type": "qwen2_5_vl",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


# ----------------------------------------------------------------------------------------------------- the model
@dataclass
class Arch:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    # vision tower (Qwen2.5-VL); depth 0 = a text-only model
    v_depth: int = 0
    v_hidden: int = 0
    v_intermediate: int = 0
    v_in_chans: int = 3
    v_patch: int = 14
    v_temporal_patch: int = 2
    v_merge: int = 2


def arch_from_config(cfg: dict) -> Arch:
    """The plan's view of a config.json dict: Qwen2.5-VL (text fields flat or under text_config) or a Qwen2 LM."""
    text = {**cfg, **cfg.get("text_config", {})}
    if text.get("model_type") not in ("qwen2_5_vl", "qwen2_5_vl_text", "qwen2"):
        raise SystemExit(f"model config: model_type {text.get('model_type')!r} is not Qwen2.5-VL or Qwen2")
    heads = text["num_attention_heads"]
    a = Arch(
        vocab=text["vocab_size"],
        hidden=text["hidden_size"],
        intermediate=text["intermediate_size"],
        layers=text["num_hidden_layers"],
        heads=heads,
        kv_heads=text.get("num_key_value_heads", heads),
        head_dim=text.get("head_dim") or text["hidden_size"] // heads,
        tied=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
    )
    v = cfg.get("vision_config")
    if v:
        a.v_depth, a.v_hidden, a.v_intermediate = v["depth"], v["hidden_size"], v["intermediate_size"]
        a.v_in_chans = v.get("in_chans", v.get("in_channels", 3))
        a.v_patch, a.v_temporal_patch, a.v_merge = v["patch_size"], v["temporal_patch_size"], v["spatial_merge_size"]
        if v.get("out_hidden_size", a.hidden) != a.hidden:
            raise SystemExit("model config: vision_config.out_hidden_size differs from the text hidden_size")
    return a


def param_counts(a: Arch) -> dict[str, int]:
    """Parameters by part (see the docstring's formulas)."""
    h, q, kv = a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim
    layer = h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * a.intermediate + 2 * h
    embed, lm_head = a.vocab * h, 0 if a.tied else a.vocab * h
    vh, vi, m2 = a.v_hidden, a.v_intermediate, a.v_merge**2
    v_block = 2 * vh + (vh * 3 * vh + 3 * vh) + (vh * vh + vh) + 2 * (vh * vi + vi) + (vi * vh + vh)
    v_other = 0
    if a.v_depth:
        patch = a.v_in_chans * a.v_temporal_patch * a.v_patch**2 * vh
        merger = vh + (vh * m2) ** 2 + vh * m2 + vh * m2 * h + h
        v_other = patch + merger
    text = embed + a.layers * layer + h + lm_head
    vision = a.v_depth * v_block + v_other
    return {
        "embed": embed,
        "layer": layer,
        "final_norm": h,
        "lm_head": lm_head,
        "text": text,
        "vision_block": v_block if a.v_depth else 0,
        "vision_other": v_other,
        "vision": vision,
        "total": text + vision,
    }


def trainable_params(a: Arch, freeze_vision: bool) -> int:
    p = param_counts(a)
    return p["text"] if freeze_vision else p["total"]


# ----------------------------------------------------------------------------------------------------- the trainer
def layer_activation_bytes_per_token(a: Arch, s: int, T: int) -> int:
    """A_layer: what autograd keeps per token for one decoder layer (no checkpointing), sequences of T tokens."""
    h, q = a.hidden, a.heads * a.head_dim
    norms = 2 * (4 * h + 2 * s * h)
    attention = 4 * s * q + s * T + 4 * a.heads
    mlp = 4 * s * a.intermediate
    return norms + attention + mlp


def activation_bytes(a: Arch, B: int, T: int, s: int, checkpointing: bool, chunk: int = 1024) -> dict[str, int]:
    """Activation memory of one training micro-batch (forward + backward), by part, and its peak."""
    h, BT = a.hidden, B * T
    A = layer_activation_bytes_per_token(a, s, T)
    if checkpointing:
        stored = BT * (a.layers * s * h + 2 * s * a.head_dim) + B * T * T
    else:
        stored = BT * (a.layers * A + 2 * s * a.head_dim)
    head = BT * (4 * h + 2 * s * h)
    logits = BT * s * a.vocab
    c = min(chunk, BT)
    # a chunk's fp32 working set: logits.float() (a copy only when s < 4), / temperature, logsumexp's backward
    loss_bwd = 2 * BT * s * a.vocab + (3 if s < 4 else 2) * 4 * a.vocab * c
    layer_bwd = BT * ((A if checkpointing else 0) + 2 * s * a.intermediate + 2 * s * h)
    peak = stored + max(head + logits + loss_bwd, layer_bwd)
    return {
        "A_layer": A,
        "stored": stored,
        "head": head,
        "logits": logits,
        "loss_bwd": loss_bwd,
        "layer_bwd": layer_bwd,
        "peak": peak,
    }


def fsdp_buffer_bytes(a: Arch, freeze_vision: bool, s: int = 2) -> int:
    """Peak of FSDP2's unsharded (all-gathered) bf16 parameters and unsharded gradients of the units in flight."""
    p = param_counts(a)
    root = p["vision_other"]  # patch embed + merger: not in a wrapped unit, unsharded all step
    root_tr = 0 if freeze_vision else root
    layer = p["layer"]
    if a.tied:  # the embedding shares the lm_head's weight: both in the tail unit
        tail, embed = p["embed"] + p["final_norm"], 0
    else:
        tail, embed = p["lm_head"] + p["final_norm"], p["embed"]
    units = max(tail + tail + layer, 2 * layer + layer, embed + embed)
    return s * (root + root_tr + units)


# ----------------------------------------------------------------------------------------------------- vLLM
def vllm_bytes(
    a: Arch,
    gpu_bytes: float,
    util: float,
    max_num_batched_tokens: int = 16384,
    max_num_seqs: int = 256,
    cuda_graphs: float = 1 * GiB,
    s: int = 2,
) -> dict[str, float]:
    p = param_counts(a)
    h, q, kv = a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim
    budget = util * gpu_bytes
    weights = s * p["total"]
    acts = max_num_batched_tokens * s * (3 * a.intermediate + 2 * h + q + 2 * kv) + 2 * 4 * max_num_seqs * a.vocab
    kv_cache = budget - weights - acts - cuda_graphs
    return {
        "budget": budget,
        "weights": weights,
        "activations": acts,
        "cuda_graphs": cuda_graphs,
        "kv_cache": kv_cache,
        "kv_per_token": 2 * a.layers * kv * s,
    }


# ----------------------------------------------------------------------------------------------------- the plan
def checkpoint_bytes(a: Arch, freeze_vision: bool, N: int, export_bytes: int = 2) -> dict:
    """Per-rank bytes of one checkpoint (see the docstring): on disk, and in host RAM while saving, exporting and
    resuming."""
    p = param_counts(a)
    P, P_tr = p["total"], trainable_params(a, freeze_vision)
    largest = max(p["embed"], p["lm_head"], a.hidden * a.intermediate)  # the embedding at 7B
    shard = (4 * P + 8 * P_tr) / N
    return {
        "state_per_rank": shard,  # state/__{rank}_0.distcp: one file per rank
        "state_total": N * shard,
        "policy": export_bytes * P,  # policy/*.safetensors, written by rank 0
        "host_save": 4 * largest / N,  # DCP stages tensor by tensor
        "host_export_rank0": export_bytes * P,  # the gathered export copy, rank 0 only
        "gpu_export": export_bytes * largest,  # one all-gathered tensor, every rank
        "host_resume": 4 * largest / N,
        "before_rank0": 4 * P + 8 * P_tr,  # accelerate's FULL_STATE_DICT save/load through rank 0
    }


def preset_config(name: str):
    """GRPOConfig with the preset applied, the way train_grpo.py sees it (config.parse with --preset NAME)."""
    return config.parse(config.GRPOConfig, ["--preset", name] if name else [])


def plan(
    a: Arch,
    cfg,
    gpus: int,
    gpu_gib: float,
    prompt_len: int = 1024,
    overhead_gib: float = 1.0,
    kl_coef: float | None = None,
) -> dict:
    """Per-GPU bytes of every item in the training and the rollout phase (see the docstring)."""
    N, s = gpus, 2
    p = param_counts(a)
    P, P_tr = p["total"], trainable_params(a, cfg.freeze_vision)
    B, T = cfg.micro_batch_size, prompt_len + cfg.max_new_tokens
    act = activation_bytes(a, B, T, s, cfg.gradient_checkpointing)
    act_other = activation_bytes(a, B, T, s, not cfg.gradient_checkpointing)
    gpu = gpu_gib * GiB
    vl = vllm_bytes(a, gpu, cfg.vllm_gpu_memory_utilization) if cfg.engine == "vllm" else None
    kl = cfg.kl_coef if kl_coef is None else kl_coef
    ref = 2 * P / N if kl > 0 else 0  # model.load_reference: bf16, sharded like the policy under FSDP
    rows = [  # (item, training phase, rollout phase, note)
        ("weights, fp32 master, sharded", 4 * P / N, 4 * P / N, f"4 x {P / 1e9:.2f}B / {N}"),
        ("gradients, fp32, sharded", 4 * P_tr / N, 0, f"4 x {P_tr / 1e9:.2f}B trainable / {N}; None between updates"),
        ("AdamW m + v, fp32, sharded", 8 * P_tr / N, 8 * P_tr / N, f"8 x {P_tr / 1e9:.2f}B / {N}"),
        (
            "FSDP2 unsharded bf16 params + grads",
            fsdp_buffer_bytes(a, cfg.freeze_vision),
            0,
            "tail [norm, lm_head] + a layer",
        ),
        (
            f"activations, {'with' if cfg.gradient_checkpointing else 'no'} checkpointing",
            act["peak"],
            0,
            f"B={B} x T={T} ({prompt_len} prompt + {cfg.max_new_tokens} response)",
        ),
    ]
    if vl:
        rows += vllm_rows(vl, cfg, gpu_gib)
    rows += [
        (
            "KL reference model" + ("" if kl > 0 else f" (kl_coef={kl:g}: not loaded)"),
            ref,
            ref,
            f"bf16, sharded: 2 x {P / 1e9:.2f}B / {N} (model.load_reference)" if kl > 0 else "",
        ),
        ("CUDA context + NCCL (assumed)", overhead_gib * GiB, overhead_gib * GiB, "--overhead_gb"),
    ]
    train = sum(r[1] for r in rows)
    rollout = sum(r[2] for r in rows)
    # weight sync (model.trainer_weights): vLLM's weights are awake, its KV cache not yet; one parameter is gathered
    # whole in fp32 and cast to bf16 at a time, the largest being the embedding (or lm_head): 6 bytes x its size
    sync = 4 * P / N + 8 * P_tr / N + ref + overhead_gib * GiB
    if vl:
        sync += vl["weights"] + vl["cuda_graphs"] + 6 * max(p["embed"], p["lm_head"], p["layer"])
    export_bytes = 4 if getattr(cfg, "export_dtype", "auto") == "float32" else 2
    ckpt = checkpoint_bytes(a, cfg.freeze_vision, N, export_bytes)
    return {
        "arch": a,
        "params": p,
        "P_train": P_tr,
        "B": B,
        "T": T,
        "rows": rows,
        "train": train,
        "rollout": rollout,
        "sync": sync,
        "ckpt": ckpt,
        "act": act,
        "act_other": act_other,
        "vllm": vl,
        "gpu": gpu,
        "cfg": cfg,
        "gpus": N,
        "kl": kl,
        "overhead": overhead_gib * GiB,
    }


def vllm_rows(vl: dict, cfg, gpu_gib: float) -> list[tuple]:
    """plan's rows for the colocated vLLM engine (vllm_bytes): its weights, activations + CUDA graphs, KV cache."""
    awake = 0 if cfg.vllm_sleep else 1  # while training, asleep vLLM keeps only its CUDA graphs
    return [
        ("vLLM weights, bf16 full copy", awake * vl["weights"], vl["weights"], "TP=1, one engine per rank"),
        (
            "vLLM activations (est.) + CUDA graphs (assumed)",
            awake * vl["activations"] + vl["cuda_graphs"],
            vl["activations"] + vl["cuda_graphs"],
            "graphs stay while asleep" if cfg.vllm_sleep else "no sleep mode",
        ),
        (
            "vLLM KV cache",
            awake * vl["kv_cache"],
            vl["kv_cache"],
            f"util {cfg.vllm_gpu_memory_utilization} x {gpu_gib:g} GiB minus the above",
        ),
    ]


def print_plan(r: dict, gpu_gib: float) -> None:
    cfg, p, vl = r["cfg"], r["params"], r["vllm"]
    g = lambda x: f"{x / GiB:8.2f}"  # noqa: E731
    print(
        f"parameters: {p['total'] / 1e9:.3f}B total = {p['text'] / 1e9:.3f}B language model + {p['vision'] / 1e9:.3f}B "
        f"vision tower; trainable {r['P_train'] / 1e9:.3f}B (freeze_vision={cfg.freeze_vision})"
    )
    print(
        f"per GPU, {r['gpus']} GPUs of {gpu_gib:g} GiB, FSDP2 full shard + bf16 mixed precision, micro-batch "
        f"{r['B']} x {r['T']} tokens\n"
    )
    print(f"{'item':<52} {'training':>8} {'rollout':>8}  GiB   note")
    print("-" * 110)
    for name, tr, ro, note in r["rows"]:
        print(f"{name:<52} {g(tr)} {g(ro)}        {note}")
    print("-" * 110)
    print(f"{'total':<52} {g(r['train'])} {g(r['rollout'])}")
    other = r["act_other"]["peak"]
    label = "without" if cfg.gradient_checkpointing else "with"
    print(
        f"\nactivations {label} checkpointing would be {other / GiB:.2f} GiB (training total "
        f"{(r['train'] - r['act']['peak'] + other) / GiB:.2f} GiB); of the {r['act']['peak'] / GiB:.2f} GiB, the "
        f"logits [B, T, V] and their gradients take {(r['act']['logits'] + r['act']['loss_bwd']) / GiB:.2f} GiB"
    )
    if vl:
        need_seqs = cfg.rollout_batch_size // r["gpus"] * cfg.group_size
        kv_tokens = vl["kv_cache"] / vl["kv_per_token"]
        print(
            f"vLLM KV cache: {vl['kv_per_token'] / 1024:.0f} KiB per token -> {kv_tokens / 1e3:.0f}k tokens = "
            f"{kv_tokens / r['T']:.0f} sequences of {r['T']} tokens; a rank's rollout is {need_seqs} sequences "
            f"({cfg.rollout_batch_size} prompts / {r['gpus']} x {cfg.group_size}), "
            f"{need_seqs * r['T'] * vl['kv_per_token'] / GiB:.1f} GiB if all reach full length"
        )
        free_at_start = r["gpu"] - r["rows"][0][1] - r["overhead"]
        print(
            f"vLLM start-up: needs {vl['budget'] / GiB:.1f} GiB free; the trainer then holds its fp32 shards + "
            f"overhead, {free_at_start / GiB:.1f} GiB free -> "
            f"{'ok' if free_at_start >= vl['budget'] else 'REFUSES TO START'}"
        )
        if cfg.vllm_sleep:
            print(
                f"sleep level 1 frees {(vl['weights'] + vl['kv_cache'] + vl['activations']) / GiB:.1f} GiB of GPU "
                f"memory while training and needs {vl['weights'] / GiB:.1f} GiB of pinned host RAM per rank for the "
                f"weights ({r['gpus'] * vl['weights'] / GiB:.0f} GiB on the node)"
            )
        print(
            f"weight sync (vLLM weights awake, KV cache not yet, one parameter gathered at a time): "
            f"{r['sync'] / GiB:.1f} GiB"
        )
    else:
        print(f"engine {cfg.engine}: generation runs in the trainer's model; its KV cache is not planned here")
    c, N = r["ckpt"], r["gpus"]
    print(f"\ncheckpoints every {cfg.save_every} steps (nanosrpo/checkpoint.py), per rank of {N}:")
    print(
        f"  state/   {c['state_per_rank'] / GiB:.2f} GiB on disk per rank (fp32 weight + AdamW shards; "
        f"{c['state_total'] / GiB:.1f} GiB in all); host RAM while saving or resuming "
        f"~{c['host_save'] / GiB:.2f} GiB (one tensor shard at a time)"
    )
    print(
        f"  policy/  {c['policy'] / GiB:.2f} GiB on disk ({'fp32' if c['policy'] == 4 * p['total'] else 'bf16'}), "
        f"gathered into rank 0's host RAM ({c['host_export_rank0'] / GiB:.2f} GiB there, ~0 on the others; "
        f"{c['gpu_export'] / GiB:.2f} GiB transient on each GPU)"
    )
    print(
        f"  (through rank 0, as before: {c['before_rank0'] / GiB:.1f} GiB of fp32 weights + AdamW in its host RAM "
        f"per save and per resume)"
    )
    peak = max(r["train"], r["rollout"])
    phase = "training" if r["train"] >= r["rollout"] else "rollout"
    left = r["gpu"] - peak
    verdict = "FITS" if left >= 0 else "DOES NOT FIT"
    print(
        f"\n{verdict} in {gpu_gib:g} GiB: peak {peak / GiB:.1f} GiB ({phase} phase), headroom {left / GiB:.1f} GiB "
        f"({100 * left / r['gpu']:.0f}%) for allocator fragmentation and what this plan leaves out"
    )


# ----------------------------------------------------------------------------------------------------- CPU check
def live_bytes(fn) -> tuple[int, int]:
    """(peak, end) of live tensor bytes allocated while fn() runs, relative to its start, from the profiler's events."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:  # + allocation, - free (frees of tensors made before profiling started are not reported)
        cur += n
        peak = max(peak, cur)
    del torch
    return peak, cur


def check_batch(processor, records: list[dict], B: int, T: int, vocab: int, seed: int = 0) -> dict:
    """A right-padded GRPO micro-batch as train_grpo.py builds it: prompt (with its image) + a completion; T tokens
    for all but the last sequence, which is 10% shorter (padding, so the attention mask is a real one)."""
    import torch

    from nanosrpo import data, prompts

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(B):
        prompt = data.render_prompt(records[i % len(records)], prompts.SRPO_SYSTEM, processor)
        n = T if i < B - 1 or B == 1 else int(0.9 * T)
        if len(prompt["ids"]) >= n:
            raise SystemExit(f"--check_tiny: T={T} is shorter than the prompt ({len(prompt['ids'])} tokens)")
        completion = torch.randint(0, vocab, (n - len(prompt["ids"]),), generator=g).tolist()
        samples.append(
            {
                "input_ids": prompt["ids"] + completion,
                "loss_mask": [0] * len(prompt["ids"]) + [1] * len(completion),
                "images": prompt["images"],
            }
        )
    return data.collate(processor, samples)


def measure_step(policy, batch: dict) -> dict:
    """Live tensor bytes of one real GRPO micro-batch step on CPU: forward + backward with the gradients starting as
    None (-> gradients), AdamW's first step (-> its state), then, with the gradients already allocated, a forward
    (-> what it keeps for backward) and a backward (-> the activations' peak)."""
    import torch

    from nanosrpo import forward, grpo

    params = [p for p in policy.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    opt = torch.optim.AdamW(params, lr=1e-6, foreach=True)
    adv = torch.linspace(-1, 1, batch["input_ids"].shape[0])
    state = {}

    def forward_pass():
        lp = forward.sequence_logprobs(policy, batch)
        state["loss"] = grpo.policy_loss(lp, lp.detach(), adv, batch["loss_mask"])[0]

    def backward_pass():
        state.pop("loss").backward()

    _, grads = live_bytes(lambda: (forward_pass(), backward_pass()))
    _, adam = live_bytes(opt.step)
    opt.zero_grad(set_to_none=False)  # keep the gradient tensors: the next backward accumulates into them
    fwd_peak, kept = live_bytes(forward_pass)
    bwd_peak, _ = live_bytes(backward_pass)
    return {"grads": grads, "adam": adam, "kept": kept, "activations": max(fwd_peak, kept + bwd_peak)}


def check_tiny(shapes: list[tuple[int, int, bool]], vocab: int = 0, out=print) -> list[dict]:
    """Build the tiny 10m model, measure real micro-batch steps at `shapes` (B, T, checkpointing), compare with the
    plan. vocab > 0: the same config with a larger vocabulary (random init), to make the logits term matter."""
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="memory_plan_") as d:  # the built model and images go when we are done
        return _check_tiny(Path(d), shapes, vocab, out)


def _check_tiny(tmp: Path, shapes: list[tuple[int, int, bool]], vocab: int, out) -> list[dict]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from nanosrpo import data, model, synthetic, tiny

    tiny.build_tiny(tmp / "tiny", size="10m")
    policy, processor = model.load_policy(str(tmp / "tiny"))
    cfg_dict = json.loads((tmp / "tiny" / "config.json").read_text())
    if vocab:  # same architecture, larger vocabulary, random init
        vl_cfg = Qwen2_5_VLConfig.from_pretrained(tmp / "tiny")
        vl_cfg.text_config.vocab_size = cfg_dict["text_config"]["vocab_size"] = vocab
        policy = Qwen2_5_VLForConditionalGeneration(vl_cfg)
    a = arch_from_config(cfg_dict)
    n_params = sum(p.numel() for p in policy.parameters())
    out(
        f"tiny 10m{f' with vocabulary {vocab}' if vocab else ''}: {n_params:,} parameters (formula: "
        f"{param_counts(a)['total']:,}); fp32 on CPU, 1 process, no FSDP, vision tower frozen"
    )
    model.freeze_vision(policy)
    policy.train()
    synthetic.write_rl_split(tmp / "data", "check", 4, seed=5)
    records = data.load_rl_records(tmp / "data" / "check.jsonl")
    P_tr = trainable_params(a, True)
    results = []
    for B, T, ckpt in shapes:
        if ckpt:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_disable()
        batch = check_batch(processor, records, B, T, min(a.vocab, 400))
        m = measure_step(policy, batch)
        act = activation_bytes(a, B, T, 4, ckpt)
        planned = {
            "grads": 4 * P_tr,
            "adam": 8 * P_tr,
            "kept": act["stored"] + act["head"] + act["logits"],
            "activations": act["peak"],
        }
        results.append({"B": B, "T": T, "checkpointing": ckpt, "measured": m, "planned": planned})
        out(
            f"  B={B} T={T} checkpointing={'on ' if ckpt else 'off'}  "
            + "  ".join(f"{k} {m[k] / 2**20:.1f}/{planned[k] / 2**20:.1f} ({m[k] / planned[k]:.3f})" for k in planned)
        )
    return results


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=PRESET, help="GRPO preset whose settings are planned (config.PRESETS)")
    ap.add_argument("--model_config", default="", help="a local config.json (default: Qwen2.5-VL-7B-Instruct's values)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs = FSDP processes")
    ap.add_argument("--gpu_gb", type=float, default=80, help="memory of one GPU in GiB (an H100 80GB reports 79.6)")
    ap.add_argument(
        "--prompt_len",
        type=int,
        default=0,
        help="prompt tokens assumed (images included); T = this + max_new_tokens. 0: the config's "
        "max_prompt_length where GRPOConfig has one, else 1024",
    )
    ap.add_argument("--micro_batch_size", type=int, default=0, help="override the preset's micro_batch_size")
    ap.add_argument(
        "--kl_coef", type=float, default=None, help="override the preset's kl_coef (> 0 loads a reference model)"
    )
    ap.add_argument("--overhead_gb", type=float, default=1.0, help="CUDA context + NCCL buffers per GPU, GiB (assumed)")
    ap.add_argument(
        "--check_tiny", action="store_true", help="measure real CPU steps of the tiny model against the formulas"
    )
    args = ap.parse_args(argv)

    if args.check_tiny:
        print(
            "CPU check: live tensor bytes measured / planned MiB (ratio). grads: after a backward from None; adam: "
            "after AdamW's first step;\nkept: after a forward (what backward needs: stored + head + logits); "
            "activations: the peak of forward + backward.\nTolerance: gradients and AdamW within 1%, kept and "
            "activations within 10%"
        )
        check_tiny([(2, 256, False), (4, 512, False), (4, 512, True), (8, 512, True)])
        check_tiny([(4, 512, False), (4, 512, True)], vocab=32768)
        return
    if args.model_config:
        path = Path(args.model_config)
        if not path.is_file():
            raise SystemExit(f"--model_config {path}: no such file")
        cfg_dict = json.loads(path.read_text())
    else:
        cfg_dict = QWEN25_VL_7B_CONFIG
    cfg = preset_config(args.preset)
    if args.micro_batch_size:
        cfg.micro_batch_size = args.micro_batch_size
    print(
        f"model: {args.model_config or 'Qwen2.5-VL-7B-Instruct (config.json values in bench/memory_plan.py)'}; "
        f"preset: {args.preset or '(defaults)'}: micro_batch_size {cfg.micro_batch_size}, max_new_tokens "
        f"{cfg.max_new_tokens}, gradient_checkpointing {cfg.gradient_checkpointing}, "
        f"freeze_vision {cfg.freeze_vision}, "
        f"engine {cfg.engine} (gpu_memory_utilization {cfg.vllm_gpu_memory_utilization}, sleep {cfg.vllm_sleep}), "
        f"kl_coef {cfg.kl_coef if args.kl_coef is None else args.kl_coef}"
    )
    prompt_len = args.prompt_len or getattr(cfg, "max_prompt_length", 0) or 1024  # the field is being added on main
    r = plan(arch_from_config(cfg_dict), cfg, args.gpus, args.gpu_gb, prompt_len, args.overhead_gb, args.kl_coef)
    print_plan(r, args.gpu_gb)


if __name__ == "__main__":
    main()
