"""Padding-free packed micro-batches (data.packed_batch) and the --attn_implementation option.

On a GPU with flash-attn, transformers turns a packed row's restarting position ids into flash-attn's cu_seqlens. On
this CPU there is no flash-attn, but transformers builds the same per-sample attention for sdpa and eager as a
block-diagonal causal mask from those position ids, so the packed *layout* (ids, position ids, M-RoPE rows, image
order, unpacking, masks) is checked here for real: packed log-probs must equal the padded batch's and each sample's
own forward.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanosrpo import config, data, forward
from nanosrpo.data import IGNORE
from tests.conftest import ROOT


def test_packed_layout_by_hand():
    """Two text samples of 3 and 2 tokens: one row of 5, positions restarting at 0, the loss mask kept per sample."""
    samples = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8, 9], "loss_mask": [0, 1]}]
    b = data.packed_batch(None, samples)  # no images: the processor is not needed
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["seq_lens"].tolist() == [3, 2]
    assert b["loss_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]  # the padded [B, T] layout the loss reads
    assert b["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert "attention_mask" not in b  # with one, transformers would not look for the sample boundaries
    # a sample whose first token is in its loss mask still gets IGNORE there: nothing in its own row precedes it
    b = data.packed_batch(
        None, [{"input_ids": [5, 6], "loss_mask": [1, 1]}, {"input_ids": [8, 9], "loss_mask": [1, 1]}]
    )
    assert b["labels"].tolist() == [[IGNORE, 6, IGNORE, 9]]


# ----------------------------------------------------------------------------------------------------- tiny models
def _samples(processor, text_only: bool):
    """Three prompt + completion samples of uneven lengths (VL: neighbouring images of different sizes), as
    rollout.training_samples makes them."""
    from nanosrpo import prompts as P
    from nanosrpo import synthetic as S

    out = []
    for difficulty, idx, cut in [(1, 0, 15), (3, 1, 60), (2, 5, 35)]:
        prob = S.make_problem(seed=0, difficulty=difficulty, idx=idx)
        rec = {"question": prob.question, "images": [] if text_only else ["grid.png"], "choices": None}
        text = processor.apply_chat_template(
            data.prompt_messages(rec, P.SRPO_SYSTEM), tokenize=False, add_generation_prompt=True
        )
        images = [] if text_only else [S.render(prob)]
        prompt = data.encode(processor, text, images)
        completion = data.tokenizer_of(processor)(S.one_round(prob)[:cut] + "<|im_end|>", add_special_tokens=False)[
            "input_ids"
        ]
        out.append(
            {"input_ids": prompt + completion, "loss_mask": [0] * len(prompt) + [1] * len(completion), "images": images}
        )
    return out


@pytest.fixture(scope="module", params=["vl", "text"])
def world(request, tmp_path_factory):
    from nanosrpo import model as M
    from nanosrpo import tiny

    text_only = request.param == "text"
    path = tmp_path_factory.mktemp("tiny") / request.param
    tiny.build_tiny(path, size="0.2m", seed=0, text_only=text_only)
    policies = {}
    for impl in ("sdpa", "eager"):
        policies[impl], processor = M.load_policy(str(path), attn_implementation=impl)
        policies[impl].eval()
    samples = _samples(processor, text_only)
    lengths = [len(s["input_ids"]) for s in samples]
    assert len(set(lengths)) == 3, lengths  # uneven: the padded batch really pads
    return policies, processor, samples, text_only


def test_packed_batch_keeps_tokens_masks_and_images(world):
    _, processor, samples, text_only = world
    padded, packed = data.collate(processor, samples), data.packed_batch(processor, samples)
    lens = [len(s["input_ids"]) for s in samples]
    assert packed["input_ids"].shape == (1, sum(lens)) and packed["seq_lens"].tolist() == lens
    assert packed["input_ids"][0].tolist() == [t for s in samples for t in s["input_ids"]]
    assert packed["position_ids"][0].tolist() == [p for n in lens for p in range(n)]
    assert torch.equal(packed["loss_mask"], padded["loss_mask"])  # same loss mask, same number of loss tokens
    assert (
        int((packed["labels"] != IGNORE).sum())
        == int((padded["labels"] != IGNORE).sum())
        == sum(sum(s["loss_mask"]) for s in samples)
    )
    assert int(packed["seq_lens"].sum()) == int(padded["attention_mask"].sum())  # every real token, no padding
    if text_only:
        assert "pixel_values" not in packed
        return
    # images in sample order: the same patches and grids as the padded batch, and each sample's own processor output
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])
    assert torch.equal(packed["image_grid_thw"], padded["image_grid_thw"])
    alone = [processor.image_processor(images=s["images"], return_tensors="pt") for s in samples]
    assert torch.equal(packed["pixel_values"], torch.cat([a["pixel_values"] for a in alone]))
    sizes = packed["image_grid_thw"].prod(1).tolist()
    assert sizes[0] != sizes[1] != sizes[2]  # neighbours differ in image size, so an order mix-up would show
    pad_id = data.tokenizer_of(processor).convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(packed["mm_token_type_ids"], (packed["input_ids"] == pad_id).long())


def test_packed_position_ids_are_each_samples_own(world):
    """Qwen2.5-VL: row 0 the text positions, rows 1-3 each sample's M-RoPE positions exactly as the model computes
    them for that sample alone (get_rope_index on a batch of one)."""
    policies, processor, samples, text_only = world
    policy = policies["sdpa"]
    packed = data.packed_batch(processor, samples)
    pos = forward.packed_position_ids(policy, packed)
    if text_only:
        assert torch.equal(pos, packed["position_ids"])
        return
    assert pos.shape == (4, 1, packed["input_ids"].shape[1])
    start = 0
    for s in samples:
        one = data.collate(processor, [s])
        want, _ = policy.model.get_rope_index(
            one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"], image_grid_thw=one["image_grid_thw"]
        )
        n = len(s["input_ids"])
        assert pos[0, 0, start : start + n].tolist() == list(range(n))
        assert torch.equal(pos[1:, :, start : start + n], want)
        assert not torch.equal(want[1], want[2])  # height and width rows differ on the image: a real 3-D position
        start += n


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_logprobs_equal_padded_and_per_sample(world, impl):
    policies, processor, samples, _ = world
    policy = policies[impl]
    with torch.no_grad():
        padded = forward.sequence_logprobs(policy, data.collate(processor, samples))
        packed = forward.sequence_logprobs(policy, data.packed_batch(processor, samples), chunk_size=37)
        assert packed.shape == padded.shape
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
        for i, s in enumerate(samples):  # each sample alone, no padding at all
            alone = forward.sequence_logprobs(policy, data.collate(processor, [s]))[0]
            torch.testing.assert_close(packed[i, : len(s["input_ids"])], alone, atol=1e-5, rtol=0)
            assert torch.equal(packed[i, len(s["input_ids"]) :], torch.zeros(packed.shape[1] - len(s["input_ids"])))
        # the control: positions that run on across samples make one long sequence (no boundaries): not the same
        run_on = data.packed_batch(processor, samples)
        run_on["position_ids"] = torch.arange(run_on["input_ids"].shape[1]).unsqueeze(0)
        wrong = forward.sequence_logprobs(policy, run_on)
        assert (wrong - padded).abs().max() > 1e-3


def test_packed_gradients_equal_padded(world):
    policies, processor, samples, _ = world
    policy = policies["sdpa"]
    padded_batch = data.collate(processor, samples)
    weights = torch.randn(padded_batch["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    weights = weights * padded_batch["loss_mask"]
    params = [p for p in policy.parameters() if p.requires_grad]

    def grads(batch):
        policy.zero_grad(set_to_none=True)
        (forward.sequence_logprobs(policy, batch) * weights).sum().backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    want, got = grads(padded_batch), grads(data.packed_batch(processor, samples))
    assert any(g.abs().sum() > 0 for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    policy.zero_grad(set_to_none=True)


def test_micro_batches_packed_give_the_same_rows(world):
    """What train_grpo.py does for the old-policy / reference log-probs: per-sample rows, packed or padded, agree."""
    policies, processor, samples, _ = world
    policy = policies["sdpa"]
    order = [2, 0, 1]
    rows = {}
    for packed in (False, True):
        batches = list(data.micro_batches(samples, 2, processor, "cpu", order, layout="packed" if packed else "padded"))
        assert [idx for idx, _ in batches] == [[2, 0], [1]]
        rows[packed] = forward.logprobs_by_sample(policy, batches)
    assert [len(r) for r in rows[True]] == [len(samples[i]["input_ids"]) for i in order]
    for a, b in zip(rows[True], rows[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_sft_loss_on_packed_labels_equals_padded(world):
    """train_sft.py's packed path: cross-entropy over the packed row's labels (IGNORE at each sample's start) sums
    to the padded batch's, over the same number of target tokens."""
    policies, processor, samples, _ = world
    policy = policies["sdpa"]

    def loss(batch, packed):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_mask", "seq_lens")}
        if packed:
            inputs.update(position_ids=forward.packed_position_ids(policy, batch), use_cache=False)
        logits = policy(**inputs).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"), int(
            (targets != IGNORE).sum()
        )

    with torch.no_grad():
        (want, n_want), (got, n_got) = (
            loss(data.collate(processor, samples), False),
            loss(data.packed_batch(processor, samples), True),
        )
    assert n_got == n_want == sum(sum(s["loss_mask"][1:]) for s in samples)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------- shared images
def _group_batch(samples):
    """A micro-batch as GRPO draws it: completions of the same prompts (the same image objects), interleaved."""

    def again(s, cut):  # another completion of the same prompt: same image objects, a shorter answer
        return {"input_ids": s["input_ids"][:-cut], "loss_mask": s["loss_mask"][:-cut], "images": s["images"]}

    return [samples[0], samples[1], again(samples[0], 3), samples[2], again(samples[1], 5), again(samples[0], 7)]


@pytest.mark.parametrize("world", ["vl"], indirect=True)  # the text twin has no images to share
@pytest.mark.parametrize("packed", [False, True])
def test_shared_images_encoded_once_same_logprobs_and_gradients(world, packed):
    """data.micro_batches' share_images: each distinct image through the processor and the vision tower once, with
    log-probs and gradients (vision tower included: it is trainable here) equal to encoding every copy."""
    policies, processor, samples, text_only = world
    policy = policies["sdpa"]
    group = _group_batch(samples)
    make = data.packed_batch if packed else data.collate
    plain, shared = make(processor, group), make(processor, group, share_images=True)
    assert "image_index" not in plain and shared["image_index"].tolist() == [0, 1, 0, 2, 1, 0]
    assert torch.equal(shared["image_grid_thw"], plain["image_grid_thw"])  # one grid row per occurrence, as before
    n_patches = plain["image_grid_thw"].prod(1)
    assert shared["pixel_values"].shape[0] == int(n_patches[:2].sum() + n_patches[3]) < plain["pixel_values"].shape[0]
    # without repeats nothing changes
    assert set(make(processor, samples, share_images=True)) == set(make(processor, samples))

    encoded = []  # images per call of the vision tower
    hook = policy.model.visual.register_forward_hook(
        lambda m, args, kw, out: encoded.append(len(kw["grid_thw"])), with_kwargs=True
    )
    weights = torch.randn(plain["loss_mask"].shape, generator=torch.Generator().manual_seed(0)) * plain["loss_mask"]
    params = [p for p in policy.parameters() if p.requires_grad]

    def run(batch):
        policy.zero_grad(set_to_none=True)
        lp = forward.sequence_logprobs(policy, batch)
        (lp * weights).sum().backward()
        return lp.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    try:
        (lp_plain, g_plain), (lp_shared, g_shared) = run(plain), run(shared)
    finally:
        hook.remove()
        policy.zero_grad(set_to_none=True)
    assert encoded == [6, 3]
    torch.testing.assert_close(lp_shared, lp_plain, atol=1e-6, rtol=0)
    visual = [i for i, (n, _) in enumerate(policy.named_parameters()) if n.startswith("model.visual.")]
    assert visual and any(g_shared[i].abs().sum() > 0 for i in visual)  # the tower's gradient is really there
    for g, w in zip(g_shared, g_plain):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    assert "get_image_features" not in vars(policy.model)  # the wrapper is gone after the forward


def test_micro_batches_share_images(world):
    """train_grpo.py's micro-batches share a group's image; the rows equal those of unshared batches."""
    policies, processor, samples, text_only = world
    group = _group_batch(samples)
    batches = list(data.micro_batches(group, 4, processor, "cpu"))
    assert ("image_index" in batches[0][1]) == (not text_only)
    rows = forward.logprobs_by_sample(policies["sdpa"], batches)
    want = forward.logprobs_by_sample(
        policies["sdpa"], [(i, data.collate(processor, [group[j] for j in i])) for i, _ in batches]
    )
    for a, b in zip(rows, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------- the option
def test_attn_implementation_option():
    assert config.parse(config.GRPOConfig, []).attn_implementation == "sdpa"
    assert config.parse(config.SFTConfig, ["--attn_implementation", "eager"]).attn_implementation == "eager"
    with pytest.raises(SystemExit, match="must be one of sdpa, eager, flash_attention_2"):
        config.parse(config.GRPOConfig, ["--attn_implementation", "flash"])


def test_flash_attention_checks_on_a_gpu_machine(monkeypatch):
    """Where a GPU is present: fp32 attention (the transformers engine's sampling, SFT without --bf16) is refused, and
    so is a missing flash-attn."""
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="needs --engine vllm"):
        config.parse(config.GRPOConfig, ["--attn_implementation", "flash_attention_2"])
    with pytest.raises(SystemExit, match="needs --bf16 true"):
        config.parse(config.SFTConfig, ["--attn_implementation", "flash_attention_2", "--bf16", "false"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else object())
    for cls, extra in [(config.GRPOConfig, ["--engine", "vllm"]), (config.SFTConfig, [])]:
        with pytest.raises(
            SystemExit, match="needs the flash-attn package: pip install flash-attn --no-build-isolation"
        ):
            config.parse(cls, ["--attn_implementation", "flash_attention_2", *extra])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
@pytest.mark.parametrize("script", ["train_grpo.py", "train_sft.py"])
def test_flash_attention_on_cpu_ends_in_one_line(script, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / script),
            "--attn_implementation",
            "flash_attention_2",
            "--out_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "flash_attention_2 needs a CUDA GPU" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was built or written
