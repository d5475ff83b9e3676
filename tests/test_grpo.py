"""Tests for nanosrpo.grpo: every formula against a naive per-sequence python loop, and the log-probs on the tiny VL
model."""

import math

import pytest
import torch

from nanosrpo import forward, grpo

AGGS = grpo.AGGREGATIONS


# ----------------------------------------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    eps = 1e-6
    # groups [1, 0] and [0, 1]: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = sqrt(0.5)
    s = math.sqrt(0.5)
    want = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + eps)
    got = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)
    torch.testing.assert_close(got, want)
    # [1, 2, 3]: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1
    got = grpo.group_advantages(torch.tensor([1.0, 2.0, 3.0]), group_size=3)
    torch.testing.assert_close(got, torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + eps))


def test_group_advantages_dr_grpo():
    got = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0]), group_size=3, normalize_std=False)
    torch.testing.assert_close(got, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0]))


@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_constant_groups_are_exactly_zero(normalize_std):
    # in float32 mean([0.1] * 8) != 0.1: without special care that group would get advantages of -0.0074, not 0
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0] + [0.1] * 8 + [5.0] * 8)
    got = grpo.group_advantages(r, group_size=8, normalize_std=normalize_std)
    assert torch.equal(got[8:], torch.zeros(16))
    assert got[0] > 0 and got[1] < 0 and not torch.isnan(got).any()


def test_group_advantages_edge_cases():
    assert torch.equal(grpo.group_advantages(torch.tensor([1.0, 0.0, 3.0]), group_size=1), torch.zeros(3))  # no NaN
    got = grpo.group_advantages(torch.tensor([1, 0, 1, 1]), group_size=2)  # integer rewards are fine
    assert got.dtype == torch.float32 and torch.equal(got[2:], torch.zeros(2))
    with pytest.raises(ValueError, match="group_size"):
        grpo.group_advantages(torch.zeros(5), group_size=2)


# ----------------------------------------------------------------------------------------------------- loss
def naive_loss(logprobs, old, adv, mask, clip_low, clip_high, ref, kl_coef, aggregation, max_len=None, ratio_cap=0.0):
    """The loss written the slow, obvious way: python loops over sequences and tokens."""
    B, T = logprobs.shape
    max_len = T if max_len is None else max_len
    seq_terms, all_tokens = [], []
    for i in range(B):
        toks = []
        for t in range(T):
            if mask[i, t] == 0:
                continue
            ratio = torch.exp(logprobs[i, t] - old[i, t])
            if ratio_cap:
                ratio = torch.clamp(ratio, max=ratio_cap)
            clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
            term = -torch.minimum(ratio * adv[i], clipped * adv[i])
            if ref is not None:
                d = ref[i, t] - logprobs[i, t]
                term = term + kl_coef * (torch.exp(d) - d - 1)
            toks.append(term)
        all_tokens += toks
        total = sum(toks) if toks else logprobs.sum() * 0
        if aggregation == "seq-mean-token-mean":
            seq_terms.append(total / max(len(toks), 1))
        elif aggregation == "seq-mean-token-sum-norm":
            seq_terms.append(total / max_len)
    if aggregation == "token-mean":
        return sum(all_tokens) / len(all_tokens)
    return sum(seq_terms) / B


def naive_stats(logprobs, old, adv, mask, clip_low, clip_high, ref):
    low = high = n = 0
    ratio_sum = kl_sum = 0.0
    for i in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            if mask[i, t] == 0:
                continue
            r = math.exp(logprobs[i, t] - old[i, t])
            n += 1
            low += int(adv[i] < 0 and r < 1 - clip_low)
            high += int(adv[i] > 0 and r > 1 + clip_high)
            ratio_sum += r
            if ref is not None:
                d = float(ref[i, t] - logprobs[i, t])
                kl_sum += math.exp(d) - d - 1
    return {"clip_ratio_low": low / n, "clip_ratio_high": high / n, "ratio_mean": ratio_sum / n, "kl": kl_sum / n}


def random_batch(B=8, T=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    old = logprobs + 0.4 * torch.randn(
        B, T, generator=g, dtype=dtype
    )  # ratios well outside [0.8, 1.28]: clipping happens
    ref = logprobs + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    starts = torch.randint(0, T, (B,), generator=g)
    mask = torch.zeros(B, T)
    for i in range(B):  # a contiguous completion span somewhere in the row, as after a prompt
        s = min(int(starts[i]), T - int(lengths[i]))
        mask[i, s : s + int(lengths[i])] = 1
    return logprobs, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.4)])
@pytest.mark.parametrize("with_ref", [False, True])
def test_policy_loss_matches_naive(aggregation, clip, with_ref):
    logprobs, old, ref, adv, mask = random_batch()
    ref = ref if with_ref else None
    kl_coef = 0.05 if with_ref else 0.0
    lp_fast = logprobs.clone().requires_grad_(True)
    loss, stats = grpo.policy_loss(
        lp_fast, old, adv, mask, *clip, ref_logprobs=ref, kl_coef=kl_coef, aggregation=aggregation
    )
    loss.backward()
    lp_naive = logprobs.clone().requires_grad_(True)
    want = naive_loss(lp_naive, old, adv, mask, *clip, ref, kl_coef, aggregation)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(lp_fast.grad, lp_naive.grad)
    for k, v in naive_stats(logprobs, old, adv, mask, *clip, ref).items():
        assert isinstance(stats[k], float)
        assert stats[k] == pytest.approx(v, abs=1e-9), k
    assert stats["clip_ratio"] == pytest.approx(stats["clip_ratio_low"] + stats["clip_ratio_high"])
    assert stats["clip_ratio_low"] > 0 and stats["clip_ratio_high"] > 0  # the batch exercises both clipped branches


def test_policy_loss_max_len_and_old_logprobs_without_grad():
    logprobs, old, _, adv, mask = random_batch(seed=1)
    lp = logprobs.clone().requires_grad_(True)
    loss, _ = grpo.policy_loss(lp, old, adv, mask, aggregation="seq-mean-token-sum-norm", max_len=20)
    torch.testing.assert_close(
        loss, naive_loss(logprobs, old, adv, mask, 0.2, 0.2, None, 0.0, "seq-mean-token-sum-norm", 20)
    )
    # old_logprobs is a constant even if the caller forgot to detach it
    loss, _ = grpo.policy_loss(lp, lp, adv, mask)
    loss.backward()
    assert lp.grad is not None and torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("aggregation", AGGS)
def test_ratio_one_gives_minus_weighted_mean_advantage(aggregation):
    logprobs, _, _, adv, mask = random_batch(seed=2)
    lp = logprobs.clone().requires_grad_(True)
    loss, stats = grpo.policy_loss(lp, logprobs, adv, mask, aggregation=aggregation)
    n = mask.sum(1).double()
    T = mask.shape[1]
    if aggregation == "seq-mean-token-mean":  # each sequence weighs 1/B
        want, w = -adv.mean(), 1 / (len(adv) * n)
    elif aggregation == "token-mean":  # each token weighs 1/N_tokens
        want, w = -(adv * n).sum() / n.sum(), torch.full_like(n, 1 / float(n.sum()))
    else:  # each token weighs 1/(B*T)
        want, w = -(adv * n / T).mean(), torch.full_like(n, 1 / (len(adv) * T))
    torch.testing.assert_close(loss, want)
    loss.backward()  # at ratio 1 d(loss)/d(logprob) = -A * weight, on valid tokens only
    torch.testing.assert_close(lp.grad, -(adv * w)[:, None] * mask.double())
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_ratio"] == 0.0 and stats["kl"] == 0.0


@pytest.mark.parametrize("aggregation", AGGS)
def test_padding_changes_nothing(aggregation):
    logprobs, old, ref, adv, mask = random_batch(seed=3)
    B, T = logprobs.shape
    pad = 4
    g = torch.Generator().manual_seed(9)
    # garbage in the padding, including values whose exp overflows
    junk = lambda: torch.randn(B, pad, generator=g, dtype=logprobs.dtype) * 1000  # noqa: E731
    kw = dict(aggregation=aggregation, max_len=T, clip_low=0.2, clip_high=0.28, kl_coef=0.1)
    lp1 = logprobs.clone().requires_grad_(True)
    loss1, stats1 = grpo.policy_loss(lp1, old, adv, mask, ref_logprobs=ref, **kw)
    loss1.backward()
    lp2 = torch.cat([logprobs, junk()], 1).requires_grad_(True)
    old2, ref2, mask2 = (
        torch.cat([old, junk()], 1),
        torch.cat([ref, junk()], 1),
        torch.cat([mask, torch.zeros(B, pad)], 1),
    )
    loss2, stats2 = grpo.policy_loss(lp2, old2, adv, mask2, ref_logprobs=ref2, **kw)
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(lp2.grad[:, :T], lp1.grad)
    assert torch.equal(lp2.grad[:, T:], torch.zeros(B, pad))
    assert stats1 == pytest.approx(stats2)


@pytest.mark.parametrize("aggregation", AGGS)
def test_empty_sequence_is_not_nan(aggregation):
    logprobs, old, ref, adv, mask = random_batch(seed=4)
    mask[1] = 0
    lp = logprobs.clone().requires_grad_(True)
    loss, stats = grpo.policy_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, aggregation=aggregation)
    loss.backward()
    assert (
        torch.isfinite(loss) and torch.isfinite(lp.grad).all() and torch.equal(lp.grad[1], torch.zeros_like(lp.grad[1]))
    )
    lp = logprobs.clone().requires_grad_(True)
    loss, stats = grpo.policy_loss(lp, old, adv, torch.zeros_like(mask), aggregation=aggregation)
    loss.backward()
    assert loss.item() == 0.0 and all(math.isfinite(v) for v in stats.values())


def test_unknown_aggregation():
    logprobs, old, _, adv, mask = random_batch()
    with pytest.raises(ValueError, match="seq-mean-token-mean.*token-mean.*seq-mean-token-sum-norm"):
        grpo.policy_loss(logprobs, old, adv, mask, aggregation="sum")


# ----------------------------------------------------------------------------------------------------- log-probs
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from nanosrpo import model as M
    from nanosrpo import prompts as P
    from nanosrpo import synthetic as S
    from nanosrpo import tiny as T

    path = tmp_path_factory.mktemp("tiny") / "tiny"
    T.build_tiny(path, size="0.2m", seed=0)
    model, processor = M.load_policy(str(path), attn_implementation="sdpa")
    model.eval()
    texts, images = [], []
    for difficulty, idx in [(1, 0), (3, 1)]:  # 4x4 and 5x5 grids: different image sizes and lengths
        prob = S.make_problem(seed=0, difficulty=difficulty, idx=idx)
        msgs = [
            {"role": "system", "content": P.SRPO_SYSTEM},
            {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": prob.question}]},
        ]
        prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        texts.append(prompt + S.one_round(prob) + "<|im_end|>")
        images.append(S.render(prob))

    def encode(idx, side):
        processor.tokenizer.padding_side = side
        return dict(
            processor(text=[texts[i] for i in idx], images=[images[i] for i in idx], return_tensors="pt", padding=True)
        )

    return model, encode


def naive_logprobs(model, batch, temperature=1.0):
    """The plain way: full logits -> float32 log_softmax over the vocabulary -> gather the next token."""
    logits = model(**batch).logits.float() / temperature
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)


def test_sequence_logprobs_matches_naive_for_both_paddings(tiny):
    model, encode = tiny
    with torch.no_grad():
        singles = [encode([i], "right") for i in range(2)]
        want = [naive_logprobs(model, b)[0] for b in singles]  # unpadded, one sample at a time
        for side in ("left", "right"):
            batch = encode([0, 1], side)
            assert "mm_token_type_ids" in batch and batch["pixel_values"].shape[0] > 0
            batch["completion_mask"] = torch.ones_like(batch["input_ids"])  # non-model keys are ignored
            got = forward.sequence_logprobs(model, batch, chunk_size=37)  # a chunk size that does not divide B*T
            assert got.shape == batch["input_ids"].shape and got.dtype == torch.float32
            lengths = batch["attention_mask"].sum(1)
            assert lengths[0] != lengths[1]  # one row really is padded
            for i, w in enumerate(want):
                L = int(lengths[i])
                row = got[i, -L:] if side == "left" else got[i, :L]
                # position 0 of a left-padded row is conditioned on padding; every later token must match
                torch.testing.assert_close(row[1:], w[1:], atol=1e-5, rtol=0)
                assert torch.equal(got[i][batch["attention_mask"][i] == 0], torch.zeros(got.shape[1] - L))
            if side == "right":  # right padding: the whole padded batch equals the naive batched forward too
                del batch["completion_mask"]
                want_batch = naive_logprobs(model, batch) * batch["attention_mask"]
                torch.testing.assert_close(got, want_batch, atol=1e-5, rtol=0)


def test_sequence_logprobs_temperature(tiny):
    model, encode = tiny
    batch = encode([0, 1], "left")
    with torch.no_grad():
        want = naive_logprobs(model, batch, temperature=0.7) * batch["attention_mask"]
        torch.testing.assert_close(forward.sequence_logprobs(model, batch, temperature=0.7), want, atol=1e-5, rtol=0)


def test_sequence_logprobs_gradients_match_naive(tiny):
    """Chunked + checkpointed log-probs give the same parameter gradients as the plain computation."""
    model, encode = tiny
    batch = encode([0, 1], "right")
    weights = (
        torch.randn(batch["input_ids"].shape, generator=torch.Generator().manual_seed(0)) * batch["attention_mask"]
    )
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(fn):
        model.zero_grad(set_to_none=True)
        (fn() * weights).sum().backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    want = grads(lambda: naive_logprobs(model, batch))
    got = grads(lambda: forward.sequence_logprobs(model, batch, chunk_size=64))
    assert any(g.abs().sum() > 0 for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_end_to_end_loss_backward(tiny):
    """One GRPO step's maths on the tiny model: log-probs -> loss -> finite gradients in the language model."""
    model, encode = tiny
    batch = encode([0, 1], "left")
    mask = batch["attention_mask"].clone()
    mask[:, : mask.shape[1] - 20] = 0  # pretend the last 20 tokens are the completion
    with torch.no_grad():
        old = forward.sequence_logprobs(model, batch)
    logprobs = forward.sequence_logprobs(model, batch)
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0]), group_size=2)
    loss, stats = grpo.policy_loss(logprobs, old, adv, mask)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    model.zero_grad(set_to_none=True)
    loss.backward()
    g = model.get_output_embeddings().weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_token_weights_scale_the_policy_gradient_term():
    torch.manual_seed(0)
    lp = torch.randn(3, 5, requires_grad=True)
    old, adv, mask = lp.detach() + 0.1 * torch.randn(3, 5), torch.randn(3), torch.ones(3, 5)
    base, _ = grpo.policy_loss(lp, old, adv, mask)
    same, _ = grpo.policy_loss(lp, old, adv, mask, token_weights=torch.ones(3, 5))
    double, _ = grpo.policy_loss(lp, old, adv, mask, token_weights=torch.full((3, 5), 2.0))
    assert torch.allclose(same, base) and torch.allclose(double, 2 * base)


def test_token_weights_non_uniform_with_padding_match_naive():
    """TIS weights differ per token, and padding positions hold garbage weights (inf): the loss is the naive weighted
    per-token mean over the valid tokens only."""
    logprobs, old, _, adv, mask = random_batch(B=4, T=9, seed=5)
    w = torch.rand(4, 9, generator=torch.Generator().manual_seed(1), dtype=logprobs.dtype) * 3
    w = torch.where(mask.bool(), w, torch.full_like(w, float("inf")))
    got, _ = grpo.policy_loss(logprobs, old, adv, mask, 0.2, 0.28, token_weights=w)
    want = 0.0
    for i in range(4):
        terms = []
        for t in range(9):
            if mask[i, t]:
                ratio = torch.exp(logprobs[i, t] - old[i, t])
                terms.append(-torch.minimum(ratio * adv[i], ratio.clamp(0.8, 1.28) * adv[i]) * w[i, t])
        want = want + sum(terms) / len(terms)
    assert torch.isfinite(got) and got.item() == pytest.approx(float(want / 4), rel=1e-9)


@pytest.mark.parametrize("aggregation", AGGS)
def test_micro_batches_on_processes_add_up_to_the_whole_update(aggregation):
    """What train_grpo.py does with one update of 8 sequences on 2 processes x 2 micro-batches: each micro-batch's loss
    uses the whole update's denominator (`normalizer`), backward of loss * world, gradients averaged over processes
    (as DDP/FSDP do). The gradient must equal the naive whole-batch loss's, lengths uneven."""
    logprobs, old, _, adv, mask = random_batch(B=8, T=12, seed=3)
    lp = logprobs.clone().requires_grad_()
    (want,) = torch.autograd.grad(naive_loss(lp, old, adv, mask, 0.2, 0.28, None, 0.0, aggregation), lp)
    world = 2
    normalizer = float(mask.sum()) if aggregation == "token-mean" else 8.0
    averaged = torch.zeros_like(logprobs)
    for rank in range(world):
        lp = logprobs.clone().requires_grad_()
        for mb in ([rank * 4, rank * 4 + 1], [rank * 4 + 2, rank * 4 + 3]):
            loss, _ = grpo.policy_loss(
                lp[mb], old[mb], adv[mb], mask[mb], 0.2, 0.28, aggregation=aggregation, normalizer=normalizer
            )
            (loss * world).backward()
        averaged += lp.grad / world
    torch.testing.assert_close(averaged, want)
    if aggregation == "token-mean":  # the old way, a per-micro-batch token mean weighted by sequences, is not DAPO's
        lp = logprobs.clone().requires_grad_()
        for mb in ([0, 1], [2, 3], [4, 5], [6, 7]):
            loss, _ = grpo.policy_loss(lp[mb], old[mb], adv[mb], mask[mb], 0.2, 0.28, aggregation=aggregation)
            (loss * 2 / 8).backward()
        assert not torch.allclose(lp.grad, want)


@pytest.mark.parametrize(
    "rewards, accuracies, keep",
    [
        ([1.0, 0.0, 1.0, 0.0], [1, 0, 1, 0], True),  # mean accuracy 0.5, rewards differ
        ([1.0, 1.0, 1.0, 1.0], [1, 1, 1, 1], False),  # too easy (and no signal)
        ([0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], False),  # too hard
        ([1.2, 1.0, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], False),  # in bounds, every accuracy equal: nothing to learn
        ([1.2, 1.0, 0.5, 0.5], [0.5, 0.5, 0.5, 0.25], True),  # ... and one that differs: something to learn
        ([1.0, 0.0, 0.0, 0.0], [0.4, 0.0, 0.0, 0.0], True),  # mean 0.1: the bounds are inclusive
        ([1.0, 0.0, 0.0, 0.0], [0.05, 0.0, 0.0, 0.0], False),  # mean 0.0125 < 0.1
        ([1.0, 1.0, 1.0, 0.9], [1.0, 1.0, 1.0, 0.7], False),  # mean 0.925 > 0.9
        ([1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0], False),  # in bounds but every reward equal: zero advantages
    ],
)
def test_keep_group(rewards, accuracies, keep):
    assert grpo.keep_group(rewards, accuracies, 0.1, 0.9) == keep


# ----------------------------------------------------------------------------------------------------- ratio cap
def test_ratio_cap_by_hand():
    """Two sequences of three tokens, ratios 4, 2, 0.5 (A = -1) and 4, 1.1, 0.5 (A = +1), clip 0.2, cap 3.
    A = -1: ratio 4 -> capped at 3, term -min(-3, -1.2) = 3 with gradient 0 (uncapped: 4, gradient r = 4);
            ratio 2 -> 2 (gradient 2); ratio 0.5 -> clipped to 0.8 (gradient 0).
    A = +1: ratio 4 -> clipped to 1.2 either way (gradient 0); 1.1 -> -1.1 (gradient -1.1); 0.5 -> -0.5 (gradient -0.5).
    seq-mean-token-mean: ((3 + 2 + 0.8) / 3 + (-1.2 - 1.1 - 0.5) / 3) / 2 = 0.5 (uncapped: (6.8 - 2.8) / 6 = 2/3);
    d loss / d logprob = ratio * d term / d ratio / (3 tokens * 2 sequences)."""
    ratios = torch.tensor([[4.0, 2.0, 0.5], [4.0, 1.1, 0.5]], dtype=torch.float64)
    adv, mask = torch.tensor([-1.0, 1.0], dtype=torch.float64), torch.ones(2, 3)
    want_grad = {3.0: [[0.0, 2.0, 0.0], [0.0, -1.1, -0.5]], 0.0: [[4.0, 2.0, 0.0], [0.0, -1.1, -0.5]]}
    for cap, want_loss, want_capped in ((3.0, 0.5, 1 / 6), (0.0, 2 / 3, 0.0)):
        lp = ratios.log().requires_grad_()
        loss, stats = grpo.policy_loss(lp, torch.zeros_like(lp), adv, mask, 0.2, 0.2, ratio_cap=cap)
        loss.backward()
        assert loss.item() == pytest.approx(want_loss)
        torch.testing.assert_close(lp.grad, torch.tensor(want_grad[cap], dtype=torch.float64) / 6)
        assert stats["ratio_capped"] == pytest.approx(want_capped)  # the one token where the cap changes anything
        assert stats["ratio_mean"] == pytest.approx(12.1 / 6)  # the raw ratio: how far off-policy the update is


@pytest.mark.parametrize("aggregation", AGGS)
def test_ratio_cap_matches_naive_and_changes_only_negative_advantages(aggregation):
    """A cap of 1.5 (above 1 + clip_high = 1.28) on the random batch: the loss and gradient are the naive loss with
    the ratio clamped first; tokens with A >= 0, and tokens under the cap, get exactly the uncapped gradient."""
    logprobs, old, _, adv, mask = random_batch(seed=6)
    lp = logprobs.clone().requires_grad_()
    loss, stats = grpo.policy_loss(lp, old, adv, mask, 0.2, 0.28, aggregation=aggregation, ratio_cap=1.5)
    loss.backward()
    lp_naive = logprobs.clone().requires_grad_()
    naive = naive_loss(lp_naive, old, adv, mask, 0.2, 0.28, None, 0.0, aggregation, ratio_cap=1.5)
    naive.backward()
    torch.testing.assert_close(loss, naive)
    torch.testing.assert_close(lp.grad, lp_naive.grad)
    lp_free = logprobs.clone().requires_grad_()
    grpo.policy_loss(lp_free, old, adv, mask, 0.2, 0.28, aggregation=aggregation)[0].backward()
    ratio = (logprobs - old).exp()
    acts = (adv[:, None] < 0) & (ratio > 1.5) & mask.bool()
    assert acts.any() and stats["ratio_capped"] == pytest.approx(float(acts.sum() / mask.sum()))
    assert torch.equal(lp.grad[acts], torch.zeros(int(acts.sum()), dtype=lp.grad.dtype))  # no push past the cap
    assert (lp_free.grad[acts] != 0).all()  # ... where the uncapped loss pushes
    torch.testing.assert_close(lp.grad[~acts], lp_free.grad[~acts])
