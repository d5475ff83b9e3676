"""GRPO maths: group-relative advantages, the clipped policy loss, per-token log-probabilities, the group filter.

SRPO's RL stage is GRPO with a reflection-aware reward (the reward lives in rewards.py); the optimisation itself is
plain GRPO (Shao et al. 2024, DeepSeekMath), with the variants people compare against selectable by argument:
  - GRPO:     advantages normalised by the group std, loss averaged per sequence then over sequences.
  - DAPO:     asymmetric clipping (clip_high > clip_low, "clip-higher") and a token-level mean over the whole batch.
  - Dr. GRPO: no std normalisation, and token sums divided by a constant length instead of each sequence's length.

No model, no I/O, no sampling (how a micro-batch goes through the model to these log-probs is forward.py):
  group_advantages(rewards, group_size)          -> [N]      one advantage per completion
  policy_loss(logprobs, old, adv, mask, ...)     -> loss, stats
  token_logprobs(logits, targets, temperature)   -> [N]      log pi(target | context) at temperature tau, per row
  keep_group(rewards, accuracies)                -> bool     the accuracy filter of dynamic sampling
"""

from typing import Optional

import torch

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


# ----------------------------------------------------------------------------------------------------- advantages
def group_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
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
        length = max_len if max_len is not None else mask.shape[1]
        total, default = (per_token.sum(dim=1) / length).sum(), logprobs.shape[0]
    loss = total / (normalizer if normalizer is not None else default)
    return loss, _stats(ratio, A, valid, m, kl, clip_low, clip_high, ratio_cap)


@torch.no_grad()
def _stats(ratio, A, valid, m, kl, clip_low: float, clip_high: float, ratio_cap: float) -> dict:
    """policy_loss's diagnostics, python floats over the valid tokens: where each side of the clip and the ratio cap
    acted (the token's gradient is 0 there), the mean ratio, the mean KL (0.0 without a reference model)."""
    n = m.sum().clamp(min=1.0)
    low = (A < 0) & (ratio < 1.0 - clip_low) & valid  # clipped branch active on the low side: gradient is 0
    high = (A > 0) & (ratio > 1.0 + clip_high) & valid  # ... and on the high side
    capped = (A < 0) & (ratio > ratio_cap) & valid if ratio_cap > 0 else torch.zeros_like(valid)  # the cap acts
    return {
        "clip_ratio_low": (low.sum() / n).item(),
        "clip_ratio_high": (high.sum() / n).item(),
        "clip_ratio": ((low | high).sum() / n).item(),
        "ratio_capped": (capped.sum() / n).item(),
        "ratio_mean": ((ratio * m).sum() / n).item(),
        "kl": ((kl * m).sum() / n).item(),
    }


# ----------------------------------------------------------------------------------------------------- log-probs
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(target | context) = log_softmax(logits / temperature)[target] for rows of logits [N, V] and targets [N],
    as the target's logit minus the logsumexp, in float32. Rollouts sampled at temperature tau are scored at tau: the
    ratio's pi_old is the distribution the engine sampled from. (forward.sequence_logprobs feeds it a chunk of rows at
    a time, so the float32 copy is never the whole batch's.)"""
    logits = logits.float() / temperature  # float32 here, and only here: one chunk at a time
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)


# ----------------------------------------------------------------------------------------------------- filtering
def keep_group(rewards: list[float], accuracies: list[float], low: float = 0.1, high: float = 0.9) -> bool:
    """The accuracy filter of the SRPO runs (DAPO-style dynamic sampling): a prompt's group is trained on only if its
    mean accuracy lies in [low, high] and neither its accuracies nor its rewards are all equal. `accuracies` are each
    rollout's accuracy score in [0, 1] (rollout.accuracy_score). A group whose scores are all equal has nothing to
    learn about being right, even inside the bounds: its advantages would come from format and length alone (or be
    zero, when its rewards are equal too); a too-easy or too-hard prompt mostly wastes a slot in the batch."""
    mean_accuracy = sum(accuracies) / len(accuracies)
    return low <= mean_accuracy <= high and max(accuracies) > min(accuracies) and max(rewards) > min(rewards)
