"""TransformersEngine's own decode loop (engine.decode) against transformers' generate and a teacher-forced forward.

Tiny random models (0.2m), Qwen2.5-VL with images of different sizes and its text-only twin, on uneven prompts, so
left padding, M-RoPE positions, the shared prefill + expanded KV cache and the dropping of finished rows all matter.
"""

import pytest
import torch

from nanosrpo import data, engine, model, synthetic, tiny

MAX_NEW = 12


@pytest.fixture(scope="module", params=["vl", "text"])
def world(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"decode-{request.param}")
    text_only = request.param == "text"
    tiny.build_tiny(root / "policy", size="0.2m", seed=0, text_only=text_only)
    policy, processor = model.load_policy(str(root / "policy"))
    # A freshly initialised model (std 0.02) greedily repeats one token whatever the prompt; larger random weights
    # make completions depend on the prompt and the position, so order, positions and padding mistakes show.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.25)
    recs = data.load_rl_records(synthetic.write_rl_split(root, "rl", 4, seed=0, text_only=text_only))
    prompts = []
    for i, rec in enumerate(recs):
        rec = {**rec, "question": rec["question"] + " please" * (3 * i)}  # uneven prompt lengths
        if i == 3:
            rec["images"] = []  # a prompt without an image in the same batch as prompts with one
        p = data.render_prompt(rec, "Count.", processor)
        if p["images"] and i == 1:  # a larger image: more vision tokens and another M-RoPE grid
            p = data.render_prompt(rec, "Count.", processor)
            p["images"] = [p["images"][0].resize((p["images"][0].width * 2, p["images"][0].height))]
            p["ids"] = data.encode(processor, p["text"], p["images"])
        prompts.append(p)
    assert len({len(p["ids"]) for p in prompts}) >= 3  # uneven: left padding differs from row to row
    return {"policy": policy, "processor": processor, "prompts": prompts, "vl": not text_only}


def reference_generate(policy, processor, prompt, eng, max_new):
    """transformers' generate on one prompt (no padding), greedy, the engine's stop and suppressed ids."""
    batch = data.collate(
        processor, [{"input_ids": prompt["ids"], "loss_mask": [0] * len(prompt["ids"]), "images": prompt["images"]}]
    )
    inputs = {k: v for k, v in batch.items() if k not in ("loss_mask", "labels")}
    out = policy.generate(
        **inputs,
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=data.tokenizer_of(processor).pad_token_id,
        eos_token_id=sorted(eng.stop_ids),
        suppress_tokens=eng.suppress,
    )
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    for j, t in enumerate(ids):
        if t in eng.stop_ids:
            return ids[: j + 1]
    return ids


def teacher_forced(policy, processor, prompt, completion, temperature, suppress):
    """log_softmax((logits with suppressed ids at -inf) / temperature) at each completion token, from one forward
    over prompt + completion (forward.sequence_logprobs' computation plus the engine's suppression)."""
    sample = {
        "input_ids": prompt["ids"] + completion,
        "loss_mask": [0] * (len(prompt["ids"]) + len(completion)),
        "images": prompt["images"],
    }
    batch = data.collate(processor, [sample])
    inputs = {k: v for k, v in batch.items() if k not in ("loss_mask", "labels")}
    with torch.no_grad():
        logits = policy(**inputs).logits[0].float()
    logits[:, suppress] = float("-inf")
    lp = (logits / temperature).log_softmax(-1)
    P = len(prompt["ids"])
    return torch.stack([lp[P - 1 + j, t] for j, t in enumerate(completion)])


def test_greedy_equals_generate(world):
    eng = engine.TransformersEngine(world["policy"], world["processor"], batch_size=64)
    groups = eng.generate(world["prompts"], n=2, max_new_tokens=MAX_NEW, greedy=True, temperature=0.0)
    assert len(groups) == len(world["prompts"]) and all(len(g) == 2 for g in groups)
    for p, g in zip(world["prompts"], groups):
        want = reference_generate(world["policy"], world["processor"], p, eng, MAX_NEW)
        assert g[0]["ids"] == want and g[1]["ids"] == want  # greedy: both rows of the group are the same
        assert g[0]["text"] == data.tokenizer_of(world["processor"]).decode(want, skip_special_tokens=True)


def test_logprobs_equal_teacher_forced(world):
    torch.manual_seed(1)
    T = 0.7
    eng = engine.TransformersEngine(world["policy"], world["processor"])
    groups = eng.generate(world["prompts"], n=3, max_new_tokens=MAX_NEW, temperature=T, logprobs=True)
    for p, g in zip(world["prompts"], groups):
        for c in g:
            assert len(c["logprobs"]) == len(c["ids"])
            want = teacher_forced(world["policy"], world["processor"], p, c["ids"], T, eng.suppress)
            assert torch.allclose(torch.tensor(c["logprobs"]), want, atol=1e-4), (c["logprobs"], want.tolist())


def test_sampling_reproducible_and_never_suppressed(world):
    eng = engine.TransformersEngine(world["policy"], world["processor"])
    # Suppress the greedy first token of every prompt too: likely tokens, so a leak would show.
    greedy = eng.generate(world["prompts"], n=1, max_new_tokens=1, greedy=True)
    eng.suppress = sorted(set(eng.suppress) | {g[0]["ids"][0] for g in greedy})
    torch.manual_seed(7)
    a = eng.generate(world["prompts"], n=4, max_new_tokens=MAX_NEW, temperature=1.5)
    torch.manual_seed(7)
    b = eng.generate(world["prompts"], n=4, max_new_tokens=MAX_NEW, temperature=1.5)
    assert [[c["ids"] for c in g] for g in a] == [[c["ids"] for c in g] for g in b]
    for g in a:
        assert len(g) == 4 and len({tuple(c["ids"]) for c in g}) > 1  # 4 different samples of the same prompt
        for c in g:
            assert not set(c["ids"]) & set(eng.suppress)


def test_group_order_by_distinct_prompts(world):
    """n > 1 groups in the right order: a greedy group is n copies of that prompt's own greedy completion."""
    eng = engine.TransformersEngine(world["policy"], world["processor"], batch_size=6)  # 2 prompts per decode call
    singles = [eng.generate([p], n=1, max_new_tokens=MAX_NEW, greedy=True)[0][0]["ids"] for p in world["prompts"]]
    assert len({tuple(s) for s in singles}) > 1  # different prompts give different completions: order is testable
    groups = eng.generate(world["prompts"], n=3, max_new_tokens=MAX_NEW, greedy=True)
    assert [[c["ids"] for c in g] for g in groups] == [[s] * 3 for s in singles]


def test_stop_ids_cut_and_rows_drop_out(world):
    eng = engine.TransformersEngine(world["policy"], world["processor"])
    full = [g[0]["ids"] for g in eng.generate(world["prompts"], n=1, max_new_tokens=MAX_NEW, greedy=True)]
    stop = full[0][2]  # the third token of the first prompt's completion becomes a stop id
    eng.stop_ids = eng.stop_ids | {stop}
    cut = [g[0]["ids"] for g in eng.generate(world["prompts"], n=2, max_new_tokens=MAX_NEW, greedy=True)]
    for f, c in zip(full, cut):
        want = f[: f.index(stop) + 1] if stop in f else f
        assert c == want  # up to and including the first stop id; the rows that keep running are unaffected
    assert len(cut[0]) == 3 and any(len(c) == MAX_NEW for c in cut)
