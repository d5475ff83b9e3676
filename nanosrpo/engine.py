"""Generation engines behind one interface, and weight sync from the trainer.

    engine.generate(prompts, n, max_new_tokens, temperature, top_p, greedy=False, logprobs=False)
        prompts[i] = {"text": chat-rendered prompt (one <|image_pad|> per image), "images": [PIL], "ids": expanded ids}
        -> for each prompt, n completions {"ids": token ids as sampled (incl. the stop token), "text", "logprobs"}
    engine.sync(model) -> seconds     push the trainer's current weights into the engine

Three facts a reader needs (docs/vllm.md has the details and how they were verified):
- The training loop never re-tokenises decoded text: it trains on exactly the ids the engine sampled.
- TransformersEngine samples on the trainer's own module (its own decode loop, same numbers as `model.generate`),
  so its sync is a no-op.
- VLLMEngine (vllm_engine.py) is a colocated vLLM `LLM` in this process (one per rank) whose weights are overwritten
  in place every step with `collective_rpc("reload_weights", weights_iterator=...)`: one tensor at a time, no disk,
  no second model copy.
"""

import time

import torch

from nanosrpo import attention, data
from nanosrpo.model import is_sharded, load_policy, trainer_weights


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
        self.suppress = data.banned_ids(tok)

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
                rows = decode(
                    self.model,
                    self.processor,
                    prompts[s : s + per_call],
                    n,
                    max_new_tokens,
                    sorted(self.stop_ids),
                    self.suppress,
                    temperature,
                    top_p,
                    greedy,
                    logprobs,
                )
                out += [
                    {"ids": ids, "text": tok.decode(ids, skip_special_tokens=True), "logprobs": lp} for ids, lp in rows
                ]
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


# ------------------------------------------------------------------------------------------------ the decode loop
def decode(
    model,
    processor,
    prompts,
    n,
    max_new_tokens,
    stop_ids,
    suppress,
    temperature=1.0,
    top_p=1.0,
    greedy=False,
    logprobs=False,
) -> list[tuple[list[int], list[float] | None]]:
    """n completions of each prompt, prompt-major (rows i*n .. i*n+n-1 belong to prompts[i]): [(ids, logprobs)].

    1. Prefill each distinct prompt once (_prefill). With nanosrpo.attention (sdpa, the default) the prompts' KV cache
       stays one copy per prompt (attention.Prefix) and the rows attend to it; otherwise it is repeated n times along
       the batch (repeat_interleave: a group's rows are adjacent).
    2. Decode one token per step for the rows still running (_next_token: generate's distribution). Positions are
       passed explicitly and advance by 1 per token on all axes (Qwen2.5-VL: text position + rope_delta), so the
       rope index is never recomputed.
    3. A row stops at its first stop id (kept in its ids) or at max_new_tokens; finished rows leave the batch
       (index_select on the rows' KV cache), so the tail decodes only live rows.
    The model's own generation_config (e.g. a checkpoint's repetition_penalty) is not applied: as in the vLLM engine,
    only the arguments given here shape the distribution, so that it is the one the trainer scores.
    """
    from transformers import DynamicCache

    device = model.device
    logits, cache, attn, pos = _prefill(model, processor, prompts)

    # The group: n rows per prompt. With nanosrpo.attention the prompts' cache stays one copy per group (the Prefix)
    # and `cache` holds each row's own tokens only; otherwise the rows get n adjacent copies of the prompt's cache.
    live = torch.arange(len(prompts) * n, device=device)  # row numbers of the rows still in the batch
    prefix = None
    if model.config.get_text_config()._attn_implementation == attention.NAME:
        keys, values = [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
        prefix = attention.Prefix(keys, values, attn.bool(), n, live)
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
        token, scores = _next_token(logits, banned, temperature, top_p, greedy)
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
        step_inputs = dict(input_ids=token[:, None], position_ids=pos, past_key_values=cache, use_cache=True)
        if prefix is None:
            logits = model(**step_inputs, attention_mask=attn).logits[:, -1]
        else:  # the mask is the Prefix's: every row sees its prompt's real tokens and all of its own
            prefix.live = live
            logits = model(**step_inputs, prefix=prefix).logits[:, -1]
        pos = pos + 1
    return [(ids[r], lps[r] if logprobs else None) for r in range(len(ids))]


def _prefill(model, processor, prompts):
    """One forward over the distinct prompts (a left-padded batch; images through the vision tower once), keeping only
    the last position's logits. Returns (logits [P, V], the KV cache, attention_mask [P, T], position ids).

    Positions are passed explicitly, as generate computes them: text positions count a row's real tokens (left padding
    does not shift them), and Qwen2.5-VL's 3-D M-RoPE positions come from the model's own get_rope_index."""
    from transformers import DynamicCache

    rows = [{"input_ids": p["ids"], "loss_mask": [0] * len(p["ids"]), "images": p["images"]} for p in prompts]
    batch = data.collate(processor, rows, pad_side="left")
    inputs = {k: v.to(model.device) for k, v in batch.items() if k not in ("loss_mask", "labels")}
    attn = inputs["attention_mask"]
    text_pos = (attn.cumsum(-1) - 1).clamp(min=0)  # generate's positions: 0 on the first real token of each row
    vl = hasattr(model.config, "vision_config")
    if vl and "image_grid_thw" in inputs:  # [4, B, T]: text positions (for the mask) + (t, h, w) M-RoPE positions
        rope, _ = model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=attn,
        )
        pos = torch.cat([text_pos[None], rope.to(text_pos.dtype)])
    elif vl:  # no image in this batch: the three M-RoPE axes are the text position
        pos = text_pos[None].expand(4, -1, -1)
    else:
        pos = text_pos
    cache = DynamicCache(config=model.config)
    logits = model(**inputs, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return logits, cache, attn, pos


def _next_token(logits, banned, temperature: float, top_p: float, greedy: bool):
    """(each row's next token, the processed scores it was drawn from: their log_softmax is its log-prob).

    Sampling draws from generate's distribution: suppressed ids -> -inf, then logits / temperature, then top-p (same
    rule as transformers' TopPLogitsWarper; top_k is 0: none), one draw per row from the global torch RNG (`sample`);
    greedy is argmax of the suppressed logits (no temperature). The log-probs are those of the distribution sampled
    from, which is what the trainer's log_softmax(logits / temperature) recomputes when top_p = 1."""
    scores = logits.float()
    scores[:, banned] = float("-inf")
    if greedy:
        return scores.argmax(-1), scores
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        scores = _top_p(scores, top_p)
    return sample(scores.softmax(-1)), scores


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


def make(cfg, model, processor, model_path: str):
    """The engine a config asks for. vLLM is imported only here, only when asked for."""
    if cfg.engine == "transformers":
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
        from nanosrpo.vllm_engine import VLLMEngine

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
