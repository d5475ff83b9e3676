"""Prompt-shared attention (nanosrpo.attention): a GRPO group's prompt computed once in training (data.shared_batch)
and kept once in the decode loop's KV cache (attention.Prefix), with the numbers of the padded layout.

Tiny random models (0.2m), Qwen2.5-VL with images of different sizes and its text-only twin, prompts and completions
of uneven lengths, and a group cut short (a micro-batch that ends inside a group), so padding, slots, M-RoPE
positions and the log-prob bookkeeping all matter.
"""

import pytest
import torch

from nanosrpo import attention, data, engine, forward, model, synthetic, tiny


# ----------------------------------------------------------------------------------------------------- by hand
def test_shared_batch_layout_by_hand():
    """Group 0: prompt [5, 6, 7] with completions [8, 9] and [10]; group 1: prompt [11, 12] with completion [13, 14].
    P = 3, L = 2, n = 2: rows [prompt(3) | slot(2) | slot(2)] = 7 positions."""
    samples = [
        {"input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 0, 0, 1, 1], "group": 0, "prompt_len": 3},
        {"input_ids": [5, 6, 7, 10], "loss_mask": [0, 0, 0, 1], "group": 0, "prompt_len": 3},
        {"input_ids": [11, 12, 13, 14], "loss_mask": [0, 0, 1, 1], "group": 1, "prompt_len": 2},
    ]

    class Tok:  # collation needs only the pad id here (no images)
        pad_token_id = 0

    b = data.shared_batch(Tok(), samples)
    assert b["shared_prompt"] == (3, 2)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 0], [11, 12, 0, 13, 14, 0, 0]]
    # each token numbered as in its own sample: slots continue from their row's prompt length
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4], [0, 1, 2, 2, 3, 0, 0]]  # an empty slot: 0, unused
    mask = b["attention_mask"]
    assert mask.shape == (4, 1, 2, 5)  # rows * n slots, one head, L queries, P + L keys
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]  # all 3 prompt tokens, causal in the slot
    assert mask[2, 0].int().tolist() == [[1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]  # group 1's prompt has 2 real tokens
    # completion tokens are predicted at the prompt's last position (first token) or at the slot's previous one
    kept = b["logits_to_keep"].tolist()
    predictors = [(r, kept[c]) for r, c in zip(b["src_row"].tolist(), b["src_col"].tolist())]
    assert predictors == [(0, 2), (0, 3), (0, 2), (1, 1), (1, 3)]
    assert b["targets"].tolist() == [8, 9, 10, 13, 14]
    assert list(zip(b["dst_b"].tolist(), b["dst_t"].tolist())) == [(0, 3), (0, 4), (1, 3), (2, 2), (2, 3)]
    assert b["loss_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]  # collate's, per sample
    assert b["sample_lens"].tolist() == [5, 4, 4]


def test_sample_draws_from_the_distribution_and_never_a_zero():
    """engine.sample (inverse CDF, one uniform per row) against the probabilities it is given: frequencies within
    4 standard errors over 40,000 draws, tokens of probability 0 (suppressed, or cut by top-p) never drawn."""
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    torch.manual_seed(0)
    draws = torch.stack([engine.sample(probs) for _ in range(40_000)])  # [draws, 2]
    freq = torch.bincount(draws[:, 0], minlength=5).float() / len(draws)
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs[0], atol=4 * (0.25 / len(draws)) ** 0.5)
    assert (draws[:, 1] == 4).all()


# ----------------------------------------------------------------------------------------------------- tiny models
def _groups(processor, text_only: bool, completions=(3, 2)):
    """GRPO samples as rollout.training_samples makes them: two groups with prompts of different lengths (VL: images of
    different sizes), completions of uneven lengths."""
    from nanosrpo import prompts as P

    tok = data.tokenizer_of(processor)
    samples = []
    for g, (difficulty, idx, n) in enumerate([(1, 0, completions[0]), (3, 1, completions[1])]):
        prob = synthetic.make_problem(seed=0, difficulty=difficulty, idx=idx)
        rec = {
            "question": prob.question + " please" * (2 * g),
            "images": [] if text_only else ["grid.png"],
            "choices": None,
        }
        text = processor.apply_chat_template(
            data.prompt_messages(rec, P.SRPO_SYSTEM), tokenize=False, add_generation_prompt=True
        )
        images = [] if text_only else [synthetic.render(prob).resize((56 * (2 + g), 56 * 2))]
        prompt = data.encode(processor, text, images)
        for j in range(n):
            completion = tok(synthetic.one_round(prob)[: 9 + 13 * j] + "<|im_end|>", add_special_tokens=False)[
                "input_ids"
            ]
            samples.append(
                {
                    "input_ids": prompt + completion,
                    "loss_mask": [0] * len(prompt) + [1] * len(completion),
                    "images": images,
                    "group": g,
                    "prompt_len": len(prompt),
                }
            )
    return samples


@pytest.fixture(scope="module", params=["vl", "text"])
def world(request, tmp_path_factory):
    text_only = request.param == "text"
    path = tmp_path_factory.mktemp("shared") / request.param
    tiny.build_tiny(path, size="0.2m", seed=0, text_only=text_only)
    policy, processor = model.load_policy(str(path))
    torch.manual_seed(0)
    with torch.no_grad():  # larger random weights than the init's, so that positions and masks change the numbers
        for p in policy.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    samples = _groups(processor, text_only)
    assert len({s["prompt_len"] for s in samples}) == 2 and len({len(s["input_ids"]) for s in samples}) >= 4
    return {"policy": policy, "processor": processor, "samples": samples, "vl": not text_only, "path": str(path)}


def test_ordinary_batches_are_plain_sdpa(world):
    """load_policy routes attention through nanosrpo.attention; without a layout it is transformers' sdpa, bit for
    bit."""
    policy, processor = world["policy"], world["processor"]
    assert model.shares_prompts(policy)
    batch = data.collate(processor, world["samples"])
    inputs = {k: v for k, v in batch.items() if k in forward.MODEL_INPUT_KEYS}
    with torch.no_grad():
        ours = policy(**inputs).logits
        policy.set_attn_implementation({"text_config": "sdpa"} if world["vl"] else "sdpa")
        try:
            assert not model.shares_prompts(policy)
            theirs = policy(**inputs).logits
        finally:
            attention.enable(policy)
    assert torch.equal(ours, theirs)


def _cut(samples):
    return samples[:-1]  # the last group loses a completion: rows with different numbers of slots


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_logprobs_and_gradients_equal_padded(world, checkpointing):
    """The shared layout's log-probs equal the padded batch's on every completion token (0 elsewhere), and so do the
    gradients of a loss over them (every trainable weight, the vision tower included), with and without gradient
    checkpointing (the 7B preset trains with it: the layout must pass through the checkpointed layers)."""
    policy, processor = world["policy"], world["processor"]
    samples = _cut(world["samples"])
    padded, shared = data.collate(processor, samples, share_images=True), data.shared_batch(processor, samples)
    assert shared["input_ids"].shape[0] == 2  # one row per group
    assert torch.equal(shared["loss_mask"], padded["loss_mask"])
    if world["vl"]:
        assert shared["pixel_values"].shape[0] < padded["pixel_values"].shape[0] or "image_index" in padded
    policy.train()
    if checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    named = [(k, p) for k, p in policy.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    weights = torch.linspace(0.5, 1.5, padded["loss_mask"].numel()).view(padded["loss_mask"].shape)
    try:
        results = []
        for batch in (padded, shared):
            lp = forward.sequence_logprobs(policy, batch, chunk_size=29)
            loss = (lp * weights * batch["loss_mask"]).sum()
            results.append((lp, torch.autograd.grad(loss, params, allow_unused=True)))
    finally:
        policy.gradient_checkpointing_disable()
        policy.eval()
    (want, want_grads), (got, got_grads) = results
    m = padded["loss_mask"].bool()
    torch.testing.assert_close(got[m], want[m], atol=2e-5, rtol=1e-5)
    assert (got[~m] == 0).all()
    n_vision = 0
    for (name, _), a, b in zip(named, want_grads, got_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            # float32 sums in another order: equal to ~1e-6 of the tensor's scale (tied embeddings sum many tokens)
            torch.testing.assert_close(b, a, atol=1e-5 * float(a.abs().max()) + 1e-7, rtol=1e-4, msg=name)
            n_vision += int(".visual." in f".{name}" and bool(a.abs().sum() > 0))
    assert n_vision > 0 or not world["vl"]  # the gradient reached the vision tower through the one image copy


def test_micro_batches_shared_and_reference_rows(world):
    """micro_batches(layout="shared") in train_grpo.py's group order, cut mid-group, gives per-sample log-prob rows
    (logprobs_by_sample: the old / KL reference policy's) equal to the padded layout's on the completions."""
    policy, processor, samples = world["policy"], world["processor"], world["samples"]
    order = [3, 4, 0, 1, 2]  # group 1 first, then group 0; chunks of 2 cut group 0 after its first completion
    shared = list(data.micro_batches(samples, 2, processor, "cpu", order, layout="shared"))
    assert [idx for idx, _ in shared] == [[3, 4], [0, 1], [2]]
    assert [b["input_ids"].shape[0] for _, b in shared] == [1, 1, 1]
    padded = list(data.micro_batches(samples, 2, processor, "cpu", order))
    rows = {}
    for name, batches in (("padded", padded), ("shared", shared)):
        rows[name] = dict(zip(order, forward.logprobs_by_sample(policy, batches)))
    for i, s in enumerate(samples):
        m = torch.tensor(s["loss_mask"]).bool()
        assert rows["shared"][i].shape == rows["padded"][i].shape == (len(s["input_ids"]),)
        torch.testing.assert_close(rows["shared"][i][m], rows["padded"][i][m], atol=2e-5, rtol=1e-5)


def test_decode_with_one_prompt_copy_equals_copies(world):
    """engine.decode with attention.Prefix (the prompts' cache once per group) against the same loop with the cache
    repeated per row (plain sdpa): the same greedy tokens and the same log-probs, with rows finishing early."""
    policy, processor = world["policy"], world["processor"]
    prompts = []
    for s in world["samples"]:
        if not prompts or s["prompt_len"] != len(prompts[-1]["ids"]):
            prompts.append({"ids": s["input_ids"][: s["prompt_len"]], "images": s["images"]})
    tok = data.tokenizer_of(processor)
    stop, banned = [tok.convert_tokens_to_ids("<|im_end|>")], data.banned_ids(tok)
    first = engine.decode(policy, processor, prompts, 3, 10, stop, banned, greedy=True)
    stop.append(first[0][0][3])  # the first group's 4th token: its rows stop there, the other group's go on
    args = (policy, processor, prompts, 3, 10, stop, banned)
    ours = engine.decode(*args, greedy=True, logprobs=True)
    policy.set_attn_implementation({"text_config": "sdpa"} if world["vl"] else "sdpa")
    try:
        theirs = engine.decode(*args, greedy=True, logprobs=True)
    finally:
        attention.enable(policy)
    assert [ids for ids, _ in ours] == [ids for ids, _ in theirs]
    assert len({len(ids) for ids, _ in ours}) > 1  # some rows finished early and left the batch
    for (_, a), (_, b) in zip(ours, theirs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)
