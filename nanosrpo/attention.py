"""Prompt-shared attention: the completions of a GRPO group attend to one copy of their prompt.

A group is one prompt and n completions of it. Laid out as n padded rows, every prompt token is computed n times in
the policy's forward and backward (on the tiny run 71% of an update's tokens are prompt copies), and a decode loop
keeps n copies of each prompt's KV cache, read and copied again at every step. Causal attention makes the copies
redundant: a prompt's keys and values do not depend on what follows it, so computing them once and letting each
completion attend to them gives the same numbers, for a fraction of the work.

The model stays transformers' own (its layers, RoPE, MLPs, gradient checkpointing, FSDP): only the attention call is
swapped, through transformers' AttentionInterface, for `attention` below, which takes one of two layouts as a
keyword argument of the forward (transformers hands unknown forward kwargs down to the attention function):
  shared_prompt=(P, n)   training (data.shared_batch, forward.sequence_logprobs): one row per group,
                         [prompt, right-padded to P | slot 1 | ... | slot n], each slot one completion right-padded to
                         L = (T - P) / n; the forward's 4-D attention_mask [rows * n, 1, L, P + L] says which prompt
                         keys are real (a 4-D mask is passed through by transformers as it is)
  prefix=Prefix(...)     decoding (engine.decode): the prompts' keys and values once per group, from the prefill;
                         past_key_values holds only each row's own generated tokens
Without either, the call is transformers' sdpa, unchanged: SFT, evaluation and prefill run exactly as before.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "nanosrpo_sdpa"  # the name the attention function and its mask function are registered under


def enable(model) -> None:
    """Route the language model's attention of `model` (a transformers model loaded with sdpa) through `attention`.
    The vision tower keeps its own. The checkpoint written by save_pretrained does not record the change."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # ordinary batches: sdpa's own masks
    model.set_attn_implementation({"text_config": NAME} if hasattr(model.config, "vision_config") else NAME)


def attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, shared_prompt=None, prefix=None, **kwargs
):
    """query [B, H, T, d], key / value [B, kvH, T', d] (RoPE applied, from the cache if any) -> ([B, T, H, d], None)."""
    if shared_prompt is not None:
        return _shared_prompt(query, key, value, attention_mask, scaling, dropout, *shared_prompt), None
    if prefix is not None:
        return _prefix_decode(query, key, value, scaling, prefix, module.layer_idx), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


# ----------------------------------------------------------------------------------------------------- training
def _shared_prompt(query, key, value, mask, scaling, dropout, P: int, n: int) -> torch.Tensor:
    """Rows [prompt | slot 1 | ... | slot n]: the prompt attends causally to itself; slot j attends to its row's prompt
    (the real tokens: `mask`) and causally to itself. Two sdpa calls; gradients flow back into the one prompt copy
    from every slot (the expand below sums them)."""
    G, H, T, d = query.shape
    L = (T - P) // n
    kv_heads = key.shape[1]
    if H != kv_heads and query.device.type != "cpu":  # GQA: CUDA's masked sdpa kernels want the heads repeated
        key, value = key.repeat_interleave(H // kv_heads, 1), value.repeat_interleave(H // kv_heads, 1)
    gqa = H != key.shape[1]
    # The prompt region is right-padded, so plain causal attention keeps every real token away from the padding.
    out_p = F.scaled_dot_product_attention(
        query[:, :, :P],
        key[:, :, :P],
        value[:, :, :P],
        is_causal=True,
        scale=scaling,
        dropout_p=dropout,
        enable_gqa=gqa,
    )

    def slots(x):  # [G, h, P + n*L, d] -> [G*n, h, L, d]: one row per completion
        return x[:, :, P:].unflatten(2, (n, L)).transpose(1, 2).flatten(0, 1)

    def behind_prompt(x):  # keys / values of each completion: its row's prompt, then its own tokens [G*n, h, P + L, d]
        prompt = x[:, :, :P].unsqueeze(1).expand(-1, n, -1, -1, -1).flatten(0, 1)
        return torch.cat([prompt, slots(x)], dim=2)

    out_c = F.scaled_dot_product_attention(
        slots(query),
        behind_prompt(key),
        behind_prompt(value),
        attn_mask=mask,
        scale=scaling,
        dropout_p=dropout,
        enable_gqa=gqa,
    )
    out_c = out_c.unflatten(0, (G, n)).transpose(1, 2).flatten(2, 3)  # [G, H, n*L, d], back in row order
    return torch.cat([out_p, out_c], dim=2).transpose(1, 2).contiguous()


def shared_prompt_mask(prompt_lens: torch.Tensor, P: int, n: int, L: int) -> torch.Tensor:
    """The completions' attention mask [rows * n, 1, L, P + L] (True: attend): the row's real prompt tokens (the first
    prompt_lens[row] of the P prompt positions), then causal over the slot's own L positions."""
    prompt = torch.arange(P)[None, :] < prompt_lens[:, None]  # [rows, P]
    prompt = prompt.repeat_interleave(n, 0)[:, None, None, :].expand(-1, 1, L, P)
    causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(prompt.shape[0], 1, L, L)
    return torch.cat([prompt, causal], dim=3)


# ----------------------------------------------------------------------------------------------------- decoding
@dataclass
class Prefix:
    """The prompts' keys and values, once per group, for decoding n rows per prompt.

    keys / values: per layer [G, kvH, P, d] (the prefill's cache, left-padded prompts); mask [G, P]: True on real
    prompt tokens; n: rows per prompt (row r = g * n + j belongs to prompt g); live [R]: the rows still in the batch,
    in batch order (engine.decode drops finished rows from the batch and from its own-token cache, not from here)."""

    keys: list
    values: list
    mask: torch.Tensor
    n: int
    live: torch.Tensor


def _prefix_decode(query, key, value, scaling, prefix: Prefix, layer: int) -> torch.Tensor:
    """One new token per live row: softmax over [its prompt's keys | its own tokens' keys], one softmax, as one
    sequence would have it. The prompt part is computed per group with the group's rows as n query rows of one
    matrix product, so a prompt's keys and values are read once per step and never copied per row."""
    R, H, _, d = query.shape
    Kp, Vp = prefix.keys[layer], prefix.values[layer]  # [G, kvH, P, d]
    G, kv_heads, P, _ = Kp.shape
    rep, n, live = H // kv_heads, prefix.n, prefix.live
    scale = scaling if scaling is not None else d**-0.5
    q = query.reshape(R, kv_heads, rep, d)  # query heads grouped by their key/value head (GQA)

    def to_groups(x):  # [R, kvH, rep, m] -> [G, kvH, n * rep, m], finished rows as zeros
        grid = x.new_zeros(G * n, *x.shape[1:])
        grid[live] = x
        return grid.view(G, n, kv_heads, rep, -1).transpose(1, 2).reshape(G, kv_heads, n * rep, -1)

    def to_rows(x):  # the inverse: [G, kvH, n * rep, m] -> [R, kvH, rep, m]
        return x.view(G, kv_heads, n, rep, -1).transpose(1, 2).reshape(G * n, kv_heads, rep, -1)[live]

    s_prompt = to_rows(to_groups(q) @ Kp.transpose(-1, -2)).float() * scale  # [R, kvH, rep, P]
    s_prompt = s_prompt.masked_fill(~prefix.mask[live // n][:, None, None, :], float("-inf"))
    s_own = (q @ key.transpose(-1, -2)).float() * scale  # [R, kvH, rep, t]: the row's own tokens, all real
    w = torch.cat([s_prompt, s_own], dim=-1).softmax(-1).to(value.dtype)
    out = to_rows(to_groups(w[..., :P]) @ Vp) + w[..., P:] @ value  # [R, kvH, rep, d]
    return out.reshape(R, 1, H, d)
