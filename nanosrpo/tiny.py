"""The tiny offline world: its model, tokenizer and processor, its data, and its trained policies, built on first use.

`accelerate launch train_grpo.py` with no arguments must run with no network, so every piece of the usual pipeline has a
tiny stand-in made here: a randomly initialised Qwen2.5-VL-architecture policy (a real
`Qwen2_5_VLForConditionalGeneration`: vision tower, merger, M-RoPE language model, only small) with a byte-level BPE
tokenizer trained on the task's own text and Qwen's special tokens and chat template; the synthetic grid-counting task
(synthetic.py) written as real JSONL + PNG datasets; and the base and reflection-SFT policies trained from them. A real
run never needs this module: scripts call `resolve(cfg)`, which leaves any value other than "tiny" alone.

The rehearsal world (ensure_world(..., mix=True), under cache_dir/<size>[-text]-rehearsal/, for bench/rehearsal.py) is
the same pieces with its own tokenizer and small data of the mixed shapes real data has (synthetic.SHAPES:
multiple-choice, two-image and text-only records on 3x3 grids); its policies are trained by the rehearsal itself.

Layout under cache_dir/<size>[-text]/:
  init/                  random-init policy (save_pretrained)
  data/train.jsonl       RL records            data/eval.jsonl   held-out eval records
  data/sft_base.jsonl    one-round chains of thought (stand-in for the pretrained Instruct model's skills)
  data/sft_reflect.jsonl two-round oracle responses with invented flaws (~30% correct / 70% flawed)
  curate/                curate.py's output: the base's own attempts, the oracle's reflections, the SFT mix
  base/, reflect-curated/ the trained policies (ensure_policy; reflect/ if built from sft_reflect.jsonl)
"""

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanosrpo import model, prompts, synthetic
from nanosrpo.config import TINY

# ----------------------------------------------------------------------------------------------------- the model
SPECIAL_TOKENS = [  # Qwen2's special tokens, in Qwen's order; ids follow the base vocabulary as in the real tokenizer
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template (same rendering as the released one for text and image turns).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split: letters, single digits, punctuation runs, whitespace.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Image size bounds for the tiny world: grids are 3-6 cells of 28 px, so every image keeps its native size.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 28 * 28 * 36


@dataclass
class TinySize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int


# Named by parameter count (build_tiny returns the exact number). "1m" is the default tiny policy.
TINY_SIZES = {
    "0.2m": TinySize(64, 2, 4, 2, 256, 32, 2, 2, 64),
    "1m": TinySize(128, 4, 4, 2, 512, 64, 2, 4, 128),
    "10m": TinySize(256, 8, 8, 4, 1024, 128, 2, 4, 256),
}


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    """A Qwen-style byte-level BPE trained on `texts`, with Qwen's special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",  # generation pads on the left; collators set what they need explicitly
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def tiny_configs(tok, size: TinySize, max_positions: int = 2048):
    """The Qwen2.5-VL config and its text-only Qwen2 twin's config, both small, sharing the tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2Config

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = size.hidden // size.heads
    # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width); Qwen uses [16, 24, 24] for head_dim 128.
    h = head_dim // 2
    mrope = [h // 4, (h - h // 4) // 2, h - h // 4 - (h - h // 4) // 2]
    text = dict(
        vocab_size=len(tok),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    vl = Qwen2_5_VLConfig(
        text_config={
            **text,
            "rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
        },
        vision_config=dict(
            depth=size.vision_depth,
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_intermediate,
            num_heads=size.vision_heads,
            out_hidden_size=size.hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[size.vision_depth - 1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    twin = Qwen2Config(**text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return vl, twin


def tiny_processor(tok):
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    return model.image_only_processor(image_processor, tok, CHAT_TEMPLATE)


def build_tiny(
    out_dir: str | Path,
    size: str = "1m",
    seed: int = 0,
    text_only: bool = False,
    vocab_size: int = 512,
    mix: bool = False,
) -> dict:
    """Build the tiny world's randomly initialised policy + tokenizer + processor and save them to out_dir.

    text_only=True builds the Qwen2ForCausalLM twin (same tokenizer and text dims) used for vLLM on CPU.
    mix=True trains the tokenizer on the rehearsal's shapes (synthetic.corpus(mix=True)) instead.
    Returns {"params": int, "seconds": float}. Deterministic given (size, seed).
    """
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

    t0 = time.time()
    out_dir = Path(out_dir)
    # The prompts are repeated so BPE learns their words: the system prompt is in every sequence, short is cheap.
    tok = build_tokenizer(synthetic.corpus(mix=mix) + [prompts.SRPO_SYSTEM, prompts.GRPO_SYSTEM] * 200, vocab_size)
    vl_cfg, twin_cfg = tiny_configs(tok, TINY_SIZES[size])
    torch.manual_seed(seed)
    policy = Qwen2ForCausalLM(twin_cfg) if text_only else Qwen2_5_VLForConditionalGeneration(vl_cfg)
    policy.generation_config = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tok.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    model.save_policy(policy, tok if text_only else tiny_processor(tok), out_dir)
    return {"params": sum(p.numel() for p in policy.parameters()), "seconds": time.time() - t0}


# ----------------------------------------------------------------------------------------------------- the world
N_TRAIN, N_EVAL, N_SFT = 4000, 200, 8000
TRAIN_SEED, EVAL_SEED, SFT_SEED = 1, 2, 3  # disjoint seeds: eval problems are never trained on


# The rehearsal world (mix=True): a few hundred records of each kind are all its short runs read, and 3x3 grids
# (difficulty 0) keep its responses short.
N_REHEARSAL = {"train": 384, "eval": 48, "sft": 1536}
REHEARSAL_DIFFICULTY = 0


def world_dir(cache_dir: str, size: str, text_only: bool, mix: bool = False) -> Path:
    return Path(cache_dir) / (size + ("-text" if text_only else "") + ("-rehearsal" if mix else ""))


def ensure_world(
    cache_dir: str, size: str = "1m", text_only: bool = False, difficulty: int = 1, mix: bool = False
) -> dict[str, str]:
    """Build (once) and return the paths of the tiny world. Call on one process at a time (main_process_first).

    mix=True: the rehearsal world instead (its own folder, tokenizer and data: N_REHEARSAL records of the mixed shapes
    at REHEARSAL_DIFFICULTY; `difficulty` is ignored). The default world's files do not change with it.
    """
    root = world_dir(cache_dir, size, text_only, mix)
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
    print(
        f"building the tiny world once (a random {size} model, its questions and SFT data), cached in {root}",
        flush=True,
    )
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    info = build_tiny(tmp / "init", size=size, text_only=text_only, mix=mix)
    d = tmp / "data"
    n = N_REHEARSAL if mix else {"train": N_TRAIN, "eval": N_EVAL, "sft": N_SFT}
    difficulty = REHEARSAL_DIFFICULTY if mix else difficulty
    synthetic.write_rl_split(d, "train", n["train"], TRAIN_SEED, difficulty, text_only, mix=mix)
    synthetic.write_rl_split(d, "eval", n["eval"], EVAL_SEED, difficulty, text_only, mix=mix)
    for name, system, reflect in (("sft_base", prompts.GRPO_SYSTEM, False), ("sft_reflect", prompts.SRPO_SYSTEM, True)):
        synthetic.write_sft_split(
            d, name, n["sft"], SFT_SEED, system, difficulty, reflect, text_only=text_only, mix=mix
        )
    (tmp / "DONE").write_text(f"params={info['params']} seconds={time.time() - t0:.1f}\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)  # atomic: a half-built world is never mistaken for a finished one
    return paths


# The tiny recipe (measured: docs/tiny_world.md, docs/coldstart.md): the base learns to read the grid (vision tower
# trained too: it starts random, unlike a pretrained ViT) to a first-attempt accuracy that leaves RL room; the cold
# start then teaches the two-round reflection format on top of it. Why 1,200 steps on the own mix (CURATE, below) and
# not the paper's 30/70 at 600: on three pipeline seeds only that pair kept the cold start above its base.
RECIPE = {
    "base": ["--max_steps", "400", "--lr", "3e-3", "--freeze_vision", "false"],
    "reflect": ["--max_steps", "1200", "--lr", "3e-3", "--freeze_vision", "false"],
}
# curate.py's flags for the tiny cold start: every reflected attempt is kept, so the first rounds the SFT imitates are
# the base's own (a 30/70 mix skews them to its mistakes and pulls the cold start's first answer below the base's).
CURATE = ["--own_mix", "true"]


def ensure_policy(
    cache_dir: str,
    size: str = "1m",
    text_only: bool = False,
    stage: str = "reflect",
    reflect_data: str = "curated",
    seed: int = 0,
) -> str:
    """Path of one of the tiny world's trained policies, trained on first use.

    base    = the random init trained on data/sft_base.jsonl (one-round chains): the stand-in for a pretrained model
    reflect = the reflection cold start, SRPO's stage 1 for real (the default, reflect_data="curated", cached as
              <world>/reflect-curated): `python curate.py` (cached in <world>/curate/) has the base answer the training
              questions (2 sampled attempts each), the oracle teacher reflect on each attempt against the ground
              truth, and keeps them all (CURATE: --own_mix); then the base is trained on that. With
              reflect_data="synthetic" (cached as <world>/reflect) it trains instead on data/sft_reflect.jsonl,
              two-round records whose first attempts have invented flaws: quicker to build (no curation), but RL
              from it does not raise the greedy eval (docs/results.md, "How the tiny defaults were found").
    cot     = the plain-CoT SFT baseline (paper Table 3), cached as <world>/cot-curated: the base trained with the
              reflect recipe on the one-round twins of the same curated records (curate.py's sft_train_cot.jsonl).
    seed    = the pipeline seed (bench/miniature.py): the base build, curate.py's draws and the SFT all take it.
              Seed 0 is the default world's (the names above); seed S > 0 appends -sS to every name (base-s1/,
              curate-s1/, reflect-curated-s1/, ...).
    Each is `python train_sft.py` with the RECIPE's flags, cached as <world>/<name> (save_pretrained dirs; the runs'
    metrics.jsonl and run.json stay in <world>/<name>-run). Delete those to rebuild. Call on one process at a time
    (accelerator.main_process_first()).
    """
    import subprocess
    import sys

    from nanosrpo.checkpoint import latest_checkpoint

    if stage not in ("base", "reflect", "cot"):
        raise ValueError(f"stage must be 'base', 'reflect' or 'cot', got {stage!r}")
    if reflect_data not in ("synthetic", "curated"):
        raise ValueError(f"reflect_data must be 'synthetic' or 'curated', got {reflect_data!r}")
    cache_dir = str(Path(cache_dir).resolve())  # the child runs in the repo root
    root = world_dir(cache_dir, size, text_only)
    curated = stage == "cot" or (stage == "reflect" and reflect_data == "curated")
    suffix = f"-s{seed}" if seed else ""
    name = {"base": "base", "reflect": "reflect-curated" if curated else "reflect", "cot": "cot-curated"}[stage]
    dest = root / (name + suffix)
    if (dest / "config.json").exists():
        return str(dest)
    ensure_world(cache_dir, size, text_only)
    base = [] if stage == "base" else ["--model", ensure_policy(cache_dir, size, text_only, stage="base", seed=seed)]
    repo = Path(__file__).resolve().parent.parent
    run_dir, tmp = root / f"{dest.name}-run", root / f"{dest.name}-run.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    env = _child_env()
    world = ["--cache_dir", cache_dir, "--tiny_size", size, "--text_only", str(text_only), "--seed", str(seed)]
    sft_data = []
    if curated:  # SRPO stage 1 for real: the base answers, the oracle reflects (curate.py; resumable, so a killed
        out = root / f"curate{suffix}"  # build picks up where it stopped)
        sft_file = out / ("sft_train_cot.jsonl" if stage == "cot" else "sft_train.jsonl")
        if not sft_file.exists():
            cur = [sys.executable, str(repo / "curate.py"), *world, *base, "--out_dir", str(out), *CURATE]
            print(
                f"curating the tiny reflection data once (curate.py: the base answers, the oracle reflects), "
                f"cached in {out}",
                flush=True,
            )
            run_child(cur, "curate.py", cwd=repo, env=env, stdout=subprocess.DEVNULL)  # its summary is in out/
        sft_data = ["--data", str(sft_file)]
    sft_stage = "base" if stage == "base" else "reflect"  # plain CoT trains as the cold start: its steps and rate
    flags = RECIPE[sft_stage]
    cmd = [sys.executable, str(repo / "train_sft.py"), "--stage", sft_stage]
    cmd += [*world, *base, "--out_dir", str(tmp), *sft_data, *flags]
    print(
        f"building the tiny {stage} policy once (train_sft.py {' '.join(flags)}"
        f"{' on the curated data' if curated else ''}), cached in {dest}",
        flush=True,
    )
    run_child(cmd, f"building the tiny {stage} policy", cwd=repo, env=env, stdout=subprocess.DEVNULL)  # bars: stderr
    ckpt = latest_checkpoint(tmp)
    shutil.rmtree(run_dir, ignore_errors=True)
    tmp.rename(run_dir)
    (run_dir / ckpt.name / "policy").rename(dest)  # atomic: dest appears complete or not at all
    for done in run_dir.glob("checkpoint-*"):  # optimizer states etc.: nobody resumes a finished tiny run
        shutil.rmtree(done, ignore_errors=True)
    return str(dest)


def run_child(cmd: list, what: str, **kwargs) -> None:
    """Run one of the project's scripts as a child process (subprocess.run's kwargs). If it fails, this process ends
    in one line (a SystemExit config.run prints) and not a CalledProcessError traceback: the child has already said
    what went wrong, just above."""
    import subprocess

    status = subprocess.run([str(c) for c in cmd], **kwargs).returncode
    if status:
        command = " ".join(str(c) for c in cmd)
        raise SystemExit(f"error: {what} failed with exit status {status} (its own message is above): {command}")


def _child_env() -> dict:
    """This process's environment without a launcher's variables, for ensure_policy's child runs.

    Why a child process and not train_sft.main(): accelerate keeps one state per process (device, process group,
    mixed precision), so a script already running under `accelerate launch` / torchrun cannot start a fresh
    single-process training run inside itself. The child gets a clean one: without the launcher's variables it does
    not try to join our process group. (The OMP_NUM_THREADS=1 they export does not starve it: a single CPU process
    takes every core, see model.use_cpu_cores.)
    """
    import os

    launcher = set("RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK MASTER_ADDR MASTER_PORT".split())
    prefixes = ("ACCELERATE_", "TORCHELASTIC_")
    return {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(prefixes)}


# ----------------------------------------------------------------------------------------------------- for the scripts
def resolve(cfg, policy: str = "reflect", data: str = "train", eval_data: str = "eval") -> dict[str, str]:
    """Paths for cfg.model, cfg.data and (if the config has it) cfg.eval_data, each "tiny" replaced by the tiny world's.

    policy: which tiny policy "tiny" means for --model ("init", "base" or "reflect"); data / eval_data: which world
    file (keys of ensure_world) "tiny" means for --data / --eval_data. Any other --model (a local path or a hub id) is
    resolved once, here, to a local directory (model.resolve), so that every later reader (from_pretrained, vLLM's
    engine, save) sees the same files. Builds what is missing: call on one process at a time (main_process_first).
    """
    eval_value = getattr(cfg, "eval_data", None)
    world = (
        ensure_world(cfg.cache_dir, cfg.tiny_size, cfg.text_only) if TINY in (cfg.model, cfg.data, eval_value) else {}
    )
    if cfg.model != TINY:
        policy_path = model.resolve(cfg.model)
    elif policy == "init":
        policy_path = world["init"]
    else:
        policy_path = ensure_policy(cfg.cache_dir, cfg.tiny_size, cfg.text_only, stage=policy)
    paths = {"model": policy_path, "data": world[data] if cfg.data == TINY else cfg.data}
    if eval_value is not None:
        paths["eval_data"] = world[eval_data] if eval_value == TINY else eval_value
    return paths
