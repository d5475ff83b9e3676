"""Configuration: one dataclass per script, parsed by transformers.HfArgumentParser.

Defaults are the tiny CPU run. A script takes CLI flags (`--lr 1e-6`), a YAML file (`train_grpo.py run.yaml`, the
file's keys are the field names), and `--preset NAME` (the paper's settings), applied in that order of precedence:
CLI flags > YAML > preset > defaults. Everything a run decides is written next to its outputs (see log.write_run_info).
"""

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import yaml

TINY = "tiny"  # the embedded default model/data: built offline on first use (see nanosrpo/tiny.py)


@dataclass
class CommonConfig:
    out_dir: str = field(default="out/run", metadata={"help": "where checkpoints, metrics.jsonl and samples go"})
    seed: int = field(default=0, metadata={"help": "seed for data order, sampling and init"})
    cpu_threads: int = field(
        default=0, metadata={"help": "threads of a single-process CPU run (0: all physical cores)"}
    )
    cache_dir: str = field(
        default="out/tiny", metadata={"help": "where the tiny world (model, data, base/SFT) is cached"}
    )
    tiny_size: str = field(default="1m", metadata={"help": "tiny model size: 0.2m, 1m or 10m parameters"})
    text_only: bool = field(default=False, metadata={"help": "tiny world: text-only Qwen2 twin and text grids"})
    preset: str = field(default="", metadata={"help": "named settings, e.g. qwen2.5-vl-7b (see config.PRESETS)"})


@dataclass
class EngineConfig:
    """Generation options (nanosrpo/engine.py), shared by every script that samples from a policy."""

    engine: str = field(default="transformers", metadata={"help": "generation engine: transformers or vllm"})
    max_new_tokens: int = field(default=200, metadata={"help": "max response tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs are scored at it too)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    gen_batch_size: int = field(default=64, metadata={"help": "transformers engine: sequences per generate call"})
    vllm_gpu_memory_utilization: float = field(default=0.15, metadata={"help": "vLLM memory fraction (CPU: of RAM)"})
    vllm_sleep: bool = field(default=False, metadata={"help": "GPU: put vLLM to sleep (level 1) while training"})
    vllm_max_model_len: int = field(default=1024, metadata={"help": "vLLM context length (prompt + response tokens)"})
    vllm_max_images: int = field(
        default=1, metadata={"help": "vLLM: images per prompt at most (MMMU-Pro standard has up to 7)"}
    )


@dataclass
class TrainConfig(CommonConfig):
    """Options both training scripts share: optimizer, schedule, run length, checkpoints. Defaults are SFT's tiny run;
    GRPOConfig sets its own defaults for some with `_default` (same option, same help, another value)."""

    model: str = field(default=TINY, metadata={"help": "policy to train: local path, hub id, or 'tiny'"})
    image_dir: str = field(default="", metadata={"help": "folder image paths resolve against (default: data's folder)"})
    lr: float = field(
        default=3e-3,
        metadata={"help": "peak learning rate (paper, 7B: SFT 1e-5, GRPO 1e-6; the tiny model needs more)"},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "linear warmup over this fraction of optimizer steps, then cosine"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this"})
    max_steps: int = field(
        default=0, metadata={"help": "optimizer steps (SFT) or rollout steps (GRPO); 0: run --epochs"}
    )
    epochs: float = field(default=2.0, metadata={"help": "passes over the data, used when --max_steps is 0"})
    freeze_vision: bool = field(
        default=True, metadata={"help": "freeze the vision tower and merger (visual.*), as the reference"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward to save memory"}
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "sdpa | eager | flash_attention_2 (GPU, flash-attn installed: trains on padding-free packed "
            "micro-batches)"
        },
    )
    save_every: int = field(default=500, metadata={"help": "checkpoint every N steps (0: only the final one)"})
    keep_checkpoints: int = field(
        default=2, metadata={"help": "newest checkpoints kept (older ones are deleted; 0: all)"}
    )
    resume: bool = field(
        default=False, metadata={"help": "continue from the newest checkpoint in --out_dir, if there is one"}
    )
    export_dtype: str = field(
        default="auto",
        metadata={
            "help": (
                "dtype of checkpoints' policy/ (the safetensors handed on; --resume reads the sharded state/, as "
                "trained): auto = bfloat16 under bf16 mixed precision, else as trained (fp32 on CPU); bfloat16; float32"
            )
        },
    )
    fsdp: bool = field(
        default=False,
        metadata={
            "help": (
                "shard the policy with torch FSDP2 fully_shard per decoder layer and vision block, reshard after "
                "forward, as accelerate_fsdp.yaml does on GPUs; for the CPU rehearsal (gloo); on GPUs use accelerate's "
                "FSDP config instead"
            )
        },
    )


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def check_attn_implementation(name: str, engine: str | None = None, bf16: bool = True) -> None:
    """Refuse, in one line and before anything loads, an attention kernel this run cannot use: flash-attn exists
    only for CUDA GPUs and is an optional install (requirements-gpu.txt), and transformers' own error would come
    later, as a traceback, after the data and the model have been read. GRPO (engine given): the transformers engine
    generates with the trainer's fp32 policy outside autocast, and flash-attn computes in fp16/bf16 only (SFT: the
    same without --bf16's autocast)."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise SystemExit(f"--attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}")
    if name == "flash_attention_2":
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--attn_implementation flash_attention_2 needs a CUDA GPU (none here); use sdpa on CPU")
        if engine == "transformers":
            raise SystemExit(
                "--attn_implementation flash_attention_2 needs --engine vllm: the transformers engine "
                "samples from the fp32 policy, which flash-attn (fp16/bf16 only) cannot run"
            )
        if not bf16:
            raise SystemExit(
                "--attn_implementation flash_attention_2 needs --bf16 true: without autocast the fp32 "
                "policy's attention inputs are fp32, which flash-attn (fp16/bf16 only) cannot run"
            )
        if importlib.util.find_spec("flash_attn") is None:
            raise SystemExit(
                "--attn_implementation flash_attention_2 needs the flash-attn package: "
                "pip install flash-attn --no-build-isolation (see requirements-gpu.txt)"
            )


def _default(cls, name: str, value):
    """The option `name` as `cls` declares it (its help), with another default."""
    return field(default=value, metadata=cls.__dataclass_fields__[name].metadata)


@dataclass
class SFTConfig(TrainConfig):
    out_dir: str = field(default="out/sft", metadata={"help": "where checkpoints, metrics.jsonl and run.json go"})
    data: str = field(
        default=TINY, metadata={"help": "SFT JSONL (messages or sharegpt layout), or 'tiny' (see --stage)"}
    )
    stage: str = field(
        default="reflect",
        metadata={
            "help": "what 'tiny' means: reflect = tiny base on two-round records; base = random init on one-round"
        },
    )
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_length: int = field(
        default=1024, metadata={"help": "records longer than this many tokens (images included) are skipped"}
    )
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on GPU (CPU always trains in fp32)"})
    bucket: int = field(
        default=32, metadata={"help": "length bucketing: sort by length within shuffled chunks of this many batches"}
    )


@dataclass
class GRPOConfig(EngineConfig, TrainConfig):
    data: str = field(default=TINY, metadata={"help": "RL JSONL {id, question, image, answer, choices}, or 'tiny'"})
    eval_data: str = field(
        default=TINY, metadata={"help": "held-out JSONL for greedy eval ('' = none; 'tiny' = tiny eval)"}
    )
    # --- the prompt
    system_prompt: str = field(
        default="srpo",
        metadata={
            "help": "srpo: the project's instruction; boxed: the same tags with the final answer in \\boxed{} (the "
            "reference runs' convention)"
        },
    )
    max_prompt_length: int = field(
        default=1024,
        metadata={
            "help": "a rendered prompt (image tokens included) longer than this is an error naming the record "
            "(0: no cap)"
        },
    )
    min_pixels: int = field(
        default=0, metadata={"help": "images are resized to at least this many pixels (0: the processor's own bound)"}
    )
    max_pixels: int = field(
        default=0, metadata={"help": "images are resized to at most this many pixels (0: the processor's own bound)"}
    )
    # --- the reward (rewards.srpo_reward)
    reward_variant: str = field(
        default="paper",
        metadata={
            "help": "paper (SRPO Eqs. 4-8), code (the released reward), grpo (one-round baseline), "
            "two_step (two rounds, format + final-answer accuracy: Table 3's GRPO + two-step thinking)"
        },
    )
    alpha: float = field(default=0.1, metadata={"help": "weight of the length reward f_len"})
    use_effectiveness: bool = field(default=True, metadata={"help": "ablation: keep the I_eff term (paper Table 4)"})
    use_length: bool = field(default=True, metadata={"help": "ablation: keep the alpha * f_len term (paper Table 4)"})
    # --- rollouts (the engine options are EngineConfig's)
    group_size: int = field(default=8, metadata={"help": "completions per prompt (G)"})
    rollout_batch_size: int = field(default=8, metadata={"help": "prompts per step, all processes together"})
    # The tiny run samples at 0.7, not the paper's 1.0 (the preset's): at 1.0 the tiny policy slips far more often than
    # under the greedy eval, so RL tunes the reflection's verdict for a mix of first answers that greedy decoding never
    # produces (docs/results.md, "How the tiny defaults were found").
    temperature: float = _default(EngineConfig, "temperature", 0.7)
    filter_accuracy: bool = field(
        default=False,
        metadata={
            "help": "keep groups whose mean accuracy reward (as a fraction of its maximum) is in [filter_low, "
            "filter_high] (dynamic sampling)"
        },
    )
    filter_low: float = field(default=0.1, metadata={"help": "accuracy filter lower bound"})
    filter_high: float = field(default=0.9, metadata={"help": "accuracy filter upper bound"})
    max_draws: int = field(
        default=4,
        metadata={
            "help": "dynamic sampling: prompt batches drawn at most per step (a short batch is logged as a warning)"
        },
    )
    # --- the update (grpo.policy_loss)
    train_batch_size: int = field(
        default=64, metadata={"help": "sequences per optimizer update, all processes together"}
    )
    micro_batch_size: int = field(default=16, metadata={"help": "sequences per forward/backward on one process"})
    share_prompts: bool = field(
        default=True,
        metadata={
            "help": "with sdpa: compute each group's prompt once per micro-batch, not once per completion "
            "(nanosrpo.attention; same log-probs)"
        },
    )
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each step's rollouts"})
    lr: float = _default(TrainConfig, "lr", 2e-5)  # the tiny default run (docs/results.md); the preset sets 1e-6
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    warmup_ratio: float = _default(TrainConfig, "warmup_ratio", 0.03)
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to this fraction of lr"})
    clip_low: float = field(default=0.2, metadata={"help": "PPO clip epsilon below 1"})
    clip_high: float = field(default=0.2, metadata={"help": "PPO clip epsilon above 1 (DAPO clip-higher: 0.28)"})
    kl_coef: float = field(
        default=0.0, metadata={"help": "KL to the frozen initial policy (0: no reference model is loaded)"}
    )
    aggregation: str = field(
        default="seq-mean-token-mean", metadata={"help": "seq-mean-token-mean | token-mean | seq-mean-token-sum-norm"}
    )
    normalize_std: bool = field(default=True, metadata={"help": "divide advantages by the group std (False: Dr. GRPO)"})
    tis_cap: float = field(
        default=0.0,
        metadata={
            "help": "truncated importance sampling for engine/trainer log-prob mismatch: cap (e.g. 3.0); 0 = off"
        },
    )
    ratio_cap: float = field(
        default=0.0,
        metadata={
            "help": "clamp the importance ratio at this before the PPO clip "
            "(dual-clip: a token with a negative advantage stops pushing past it; reference: 3.0); "
            "0 = none, else above 1 + clip_high"
        },
    )
    # --- length of the run, logging, checkpoints
    max_steps: int = _default(TrainConfig, "max_steps", 40)
    epochs: float = _default(TrainConfig, "epochs", 1.0)
    eval_every: int = field(default=10, metadata={"help": "greedy eval on eval_data every N steps (0: never)"})
    eval_size: int = field(default=200, metadata={"help": "eval records used"})
    samples_every: int = field(default=10, metadata={"help": "write a few completions to samples.jsonl every N steps"})
    save_every: int = _default(TrainConfig, "save_every", 20)
    report_to: str = field(default="", metadata={"help": "accelerate trackers: tensorboard, wandb, ... ('' = none)"})
    plot: bool = field(default=True, metadata={"help": "draw training-dynamics PNGs at the end (needs matplotlib)"})


@dataclass
class CurateConfig(EngineConfig, CommonConfig):
    out_dir: str = field(
        default="out/curate", metadata={"help": "answers, reflections, SFT files and summary.json go here"}
    )
    model: str = field(
        default=TINY, metadata={"help": "policy whose first attempts get reflections ('tiny': the tiny base)"}
    )
    data: str = field(
        default=TINY, metadata={"help": "questions with gold answers: RL JSONL, LLaVA-CoT-100k or Mulberry-260k layout"}
    )
    image_dir: str = field(default="", metadata={"help": "folder image paths resolve against (default: data's folder)"})
    steps: str = field(
        default="answer,reflect,build", metadata={"help": "sub-steps to run, comma-separated; each skips what is done"}
    )
    max_questions: int = field(default=0, metadata={"help": "use the first N questions (0: all)"})
    strict: bool = field(
        default=False, metadata={"help": "a bad input record is fatal (default: reported, skipped, counted)"}
    )
    # --- answer: the policy's own one-round attempts (the EngineConfig options: engine, temperature, ...)
    samples_per_question: int = field(
        default=2, metadata={"help": "attempts per question (sampled, so right and wrong ones occur)"}
    )
    greedy: bool = field(
        default=False, metadata={"help": "greedy attempts instead of sampled ones (then use 1 sample)"}
    )
    # --- reflect: the teacher
    teacher: str = field(
        default="oracle",
        metadata={"help": "openai (any OpenAI-compatible endpoint), local (a checkpoint), oracle (tiny world)"},
    )
    teacher_url: str = field(
        default="https://api.openai.com/v1", metadata={"help": "openai: base URL of the chat-completions API"}
    )
    teacher_model: str = field(default="", metadata={"help": "openai: model name; local: checkpoint path or hub id"})
    teacher_api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "openai: NAME of the environment variable holding the key"}
    )
    teacher_concurrency: int = field(default=8, metadata={"help": "openai: requests in flight at once"})
    teacher_max_retries: int = field(
        default=5, metadata={"help": "openai: retries on 429/5xx/timeouts (exponential backoff, Retry-After honoured)"}
    )
    teacher_timeout: float = field(default=120.0, metadata={"help": "openai: seconds per request attempt"})
    teacher_max_tokens: int = field(default=1024, metadata={"help": "max tokens of a teacher reply"})
    teacher_temperature: float = field(
        default=0.0, metadata={"help": "teacher sampling temperature (local: 0 = greedy)"}
    )
    teacher_cache: str = field(
        default="",
        metadata={"help": "openai: on-disk reply cache keyed by the request (default: <out_dir>/teacher_cache)"},
    )
    usd_per_mtok_in: float = field(
        default=0.0, metadata={"help": "teacher price per million prompt tokens, for the cost estimate"}
    )
    usd_per_mtok_out: float = field(default=0.0, metadata={"help": "teacher price per million completion tokens"})
    # --- build: the SFT mix
    correct_fraction: float = field(
        default=0.3, metadata={"help": "share of correct-and-refined records (paper: 0.3; the rest flawed-and-revised)"}
    )
    own_mix: bool = field(
        default=False,
        metadata={
            "help": "keep every reflected attempt, so the correct share is the "
            "policy's own accuracy (the tiny world's recipe; overrides --correct_fraction)"
        },
    )
    val_fraction: float = field(default=0.05, metadata={"help": "share of questions held out as the validation split"})


@dataclass
class EvalConfig(EngineConfig, CommonConfig):
    out_dir: str = field(
        default="out/eval",
        metadata={"help": "results.json, results.md, predictions.jsonl (one folder per benchmark when several)"},
    )
    model: str = field(
        default=TINY, metadata={"help": "policy: local path, hub id, or 'tiny' (the tiny world's policy for --prompt)"}
    )
    benchmark: str = field(
        default="jsonl",
        metadata={"help": "mathvista, mathverse, mathvision, mmmu_pro, mmmu_pro_vision, wemath or jsonl; several: a,b"},
    )
    data: str = field(
        default=TINY,
        metadata={
            "help": "local file or folder per benchmark (comma-separated like --benchmark); 'tiny' = the tiny eval "
            "split"
        },
    )
    split: str = field(
        default="", metadata={"help": "split file to pick in a --data folder (default: testmini; mmmu_pro: test)"}
    )
    image_dir: str = field(
        default="", metadata={"help": "folder image paths resolve against (default: the data file's folder)"}
    )
    predictions: str = field(
        default="",
        metadata={
            "help": "score this JSONL of {id, response} instead of generating (comma-separated like --benchmark)"
        },
    )
    prompt: str = field(default="srpo", metadata={"help": "system prompt: srpo (two rounds), grpo (one round) or none"})
    n_samples: int = field(
        default=1, metadata={"help": "responses per record (> 1 needs --temperature > 0): mean accuracy and pass@k"}
    )
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature; 0 = greedy"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N records of each benchmark (0: all)"})


# ------------------------------------------------------------------------------------------------------ option ranges
# What each numeric option may be, checked by parse() before anything loads: a nonsense value ends in one line naming
# the flag (`--group_size must be at least 1, got 0`), not in a traceback from deep inside the run. Keyed by field
# name (an option means the same in every script that has it); 0 is allowed where the help gives it a meaning.
AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
AT_LEAST_0 = (lambda v: v >= 0, "0 or more")
ABOVE_0 = (lambda v: v > 0, "above 0")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
BELOW_1 = (lambda v: 0 <= v < 1, "in [0, 1)")
SHARE = (lambda v: 0 < v <= 1, "in (0, 1]")
RANGES = {
    # CommonConfig, EngineConfig
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "cpu_threads": AT_LEAST_0,
    "max_new_tokens": AT_LEAST_1,
    "temperature": AT_LEAST_0,
    "top_p": SHARE,
    "gen_batch_size": AT_LEAST_1,
    "vllm_gpu_memory_utilization": SHARE,
    "vllm_max_model_len": AT_LEAST_1,
    "vllm_max_images": AT_LEAST_1,
    # TrainConfig, SFTConfig
    "lr": ABOVE_0,
    "weight_decay": AT_LEAST_0,
    "warmup_ratio": FRACTION,
    "max_grad_norm": ABOVE_0,
    "max_steps": AT_LEAST_0,
    "epochs": ABOVE_0,
    "save_every": AT_LEAST_0,
    "keep_checkpoints": AT_LEAST_0,
    "batch_size": AT_LEAST_1,
    "grad_accum": AT_LEAST_1,
    "max_length": AT_LEAST_1,
    "bucket": AT_LEAST_1,
    # GRPOConfig
    "max_prompt_length": AT_LEAST_0,
    "min_pixels": AT_LEAST_0,
    "max_pixels": AT_LEAST_0,
    "alpha": AT_LEAST_0,
    "group_size": AT_LEAST_1,
    "rollout_batch_size": AT_LEAST_1,
    "filter_low": FRACTION,
    "filter_high": FRACTION,
    "max_draws": AT_LEAST_1,
    "train_batch_size": AT_LEAST_1,
    "micro_batch_size": AT_LEAST_1,
    "ppo_epochs": AT_LEAST_1,
    "adam_beta1": BELOW_1,
    "adam_beta2": BELOW_1,
    "min_lr_ratio": FRACTION,
    "clip_low": BELOW_1,
    "clip_high": AT_LEAST_0,
    "kl_coef": AT_LEAST_0,
    "tis_cap": AT_LEAST_0,
    "ratio_cap": AT_LEAST_0,
    "eval_every": AT_LEAST_0,
    "eval_size": AT_LEAST_1,
    "samples_every": AT_LEAST_0,
    # CurateConfig
    "max_questions": AT_LEAST_0,
    "samples_per_question": AT_LEAST_1,
    "teacher_concurrency": AT_LEAST_1,
    "teacher_max_retries": AT_LEAST_0,
    "teacher_timeout": ABOVE_0,
    "teacher_max_tokens": AT_LEAST_1,
    "teacher_temperature": AT_LEAST_0,
    "usd_per_mtok_in": AT_LEAST_0,
    "usd_per_mtok_out": AT_LEAST_0,
    "correct_fraction": FRACTION,
    "val_fraction": FRACTION,
    # EvalConfig
    "n_samples": AT_LEAST_1,
    "limit": AT_LEAST_0,
}


def validate(cfg) -> None:
    """Refuse, in one line naming the flag, settings no run can use: each option's range (RANGES), then the options
    that bound each other, then the choices. parse() calls it, before anything is built or loaded."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        shown = f"{value:g}" if isinstance(value, float) else value
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"--{f.name} must be a finite number, got {shown}")
        if f.name in RANGES and not (isinstance(value, (int, float)) and RANGES[f.name][0](value)):
            raise SystemExit(f"--{f.name} must be {RANGES[f.name][1]}, got {shown}")
    rules = []  # (holds, the line when it does not)
    if isinstance(cfg, GRPOConfig):
        rules += [
            (
                cfg.temperature > 0,
                f"--temperature must be above 0 (rollouts are sampled and scored at it), got {cfg.temperature:g}",
            ),
            (
                cfg.filter_low <= cfg.filter_high,
                f"--filter_low {cfg.filter_low:g} is above --filter_high {cfg.filter_high:g}: no group could pass",
            ),
            (
                not (cfg.min_pixels and cfg.max_pixels) or cfg.min_pixels <= cfg.max_pixels,
                f"--min_pixels {cfg.min_pixels} is above --max_pixels {cfg.max_pixels}",
            ),
            (
                cfg.ratio_cap == 0
                or cfg.ratio_cap > 1 + cfg.clip_high,  # a lower cap would stop positive advantages too
                f"--ratio_cap must be 0 (none) or above 1 + --clip_high = {1 + cfg.clip_high:g}, got {cfg.ratio_cap:g}",
            ),
        ]
    if isinstance(cfg, CurateConfig):
        rules.append(
            (
                cfg.greedy or cfg.temperature > 0,
                "--temperature must be above 0 for sampled attempts (or pass --greedy true), got 0",
            )
        )
    if isinstance(cfg, EvalConfig):
        rules.append(
            (
                cfg.n_samples == 1 or cfg.temperature > 0,
                "--n_samples > 1 needs --temperature > 0 (greedy decoding gives the same response every time)",
            )
        )
    if isinstance(cfg, TrainConfig):
        rules.append(
            (
                cfg.export_dtype in ("auto", "bfloat16", "float32"),
                f"--export_dtype must be auto, bfloat16 or float32, got {cfg.export_dtype!r}",
            )
        )
    for holds, line in rules:
        if not holds:
            raise SystemExit(line)
    if isinstance(cfg, TrainConfig):
        check_attn_implementation(cfg.attn_implementation, getattr(cfg, "engine", None), getattr(cfg, "bf16", True))


# The paper's settings (SRPO, Sec. 4 and appendix) as named presets: field -> value, applied under CLI flags.
# PRESETS[name][config class name] = {field: value}: each script takes its own class's entry.
PRESETS: dict[str, dict[str, dict]] = {"qwen2.5-vl-7b": {}}
# The paper's GRPO stage (SRPO Sec. 4 / released OpenRLHF config): group 8, 128 prompts per rollout, 128 sequences
# per update, lr 1e-6, temperature 1.0, max response 2048, 3 epochs (passes over the RL data), alpha 0.1, accuracy
# filter 0.1-0.9, importance ratio capped at 3, frozen ViT.
PRESETS["qwen2.5-vl-7b"]["GRPOConfig"] = {
    "group_size": 8,
    "rollout_batch_size": 128,  # 128 prompts x 8 = 1024 sequences per step: 8 updates of 128
    "train_batch_size": 128,
    "micro_batch_size": 4,
    "lr": 1e-6,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "weight_decay": 0.0,
    "warmup_ratio": 0.03,
    "min_lr_ratio": 0.1,
    "temperature": 1.0,
    "top_p": 1.0,
    "max_new_tokens": 2048,
    "max_steps": 0,
    "epochs": 3.0,
    "alpha": 0.1,
    "filter_accuracy": True,
    "filter_low": 0.1,
    "filter_high": 0.9,
    "ratio_cap": 3.0,  # the reference's policy loss clamps the importance ratio at 3 before the clip
    "freeze_vision": True,
    "gradient_checkpointing": True,
    "engine": "vllm",
    "vllm_gpu_memory_utilization": 0.5,
    "vllm_sleep": True,
    "vllm_max_model_len": 8192,
    "eval_every": 0,
    "save_every": 50,
    "export_dtype": "bfloat16",
    # the reference runs' prompt and image bounds: prompts of at most 1024 tokens, images of at most 501,760 pixels
    "max_prompt_length": 1024,
    "max_pixels": 501760,
    "system_prompt": "boxed",
}

# The paper's cold-start SFT of Qwen2.5-VL-7B-Instruct (SRPO Sec. 4: lr 1e-5, 1 epoch, max length 4096, frozen ViT; the
# released config said 3 epochs). batch_size x grad_accum x GPUs is our choice (1 x 8 x 8 = 64), not a paper number.
PRESETS["qwen2.5-vl-7b"]["SFTConfig"] = {
    "lr": 1e-5,
    "epochs": 1,
    "max_length": 4096,
    "batch_size": 1,
    "grad_accum": 8,
    "warmup_ratio": 0.1,
    "bf16": True,
    "gradient_checkpointing": True,
    "freeze_vision": True,
    "save_every": 200,
    "export_dtype": "bfloat16",
}


def parse(cls, argv: list[str] | None = None):
    """Parse `cls` from argv: an optional leading YAML path, then flags; --preset fills in before both."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(cls)

    def error(message: str):  # argparse's own prints the whole usage (some 80 options) above the line that matters
        raise SystemExit(re.sub(r"(--\w+)/--[\w-]+", r"\1", message.rstrip(".")) + "; see --help")  # --a_b/--a-b

    parser.error = error
    from_yaml = {}
    if argv and argv[0].endswith((".yaml", ".yml")):
        with open(argv.pop(0)) as f:
            from_yaml = yaml.safe_load(f) or {}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(from_yaml) - names)
        if unknown:
            raise SystemExit(f"config file: unknown option(s) {unknown}; see --help")
    preset = from_yaml.get("preset", "")
    if "--preset" in argv:
        preset = argv[argv.index("--preset") + 1] if argv[-1] != "--preset" else ""
    if preset and preset not in PRESETS:
        raise SystemExit(f"unknown --preset {preset!r}; known: {sorted(PRESETS)}")
    parser.set_defaults(**{**PRESETS.get(preset, {}).get(cls.__name__, {}), **from_yaml})
    try:
        (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # HfArgumentParser's "Some specified arguments are not used by the HfArgumentParser: [...]"
        unknown = str(e).split(":", 1)[-1].strip()
        raise SystemExit(f"unknown option(s) {unknown}; see --help") from None
    validate(cfg)
    return cfg


def run(main) -> None:
    """Call a script's main(); a user's mistake (bad data, a model that is not there) ends in one line and exit
    status 2, not a traceback. Everything else is a bug and keeps its traceback.

    One of several processes (a launcher's WORLD_SIZE > 1): the others may sit in a collective this one will never
    enter, so it leaves at once (os._exit: no atexit handler or process-group destructor may wait on them), and the
    launcher (torchrun, accelerate launch) stops the rest within seconds when it sees the exit. The line also goes to
    the launcher's error file, so the failure summary it prints last shows it as the root cause. A one-line
    SystemExit (a refused option) leaves the same way, with status 1."""
    from transformers.utils import logging as hf_logging

    from nanosrpo.data import DataError

    # transformers' own bars ("Loading weights" at every from_pretrained, "Writing model shards" at every save) would
    # cut into the scripts' one bar per stage, a checkpoint's in the middle of the run's; downloads keep theirs
    hf_logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        main()
    except (DataError, OSError) as e:
        _fail(f"error: {e}", 2)
    except SystemExit as e:
        if isinstance(e.code, str) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _fail(e.code, 1)
        raise


def _fail(line: str, status: int) -> None:
    print(line, file=sys.stderr, flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(status)
    if error_file := os.environ.get("TORCHELASTIC_ERROR_FILE"):  # torch.distributed.elastic's per-worker error file
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        with open(error_file, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": info}}, f)
    sys.stdout.flush()
    os._exit(status)


def grpo_update_plan(cfg, world: int) -> tuple[int, int]:
    """(sequences per update on one process, optimizer updates per step) of a GRPO run on `world` processes.

    A step's rollouts must split into whole updates: an uneven split would leave a short last update that is
    silently off-policy and counted by nobody's schedule, so such settings are refused here, before anything loads.
    """
    if cfg.rollout_batch_size % world or cfg.train_batch_size % world:
        raise SystemExit(
            f"--rollout_batch_size {cfg.rollout_batch_size} and --train_batch_size {cfg.train_batch_size} "
            f"must be divisible by the {world} processes"
        )
    per_step, per_update = cfg.rollout_batch_size * cfg.group_size, cfg.train_batch_size
    if per_step % per_update:
        raise SystemExit(
            f"a step samples --rollout_batch_size x --group_size = {per_step} sequences, which is not a "
            f"whole number of updates of --train_batch_size {per_update}; choose sizes that divide"
        )
    return per_update // world, per_step // per_update * cfg.ppo_epochs


def to_dict(cfg) -> dict:
    return asdict(cfg)
