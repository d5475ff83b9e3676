"""How a micro-batch goes through the model: its layouts, position ids, shared images, and the per-token log-probs.

The maths of the log-probs is grpo.token_logprobs; this module is everything between a collated micro-batch (data.py)
and the logits that formula reads:
  sequence_logprobs(model, batch)     -> [B, T]   log p(token_t | tokens_<t), 0 at t = 0, for every layout:
                                                  padded (data.collate), packed (data.packed_batch: one row, no
                                                  padding, flash-attention) or shared (data.shared_batch: one copy of
                                                  each group's prompt, nanosrpo.attention)
  logprobs_by_sample(model, batches)  -> rows     the same, one unpadded row per sample (old / reference policies)
  packed_position_ids, shared_position_ids        each sample's positions (and Qwen2.5-VL's M-RoPE ones) in a layout
  logits_sharing_images, model_logits             the forward itself: a shared image's vision tower run once, and
                                                  the vision pass an image-free micro-batch needs under FSDP
  unwrap(model)                                   the HF module under DDP / accelerate / torch.compile wrappers
"""

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from nanosrpo import grpo

# Batch keys that are inputs of a HF (multimodal) causal LM forward. Anything else a collator puts in the batch
# (loss_mask, labels, advantages, ...) stays out of the forward; `labels` in particular would make HF compute
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


# ----------------------------------------------------------------------------------------------------- log-probs
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
    chunk (grpo.token_logprobs). With gradients on, each chunk runs under activation checkpointing, so backward does
    not keep every chunk's float32 copy alive: it re-computes one chunk at a time. Numbers equal a plain full
    log_softmax + gather.
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
        parts.append(
            checkpoint(grpo.token_logprobs, *args, use_reentrant=False) if use_ckpt else grpo.token_logprobs(*args)
        )
    scored = torch.cat(parts).view(B, T)[:, :-1]  # [B, T - 1]: log-probs of tokens 1 .. T-1

    out = torch.cat([scored.new_zeros(B, 1), scored], dim=1)  # [B, T]; position 0 has no context
    if "seq_lens" in batch:  # [1, N] -> [B, max len], right-padded; each sample's first token has no context either
        rows = out[0].split(batch["seq_lens"].tolist())
        return torch.nn.utils.rnn.pad_sequence([torch.cat([r.new_zeros(1), r[1:]]) for r in rows], batch_first=True)
    if "attention_mask" in inputs:
        out = out * inputs["attention_mask"].to(out.dtype)  # padding is not a token of the sample
    return out


def _token_logprobs_at(logits, rows, cols, targets, temperature: float) -> torch.Tensor:
    """grpo.token_logprobs of the logits at (rows, cols): the gathered copy is one chunk's, never the whole batch's."""
    return grpo.token_logprobs(logits[rows, cols], targets, temperature)


def _shared_prompt_logprobs(model, batch: dict, chunk_size: int, temperature: float) -> torch.Tensor:
    """sequence_logprobs of a shared-prompt micro-batch (data.shared_batch), in the same right-padded per-sample
    layout [B, T] as a collated batch: completion tokens carry their log-probs, prompt positions 0.

    The forward runs each group's prompt once (nanosrpo.attention) and computes logits only where they predict a
    completion token (logits_to_keep: the prompts' last positions and the slots); each completion token's log-prob is
    then read at its predicting position, chunk by chunk (float32, checkpointed as in sequence_logprobs).
    """
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
    inputs["position_ids"] = shared_position_ids(model, batch)
    logits = model_logits(
        model, inputs, shared_prompt=batch["shared_prompt"], logits_to_keep=batch["logits_to_keep"]
    )  # [rows, kept positions, V]
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad
    parts = []
    for s in range(0, len(batch["targets"]), chunk_size):
        args = (
            logits,
            batch["src_row"][s : s + chunk_size],
            batch["src_col"][s : s + chunk_size],
            batch["targets"][s : s + chunk_size],
            temperature,
        )
        parts.append(
            checkpoint(_token_logprobs_at, *args, use_reentrant=False) if use_ckpt else _token_logprobs_at(*args)
        )
    out = logits.new_zeros(batch["loss_mask"].shape, dtype=torch.float32)
    return out.index_put((batch["dst_b"], batch["dst_t"]), torch.cat(parts))


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


# ----------------------------------------------------------------------------------------------------- position ids
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
    rope, delta = module.model.get_rope_index(
        ids, mm_token_type_ids=mm, image_grid_thw=batch.get("image_grid_thw"), attention_mask=real
    )  # [3, rows, P], [rows, 1]
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
    attention_mask = (
        torch.arange(ids.shape[1], device=ids.device)[None] < batch["seq_lens"][:, None].to(ids.device)
    ).long()
    rope, _ = module.model.get_rope_index(
        ids, mm_token_type_ids=mm, image_grid_thw=batch.get("image_grid_thw"), attention_mask=attention_mask
    )  # [3, B, T]
    rope = rope[:, attention_mask.bool()].unsqueeze(1)  # [3, 1, N]: the valid positions, sample after sample
    return torch.cat([text.view(1, 1, -1).to(rope.device), rope], dim=0)


# ----------------------------------------------------------------------------------------------------- the forward
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
