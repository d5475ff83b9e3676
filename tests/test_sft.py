"""train_sft.py: the loss falls, only assistant tokens are learned, both chat layouts give the same batches."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import train_sft
from nanosrpo import data, model, prompts, synthetic
from nanosrpo.data import IGNORE


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    """A handful of two-round reflection records of the tiny world (messages layout, PNGs next to the file)."""
    d = tmp_path_factory.mktemp("sft")
    return synthetic.write_sft_split(d, "sft", 8, seed=5, system=prompts.SRPO_SYSTEM, reflection=True)


def _metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls(tiny_dir, sft_file, tmp_path):
    out = tmp_path / "run"
    final = train_sft.main(
        [
            "--model",
            str(tiny_dir),
            "--data",
            str(sft_file),
            "--out_dir",
            str(out),
            "--max_steps",
            "30",
            "--batch_size",
            "4",
            "--lr",
            "3e-3",
            "--save_every",
            "0",
        ]
    )
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "padding_frac"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert final == out / "checkpoint-30" and (final / "policy" / "config.json").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["max_steps"] == 30 and run["data_sha256"][str(sft_file)]
    # The final policy loads the way every later stage loads a model.
    policy, _ = model.load_policy(str(final / "policy"))
    assert sum(p.numel() for p in policy.parameters()) > 0


def test_assistant_mask_decodes_to_the_assistant_turn(tiny_dir, sft_file):
    _, processor = model.load_policy(str(tiny_dir))
    tok = data.tokenizer_of(processor)
    rec = data.load_sft_records(sft_file)[0]
    answer = rec["messages"][-1]["content"]
    sample = data.tokenize_chat(processor, rec["messages"])
    ids, mask = sample["input_ids"], sample["loss_mask"]
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == answer + "<|im_end|>"
    # The system prompt, the question and the image tokens carry no loss.
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad in ids and not any(m for t, m in zip(ids, mask) if t == image_pad)
    # Collation: labels are the ids on assistant tokens, IGNORE elsewhere (padding included).
    short = {**sample, "input_ids": ids[:-3], "loss_mask": mask[:-3]}
    batch = data.collate(processor, [sample, short])
    labels = batch["labels"][1]
    assert (labels[len(ids) - 3 :] == IGNORE).all()
    assert tok.decode(batch["labels"][0][batch["labels"][0] != IGNORE]) == answer + "<|im_end|>"


def test_tokenize_chats_equals_one_at_a_time(tiny_dir, sft_file):
    """train_sft.py tokenizes in chunks (data.tokenize_chats): each chat's ids must be what encode() gives it alone
    (the processor expanding its images), for chats with images and without, mixed in one chunk, in order."""
    _, processor = model.load_policy(str(tiny_dir))
    tok = data.tokenizer_of(processor)
    chats = [r["messages"] for r in data.load_sft_records(sft_file)[:5]]
    plain = [{"role": "user", "content": "How many red cells?"}, {"role": "assistant", "content": "<answer>3</answer>"}]
    chats = [chats[0], plain, *chats[1:3], [plain[0], {"role": "assistant", "content": "two"}], *chats[3:]]
    alone = [
        data.encode(
            processor,
            processor.apply_chat_template(m, tokenize=False),
            [data.load_image(p) for p in data.message_images(m)],
        )
        for m in chats
    ]
    many = data.tokenize_chats(processor, chats)
    assert [s["input_ids"] for s in many] == alone
    assert [s["loss_mask"] for s in many] == [data.assistant_mask(ids, tok) for ids in alone]
    assert len({len(s["input_ids"]) for s in many}) > 1 and sum(many[1]["loss_mask"]) > 0
    assert tok.convert_tokens_to_ids("<|image_pad|>") in many[0]["input_ids"]


def test_sharegpt_and_messages_layouts_give_identical_batches(tiny_dir, sft_file, tmp_path):
    """The same conversations written in LLaMA-Factory's sharegpt layout and in our messages layout."""
    _, processor = model.load_policy(str(tiny_dir))
    shutil.copytree(sft_file.parent / "images", tmp_path / "images")
    sharegpt = tmp_path / "sharegpt.jsonl"
    with open(sft_file) as src, open(sharegpt, "w") as dst:
        for line in src:
            rec = json.loads(line)
            turns, images = [], []
            for m in rec["messages"]:
                if isinstance(m["content"], str):
                    text = m["content"]
                else:
                    text = "".join("<image>" if c["type"] == "image" else c["text"] for c in m["content"])
                    images += [c["image"] for c in m["content"] if c["type"] == "image"]
                turns.append(
                    {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": text}
                )
            dst.write(json.dumps({"conversations": turns, "images": images}) + "\n")

    def batch_of(path):
        samples = [data.tokenize_chat(processor, r["messages"]) for r in data.load_sft_records(path)]
        return data.collate(processor, samples)

    a, b = batch_of(sft_file), batch_of(sharegpt)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (a["labels"] != IGNORE).any() and "pixel_values" in a


def test_length_bucketed_batches_keep_padding_small():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(1000)]
    batches = data.length_bucketed_batches(lengths, batch_size=8, bucket=16, seed=1)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 1000 // 8 * 8  # every record at most once; only full batches

    def padding(batches):
        return 1 - sum(lengths[i] for b in batches for i in b) / sum(
            len(b) * max(lengths[i] for i in b) for b in batches
        )

    unsorted = [list(range(j, j + 8)) for j in range(0, 1000, 8)]
    assert padding(batches) < 0.1 and padding(unsorted) > 0.3
    assert batches == data.length_bucketed_batches(lengths, batch_size=8, bucket=16, seed=1)  # resumable
    assert batches != data.length_bucketed_batches(lengths, batch_size=8, bucket=16, seed=2)  # reshuffled per epoch


@pytest.mark.slow
def test_ddp_on_cpu_matches_one_process(tiny_dir, sft_file, tmp_path):
    """2 processes x 2 sequences give the same losses as 1 process x 4: the loss is normalised over the global batch."""
    import os
    import subprocess
    import sys

    root = Path(train_sft.__file__).parent
    common = [
        "--model",
        str(tiny_dir),
        "--data",
        str(sft_file),
        "--max_steps",
        "3",
        "--grad_accum",
        "2",
        "--save_every",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run(
        torchrun + ["train_sft.py", "--out_dir", str(tmp_path / "ddp"), "--batch_size", "2"] + common,
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [sys.executable, "train_sft.py", "--out_dir", str(tmp_path / "one"), "--batch_size", "4"] + common,
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
    )
    ddp, one = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "one")
    assert len(ddp) == len(one) == 3
    for a, b in zip(ddp, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=1e-4
        )
    state = tmp_path / "ddp" / "checkpoint-3" / "state"  # each process saved its RNG states and wrote its files
    assert sorted(p.name for p in state.glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]
    assert sorted(p.name for p in state.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_loss_equals_the_full_vocabulary_cross_entropy(tiny_dir, sft_file, tmp_path, monkeypatch):
    """train_sft.py's loss comes from forward.sequence_logprobs (chunked float32 log-probs, one path with GRPO); it must
    be the old one, the full-vocabulary fp32 cross-entropy summed over assistant targets and divided by their number,
    to 1e-6: the first step's loss (all 8 records in one micro-batch, initial weights) and its gradient norm."""
    import torch.nn.functional as F

    from nanosrpo import forward

    calls, scored = [], forward.sequence_logprobs
    monkeypatch.setattr(forward, "sequence_logprobs", lambda *a, **k: calls.append(1) or scored(*a, **k))
    out = tmp_path / "one"
    train_sft.main(
        [
            "--model",
            str(tiny_dir),
            "--data",
            str(sft_file),
            "--out_dir",
            str(out),
            "--max_steps",
            "1",
            "--batch_size",
            "8",
            "--save_every",
            "0",
        ]
    )
    got = _metrics(out)[0]
    assert calls == [1]
    monkeypatch.undo()

    policy, processor = model.load_policy(str(tiny_dir))
    model.freeze_vision(policy)
    samples = [data.tokenize_chat(processor, r["messages"]) for r in data.load_sft_records(sft_file)]
    assert len(samples) == 8
    batch = data.collate(processor, samples)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_mask")}
    logits = policy(**inputs).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    loss = loss / (targets != IGNORE).sum()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.grad is not None], float("inf"))
    assert got["loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert got["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)

    # the packed layout (flash-attention's, here through sdpa's block mask) scores the same targets
    packed = data.packed_batch(processor, [{**s, "images": s["images"]} for s in samples])
    lp = forward.sequence_logprobs(policy, packed)
    with torch.no_grad():
        assert (-(lp * packed["loss_mask"])[:, 1:].sum() / (targets != IGNORE).sum()).item() == pytest.approx(
            loss.item(), abs=1e-6
        )
