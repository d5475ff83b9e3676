"""GRPO maths: group-relative advantages, the clipped policy loss, and per-token log-probabilities.

SRPO's RL stage is GRPO with a reflection-aware reward (the reward lives in rewards.py); the optimisation itself is
plain GRPO (Shao et al. 2024, DeepSeekMath), with the variants people compare against selectable by argument:
  - GRPO:     advantages normalised by the group std, loss averaged per sequence then over sequences.
  - DAPO:     asymmetric clipping (clip_high > clip_low, "clip-higher") and a token-level mean over the whole batch.
  - Dr. GRPO: no std normalisation, and token sums divided by a constant length instead of each sequence's length.

No I/O, no sampling:
  group_advantages(rewards, group_size)          -> [N]      one advantage per completion
  policy_loss(logprobs, old, adv, mask, ...)     -> loss, stats
  sequence_logprobs(model, batch)                -> [B, T]   log p(token_t | tokens_<t), 0 at t = 0 (padded or packed)
  keep_group(accuracies, rewards)                -> bool     the accuracy filter of dynamic sampling
  logprobs_by_sample / stack_rows                            per-sample log-prob rows for old / reference policies
"""

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")

# Batch keys that are inputs of a HF (multimodal) causal LM forward. Anything else a collator puts in the batch
# (completion_mask, labels, advantages, ...) stays out of the forward; `labels` in particular would make HF compute
# its own cross-entropy over the full vocabulary, which is exactly the memory we are trying not to spend.
MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "mm_token_type_ids",
)


# ----------------------------------------------------------------------------------------------------- advantages
def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages: each completion is compared with the other completions of the same prompt.

    `rewards` is 1-D with the `group_size` completions of one prompt adjacent. Returns a tensor of the same shape.
    A group whose rewards are all equal carries no learning signal and gets advantages of exactly 0 (never NaN);
    that includes group_size = 1, where the unbiased std of one element is undefined.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"len(rewards)={rewards.numel()} is not a multiple of group_size={group_size}")
    r = (rewards if rewards.is_floating_point() else rewards.float()).view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)  # Dr. GRPO: A_i = r_i - mean(r_group)
    if normalize_std and group_size > 1:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # GRPO (DeepSeekMath 4.1.2): A_i = (r_i - mean) / std, unbiased
    # Exact zeros for constant groups: r - mean(r) can be ~1e-8 in float32 (eight rewards of 0.1), and dividing that
    # by std + eps ~ 1e-6 would turn rounding noise into an advantage of -0.0074 for every completion of the group.
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(adv), adv).view(-1)


# ----------------------------------------------------------------------------------------------------- loss
def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    aggregation: str = "seq-mean-token-mean",
    max_len: Optional[int] = None,
    token_weights: Optional[torch.Tensor] = None,
    normalizer: Optional[float] = None,
    ratio_cap: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate loss of GRPO (PPO's objective with group-relative advantages), to be minimised.

    logprobs [B, T] carries the gradient; old_logprobs [B, T] (the sampling policy) and ref_logprobs [B, T] (the frozen
    reference) are constants; advantages [B] is one number per sequence, broadcast to its tokens; mask [B, T] is 1 on
    completion tokens. Positions where mask is 0 contribute nothing, whatever value they hold (even inf/NaN-prone ones).
    token_weights [B, T] (optional, constants) scale each token's policy-gradient term: the truncated importance
    weights min(pi_trainer / pi_engine, cap) that correct for a sampling engine whose numbers differ from the trainer's.
    normalizer: the denominator of the aggregation over the whole optimizer update, when this batch is one of its
    micro-batches: the update's valid tokens on all processes (token-mean) or its sequences on all processes (the
    seq-mean variants). The caller sums the micro-batch losses (backward of each) and multiplies by the number of
    processes (DDP/FSDP average gradients over them); the gradient is then exactly the whole update's. Default: this
    batch alone (its own valid tokens, or its B sequences).
    ratio_cap: the importance ratio is clamped at this value before the clip (0: no cap), as the reference's policy
    loss does with 3 (dual-clip PPO). It acts only on a token with A < 0 whose ratio ran past the cap: its term stays
    -cap * A and its gradient is 0, instead of pushing the token down ever harder (with A > 0 the clip already stopped
    it at 1 + clip_high). Off-policy updates (several per step) are where ratios get that large. A cap at or below
    1 + clip_high would also stop tokens with A > 0 inside the clip range: the config refuses one.
    Returns (scalar loss, stats) where stats are python floats over the valid tokens.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    valid = mask.bool()
    m = valid.to(logprobs.dtype)
    A = advantages.to(logprobs.dtype).unsqueeze(1)  # [B, 1]: every token of a completion shares its advantage

    # Zero the log-ratio on padding *before* exp: a garbage pad value could overflow to inf, and inf * 0 = NaN
    # would leak into the loss and its gradient (torch.where passes no gradient to the unselected branch).
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)  # PPO / GRPO importance ratio pi_theta / pi_old, per token
    r = ratio.clamp(max=ratio_cap) if ratio_cap > 0 else ratio  # the cap: no gradient flows through the clamp past it
    clipped = torch.clamp(r, 1.0 - clip_low, 1.0 + clip_high)  # DAPO clip-higher: separate low and high epsilons
    per_token = -torch.min(r * A, clipped * A)  # GRPO eq. 3: pessimistic (min) of unclipped and clipped surrogate
    if token_weights is not None:  # truncated importance sampling (TIS): engine != trainer numerics
        per_token = per_token * torch.where(valid, token_weights.detach(), torch.zeros_like(logprobs))

    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        # GRPO eq. 4 (Schulman's k3 estimator, unbiased and >= 0): KL = exp(ref - logp) - (ref - logp) - 1
        d = torch.where(valid, ref_logprobs.detach() - logprobs, torch.zeros_like(logprobs))
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * kl  # GRPO adds beta * KL per token (not in the reward)

    per_token = per_token * m  # mask is exactly 0 on padding, and the values there are finite by construction
    n_tokens = m.sum(dim=1).clamp(min=1.0)  # >= 1 so a completion with no valid token gives 0, not NaN
    if aggregation == "seq-mean-token-mean":  # GRPO (and the SRPO runs): mean over each sequence, then over sequences
        total, default = (per_token.sum(dim=1) / n_tokens).sum(), logprobs.shape[0]
    elif aggregation == "token-mean":  # DAPO: every valid token of the update weighs the same, long answers count more
        total, default = per_token.sum(), m.sum().clamp(min=1.0)
    else:  # Dr. GRPO: token sum over a constant length, so the loss has no per-sequence length bias
        total, default = (per_token.sum(dim=1) / (max_len if max_len is not None else mask.shape[1])).sum(), logprobs.shape[0]
    loss = total / (normalizer if normalizer is not None else default)

    with torch.no_grad():
        n = m.sum().clamp(min=1.0)
        low = (A < 0) & (ratio < 1.0 - clip_low) & valid  # clipped branch active on the low side: gradient is 0
        high = (A > 0) & (ratio > 1.0 + clip_high) & valid  # ... and on the high side
        capped = (A < 0) & (ratio > ratio_cap) & valid if ratio_cap > 0 else torch.zeros_like(valid)  # the cap acts
        stats = {
            "clip_ratio_low": (low.sum() / n).item(),
            "clip_ratio_high": (high.sum() / n).item(),
            "clip_ratio": ((low | high).sum() / n).item(),
            "ratio_capped": (capped.sum() / n).item(),
            "ratio_mean": ((ratio * m).sum() / n).item(),
            "kl": ((kl * m).sum() / n).item(),  # 0.0 without a reference model
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------------- log-probs
def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature)[target] for rows of logits [N, V], as target logit minus logsumexp."""
    logits = logits.float() / temperature  # float32 here, and only here: one chunk at a time
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


def sequence_logprobs(model, batch: dict, chunk_size: int = 1024, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probabilities [B, T]: out[:, t] = log p(input_ids[:, t] | input_ids[:, :t]); out[:, 0] = 0.

    One forward pass over the whole batch (text, images, M-RoPE positions: Qwen2.5-VL derives its 3-D position ids
    from input_ids, attention_mask and image_grid_thw when position_ids are not given, so left or right padding both
    work). Positions where attention_mask is 0 are 0; callers multiply by their completion mask anyway.
    temperature: rollouts sampled at temperature tau must be scored with logits / tau.
    A packed batch (data.packed_batch: one row, no padding, for flash-attention) gets its per-sample positions from
    packed_position_ids and comes back unpacked: the same right-padded [B, T] rows as the collated batch gives.

    Memory (the chunking): the model returns logits [B, T, V] in its own dtype (bf16 in training); upcasting that to
    float32 and taking log_softmax would add two more full-vocabulary tensors (V = 152k for Qwen2.5-VL). Instead we
    walk over the flattened B*T rows `chunk_size` at a time and compute target-logit minus logsumexp in float32 per
    chunk. With gradients on, each chunk runs under activation checkpointing, so backward does not keep every chunk's
    float32 copy alive: it re-computes one chunk at a time. Numbers equal a plain full log_softmax + gather.
    """
    if "shared_prompt" in batch:  # one copy of each group's prompt (data.shared_batch): its own path, below
        return _shared_prompt_logprobs(model, batch, chunk_size, temperature)
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
    if "seq_lens" in batch:  # a packed row (data.packed_batch): its M-RoPE positions, then unpack the log-probs
        inputs["position_ids"] = packed_position_ids(model, batch)
    input_ids = inputs["input_ids"]
    B, T = input_ids.shape
    logits = logits_sharing_images(model, inputs, batch.get("image_index"))  # [B, T, V]

    # logits[:, j] predicts the token after it; the last row predicts past the end and is dropped below.
    targets = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)  # dummy target for that row
    flat_logits, flat_targets = logits.reshape(B * T, -1), targets.reshape(B * T)  # a view: logits are contiguous

    use_ckpt = torch.is_grad_enabled() and flat_logits.requires_grad
    parts = []
    for s in range(0, B * T, chunk_size):
        args = (flat_logits[s : s + chunk_size], flat_targets[s : s + chunk_size], temperature)
        parts.append(checkpoint(_token_logprobs, *args, use_reentrant=False) if use_ckpt else _token_logprobs(*args))
    scored = torch.cat(parts).view(B, T)[:, :-1]  # [B, T - 1]: log-probs of tokens 1 .. T-1

    out = torch.cat([scored.new_zeros(B, 1), scored], dim=1)  # [B, T]; position 0 has no context
    if "seq_lens" in batch:  # [1, N] -> [B, max len], right-padded; each sample's first token has no context either
        rows = out[0].split(batch["seq_lens"].tolist())
        return torch.nn.utils.rnn.pad_sequence([torch.cat([r.new_zeros(1), r[1:]]) for r in rows], batch_first=True)
    if "attention_mask" in inputs:
        out = out * inputs["attention_mask"].to(out.dtype)  # padding is not a token of the sample
    return out


def _token_logprobs_at(logits, rows, cols, targets, temperature: float) -> torch.Tensor:
    """_token_logprobs of the logits at (rows, cols): the gathered copy is one chunk's, never the whole batch's."""
    return _token_logprobs(logits[rows, cols], targets, temperature)


def _shared_prompt_logprobs(model, batch: dict, chunk_size: int, temperature: float) -> torch.Tensor:
    """sequence_logprobs of a shared-prompt micro-batch (data.shared_batch), in the same right-padded per-sample
    layout [B, T] as a collated batch: completion tokens carry their log-probs, prompt positions 0.

    The forward runs each group's prompt once (nanosrpo.attention) and computes logits only where they predict a
    completion token (logits_to_keep: the prompts' last positions and the slots); each completion token's log-prob is
    then read at its predicting position, chunk by chunk (float32, checkpointed as in sequence_logprobs).
    """
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
    inputs["position_ids"] = shared_position_ids(model, batch)
    logits = model_logits(model, inputs, shared_prompt=batch["shared_prompt"],
                          logits_to_keep=batch["logits_to_keep"])  # [rows, kept positions, V]
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad
    parts = []
    for s in range(0, len(batch["targets"]), chunk_size):
        args = (logits, batch["src_row"][s : s + chunk_size], batch["src_col"][s : s + chunk_size],
                batch["targets"][s : s + chunk_size], temperature)
        parts.append(checkpoint(_token_logprobs_at, *args, use_reentrant=False) if use_ckpt else _token_logprobs_at(*args))
    out = logits.new_zeros(batch["loss_mask"].shape, dtype=torch.float32)
    return out.index_put((batch["dst_b"], batch["dst_t"]), torch.cat(parts))


def shared_position_ids(model, batch: dict) -> torch.Tensor:
    """Position ids of a shared-prompt micro-batch: each token numbered as in its own sample. Text-only models take
    data.shared_batch's [rows, T] as they are. Qwen2.5-VL takes [4, rows, T]: the text positions, then its 3-D
    M-RoPE positions, which the model's own get_rope_index gives for the prompts; a completion token follows its
    prompt on all three axes (text position + the prompt's rope delta), as in engine.decode."""
    text = batch["position_ids"]
    module = unwrap(model)
    if not hasattr(module.config, "vision_config"):
        return text
    P = batch["shared_prompt"][0]
    ids = batch["input_ids"][:, :P]
    mm = batch.get("mm_token_type_ids", torch.zeros_like(batch["input_ids"]))[:, :P]
    real = (torch.arange(P, device=ids.device)[None] < batch["prompt_lens"][:, None]).long()
    rope, delta = module.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=batch.get("image_grid_thw"),
                                              attention_mask=real)  # [3, rows, P], [rows, 1]
    slots = (text[:, P:] + delta.to(text.device))[None].expand(3, -1, -1)
    return torch.cat([text[None], torch.cat([rope.to(text.dtype), slots], dim=2)], dim=0)


def packed_position_ids(model, batch: dict) -> torch.Tensor:
    """Position ids of a packed row (data.packed_batch), each sample numbered as if it were alone.

    A text-only model takes the row's text positions [1, N] as they are. Qwen2.5-VL takes [4, 1, N]: row 0 the text
    positions (transformers finds the sample boundaries there, as flash-attn's cu_seqlens or sdpa's block mask), rows
    1-3 the M-RoPE (temporal, height, width) positions, which the model's own get_rope_index computes here for the
    samples laid out right-padded side by side, exactly as it does for a padded batch, then concatenated.
    """
    text = batch["position_ids"]
    module = unwrap(model)
    if not hasattr(module.config, "vision_config"):
        return text
    lens = batch["seq_lens"].tolist()
    ids = torch.nn.utils.rnn.pad_sequence(batch["input_ids"][0].split(lens), batch_first=True)
    mm = batch.get("mm_token_type_ids", torch.zeros_like(batch["input_ids"]))
    mm = torch.nn.utils.rnn.pad_sequence(mm[0].split(lens), batch_first=True)
    attention_mask = (torch.arange(ids.shape[1], device=ids.device)[None] < batch["seq_lens"][:, None].to(ids.device)).long()
    rope, _ = module.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=batch.get("image_grid_thw"),
                                          attention_mask=attention_mask)  # [3, B, T]
    rope = rope[:, attention_mask.bool()].unsqueeze(1)  # [3, 1, N]: the valid positions, sample after sample
    return torch.cat([text.view(1, 1, -1).to(rope.device), rope], dim=0)


# ----------------------------------------------------------------------------------------------------- filtering
def keep_group(rewards: list[float], accuracies: list[float], low: float = 0.1, high: float = 0.9) -> bool:
    """The accuracy filter of the SRPO runs (DAPO-style dynamic sampling): a prompt's group is trained on only if its
    mean accuracy lies in [low, high] and neither its accuracies nor its rewards are all equal. `accuracies` are each
    rollout's accuracy score in [0, 1] (rollout.accuracy_score). A group whose scores are all equal has nothing to
    learn about being right, even inside the bounds: its advantages would come from format and length alone (or be
    zero, when its rewards are equal too); a too-easy or too-hard prompt mostly wastes a slot in the batch."""
    mean_accuracy = sum(accuracies) / len(accuracies)
    return low <= mean_accuracy <= high and max(accuracies) > min(accuracies) and max(rewards) > min(rewards)


@torch.no_grad()
def logprobs_by_sample(model, batches, temperature: float = 1.0) -> list[torch.Tensor]:
    """sequence_logprobs over right-padded micro-batches ((indices, batch) pairs, as data.micro_batches yields them),
    one unpadded row per sample (on the CPU), in order.

    Used for the old policy's log-probs (several updates per step) and the frozen reference's: computed once per step,
    then looked up per sample whatever mini-batch the sample lands in.
    """
    rows = []
    for _, batch in batches:
        lp = sequence_logprobs(model, batch, temperature=temperature).float().cpu()
        lengths = batch.get("seq_lens", batch.get("sample_lens"))  # packed, shared
        lengths = batch["attention_mask"].sum(1) if lengths is None else lengths
        rows += [lp[i, : int(n)] for i, n in enumerate(lengths)]
    return rows


def stack_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per-sample rows back into one right-padded [B, width] tensor (zeros past each row's end)."""
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def logits_sharing_images(model, inputs: dict, image_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """model(**inputs).logits, with Qwen2.5-VL's vision tower run once per distinct image of the batch.

    A GRPO micro-batch holds several completions of the same prompt, each with a copy of its image. With
    share_images, data.collate / packed_batch give pixel_values of the distinct images only and image_index
    [n_images], the distinct image of each occurrence (image_grid_thw keeps one row per occurrence). For this one
    forward the model's get_image_features is wrapped: it encodes the distinct images (with their own grid rows) and
    returns one feature block per occurrence, in order, which the forward scatters onto the image tokens as always.
    The numbers are those of encoding every copy (the tower attends within an image only); with a trainable tower a
    shared image's gradient is the sum over its occurrences, as over copies (tests/test_packing.py). Wrapping the
    method, rather than calling the tower before the forward, keeps it inside the model's own forward, where FSDP has
    gathered its parameters. No image_index: the plain forward.
    """
    if image_index is None:
        return model_logits(model, inputs)
    module = unwrap(model)
    vl = module.model  # Qwen2_5_VLModel: its forward calls self.get_image_features(pixel_values, image_grid_thw, ...)
    encode, index = vl.get_image_features, image_index.tolist()
    first = [index.index(d) for d in range(max(index) + 1)]  # an occurrence of each distinct image: its grid row

    def get_image_features(pixel_values, image_grid_thw, **kwargs):
        out = encode(pixel_values, image_grid_thw[first], **kwargs)
        out.pooler_output = tuple(out.pooler_output[d] for d in index)
        return out

    vl.get_image_features = get_image_features
    try:
        return model_logits(model, inputs)
    finally:
        del vl.get_image_features  # the class's own method again


def model_logits(model, inputs: dict, **kwargs) -> torch.Tensor:
    """model(**inputs, use_cache=False, **kwargs).logits: every training forward of a micro-batch goes through here,
    so that an image-free micro-batch of a multimodal model still runs the vision tower where needed (below)."""
    if not _needs_vision_pass(model, inputs):
        return model(**inputs, use_cache=False, **kwargs).logits
    vl = unwrap(model).model  # Qwen2_5_VLModel: .visual (the tower), .language_model (the decoder)

    def hook(module, args, kwargs):
        return _vision_pass(vl.visual, args, kwargs)

    handle = vl.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return model(**inputs, use_cache=False, **kwargs).logits
    finally:
        handle.remove()


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _needs_vision_pass(model, inputs: dict) -> bool:
    """An image-free micro-batch of a multimodal model, on one of several processes.

    Why: transformers runs the vision tower only when pixel_values are given. Under FSDP every vision block is its
    own unit, whose forward all-gathers its parameters and whose backward reduce-scatters its gradients; a process
    whose micro-batch has no image would skip those collectives while the others wait in them: a hang (DDP: an
    unused-parameter error). On one process nothing waits, so nothing is added there and a text-only micro-batch
    trains exactly as before (with a trainable tower its gradients stay None rather than zeros, which AdamW's weight
    decay would see).
    """
    return "pixel_values" not in inputs and hasattr(unwrap(model).config, "vision_config") and _world_size() > 1


def _vision_pass(visual, args, kwargs):
    """Forward pre-hook of the language model, so inside the multimodal model's forward, where FSDP has gathered the
    root's parameters (each vision block gathers its own): encode one smallest blank image (4 patches, one merged
    token) and add its features times 0 to the input embeddings. The numbers do not change, and backward reaches
    every vision block (a zero gradient when the tower trains), so every process runs the same collectives."""
    c, m = visual.config, visual.spatial_merge_size
    embeds = kwargs["inputs_embeds"]
    pixels = torch.zeros(m * m, c.in_channels * c.temporal_patch_size * c.patch_size**2, device=embeds.device)
    features = visual(pixels.type(visual.dtype), grid_thw=torch.tensor([[1, m, m]], device=embeds.device)).pooler_output
    kwargs["inputs_embeds"] = embeds + 0.0 * features.sum().to(embeds.dtype)
    return args, kwargs


def unwrap(model):
    """The HF module under DDP / accelerate / torch.compile wrappers (FSDP2's fully_shard keeps the class)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
