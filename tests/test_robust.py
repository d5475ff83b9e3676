"""Robustness at scale: processes that see different data must never wait on each other forever, a bad record is
found before the first step, and SFT shares GRPO's chunked log-prob path.

  - an image-free micro-batch on one process of a sharded (FSDP2) multimodal policy while another has images
  - every record validated at load time (prompt length with image tokens, image count, readable images), cheaply
  - one process's DataError ends every process within seconds, with its one line
  - the SFT loss from forward.sequence_logprobs, equal to the old full-vocabulary cross-entropy
"""

import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from nanosrpo import data, forward, model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_with_deadline(worker, args: tuple, deadline_s: float, nprocs: int = 2) -> None:
    """mp.spawn of `worker(rank, nprocs, port, *args)`, failing (not hanging) when the processes are not done by the
    deadline: a collective that one process never enters waits for gloo's 30-minute timeout otherwise."""
    ctx = mp.start_processes(
        worker, args=(nprocs, _free_port(), *args), nprocs=nprocs, join=False, start_method="spawn"
    )
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=1):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {nprocs} processes did not finish within {deadline_s:.0f} s (a collective hung)")


def _init(rank, world, port):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------- FSDP2 images
LAYOUTS = {
    "padded": lambda proc, s: data.collate(proc, s, share_images=True),
    "shared": lambda proc, s: data.shared_batch(proc, s),
    "packed": lambda proc, s: data.packed_batch(proc, s, share_images=True),
}


def _mixed_worker(rank, world, port, path, result_dir, frozen):
    """Rank 0 trains on micro-batches with images, rank 1 on text-only ones, through a policy sharded as accelerate's
    FSDP config shards it (each decoder layer and vision block a unit), vision tower trainable or frozen. Every
    layout; the averaged sharded gradient must equal the unsharded one over both ranks' micro-batches."""
    _init(rank, world, port)
    from tests.test_shared_prompt import _groups

    policy, processor = model.load_policy(path)
    per_rank = [_groups(processor, text_only=False), _groups(processor, text_only=True)]
    n_tokens = sum(sum(s["loss_mask"]) for samples in per_rank for s in samples)

    def loss(m, batch):
        return -(forward.sequence_logprobs(m, batch) * batch["loss_mask"]).sum() / n_tokens

    unsharded, _ = model.load_policy(path)
    if frozen:
        model.freeze_vision(policy)
        model.freeze_vision(unsharded)
    for samples in per_rank:
        loss(unsharded, data.collate(processor, samples, share_images=True)).backward()
    want = {n: p.grad for n, p in unsharded.named_parameters() if p.grad is not None}
    assert any(".visual.blocks.0." in f".{n}" for n in want) != frozen

    model.shard_like_fsdp(policy)
    for layout, make in LAYOUTS.items():
        policy.zero_grad(set_to_none=True)
        batch = make(processor, per_rank[rank])
        assert ("pixel_values" in batch) == (rank == 0)
        (loss(policy, batch) * world).backward()  # FSDP averages over ranks: * world sums
        got = {n: p.grad.full_tensor() for n, p in policy.named_parameters() if p.grad is not None}
        assert set(got) == set(want), (layout, set(want) ^ set(got))
        for n, g in want.items():
            tol = 1e-5 * float(g.abs().max()) + 1e-7
            torch.testing.assert_close(got[n], g, atol=tol, rtol=1e-4, msg=f"{layout} {n}")
    (result_dir / f"ok-{rank}").write_text("ok")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("frozen", [False, True])
def test_fsdp_ranks_with_and_without_images_do_not_hang(tiny_dir, tmp_path, frozen):
    """Without the image-free vision pass, rank 1 skips the vision blocks' all-gathers that rank 0 issues (and, with
    a trainable tower, their gradients' reduce-scatters): NCCL waits until its timeout, gloo aborts on the mismatched
    sizes. The deadline turns a hang into a failure."""
    spawn_with_deadline(_mixed_worker, (str(tiny_dir), tmp_path, frozen), deadline_s=240)
    assert (tmp_path / "ok-0").exists() and (tmp_path / "ok-1").exists()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("frozen", [False, True])
def test_image_free_vision_pass_changes_nothing(tiny_dir, monkeypatch, layout, frozen):
    """On one process the pass is forced on (as if world > 1): the log-probs and every gradient are those without it,
    except that a trainable tower gets gradients of exactly zero instead of none."""
    from tests.test_shared_prompt import _groups

    policy, processor = model.load_policy(str(tiny_dir))
    if frozen:
        model.freeze_vision(policy)
    batch = LAYOUTS[layout](processor, _groups(processor, text_only=True))

    def run():
        policy.zero_grad(set_to_none=True)
        lp = forward.sequence_logprobs(policy, batch)
        (lp * batch["loss_mask"]).sum().backward()
        return lp.detach(), {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}

    lp0, g0 = run()
    calls = []
    monkeypatch.setattr(forward, "_world_size", lambda: 2)
    visual = policy.model.visual
    hook = visual.register_forward_hook(lambda *a: calls.append(1))
    lp1, g1 = run()
    hook.remove()
    assert calls == [1]  # the tower ran once
    assert torch.equal(lp0, lp1)
    assert not any(".visual." in f".{n}" for n in g0)
    tower = {n for n, p in policy.named_parameters() if ".visual." in f".{n}"}
    assert set(g1) - set(g0) == (set() if frozen else tower)
    for n, g in g1.items():
        assert torch.equal(g, g0[n]) if n in g0 else not g.any(), n


# ----------------------------------------------------------------------------------------------------- load-time checks
def _sized_images(tmp_path) -> list:
    """PNGs of awkward sizes: odd, tall, wide, tiny (below min_pixels), large (over a max_pixels bound)."""
    from PIL import Image

    paths = []
    for k, (w, h) in enumerate([(112, 112), (97, 61), (30, 500), (700, 45), (10, 10), (640, 480)]):
        p = tmp_path / f"im{k}.png"
        Image.new("RGB", (w, h), (k * 40 % 255, 90, 200)).save(p)
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("bounds", [(0, 0), (0, 56 * 56), (200 * 200, 0)])
def test_token_counts_from_image_sizes_equal_the_processor(tiny_dir, tmp_path, bounds):
    """encode / tokenize_chats count each image's tokens from its size (no image processor); the ids must be exactly
    what the processor gives with the pixels, under the processor's pixel bounds too."""
    _, processor = model.load_policy(str(tiny_dir))
    model.set_pixel_bounds(processor, *bounds)
    paths = _sized_images(tmp_path)
    chats = [
        [
            {"role": "user", "content": [{"type": "image", "image": p}, {"type": "text", "text": f"q {k}"}]},
            {"role": "assistant", "content": "<answer>3</answer>"},
        ]
        for k, p in enumerate(paths)
    ]
    two = [{"type": "image", "image": paths[0]}, {"type": "image", "image": paths[1]}, {"type": "text", "text": "two"}]
    chats.append([{"role": "user", "content": two}, {"role": "assistant", "content": "x"}])
    chats.append([{"role": "user", "content": "no image"}, {"role": "assistant", "content": "y"}])
    want = []
    for m in chats:
        text = processor.apply_chat_template(m, tokenize=False)
        images = [data.load_image(p) for p in data.message_images(m)]
        want.append(
            processor(text=[text], images=images)["input_ids"][0]
            if images
            else data.tokenizer_of(processor)(text, add_special_tokens=False)["input_ids"]
        )
        assert data.encode(processor, text, images) == list(want[-1])
    assert len({len(w) for w in want}) > 4  # the sizes give different counts

    def no_pixels(*a, **k):
        raise AssertionError("SFT tokenization must not process or load images")

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(type(processor), "__call__", no_pixels)
        mp_.setattr(type(processor.image_processor), "__call__", no_pixels)
        mp_.setattr(data, "load_image", no_pixels)
        got = data.tokenize_chats(processor, chats)
    assert [s["input_ids"] for s in got] == [list(w) for w in want]


def _rl_file(tmp_path, rows: list[dict]):
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_lengths_equal_the_rendered_prompts(tiny_dir, tmp_path):
    from nanosrpo import prompts, rollout

    _, processor = model.load_policy(str(tiny_dir))
    model.set_pixel_bounds(processor, max_pixels=100 * 100)
    paths = _sized_images(tmp_path)
    rows = [
        {"id": f"r{k}", "question": f"How many? {'x ' * k}", "answer": "3", "image": p} for k, p in enumerate(paths)
    ]
    rows += [
        {"id": "two", "question": "q", "answer": "1", "image": paths[:2]},
        {"id": "none", "question": "q", "answer": "B", "choices": ["a", "b"]},
    ]
    records = data.load_rl_records(_rl_file(tmp_path, rows))
    got = data.prompt_lengths(processor, prompts.SRPO_SYSTEM, records)
    assert got == [len(rollout.render(r, prompts.SRPO_SYSTEM, processor, 0)["ids"]) for r in records]


def test_rl_records_are_checked_at_load_time(tiny_dir, tmp_path):
    """Too long a prompt (images included), too many images for vLLM, an unreadable image: refused when the file is
    read, naming its file, line and field, not when a rollout meets the record."""
    from nanosrpo import prompts

    _, processor = model.load_policy(str(tiny_dir))
    paths = _sized_images(tmp_path)
    rows = [
        {"id": "a", "question": "q", "answer": "1", "image": paths[0]},
        {"id": "b", "question": "q", "answer": "1", "image": paths[5]},
    ]  # 640 x 480 px: many vision tokens
    path = _rl_file(tmp_path, rows)
    short, long_ = data.prompt_lengths(processor, prompts.SRPO_SYSTEM, data.load_rl_records(path))
    limits = {"processor": processor, "system": prompts.SRPO_SYSTEM}
    assert len(data.load_rl_records(path, max_prompt_length=long_, **limits)) == 2
    with pytest.raises(data.DataError, match=rf"{path}:2: fields 'question'/'image': the prompt is {long_} tokens"):
        data.load_rl_records(path, max_prompt_length=long_ - 1, **limits)
    assert short < long_

    path = _rl_file(tmp_path, [rows[0], {**rows[1], "image": paths[:2]}])
    assert len(data.load_rl_records(path, max_images=2)) == 2
    with pytest.raises(data.DataError, match=rf"{path}:2: field 'image': 2 images, over --vllm_max_images 1"):
        data.load_rl_records(path, max_images=1)

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    path = _rl_file(tmp_path, [rows[0], {**rows[1], "image": str(broken)}])
    with pytest.raises(data.DataError, match=rf"{path}:2: field 'image': cannot read image {broken}"):
        data.load_rl_records(path)
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": str(broken)}]},
                    {"role": "assistant", "content": "x"},
                ]
            }
        )
        + "\n"
    )
    with pytest.raises(data.DataError, match=rf"{sft}:1: field 'messages\[0\].content.image': cannot read image"):
        data.load_sft_records(sft)


# ----------------------------------------------------------------------------------------------------- one rank fails
ONE_RANK_FAILS = """
import sys, time
sys.path.insert(0, {root!r})
import torch
from accelerate import Accelerator
from nanosrpo import config
from nanosrpo.data import DataError


def main():
    accelerator = Accelerator(cpu=True)
    accelerator.reduce(torch.ones(1), "sum")  # both processes are up
    if accelerator.process_index == 1:
        open({stamp!r}, "w").write(str(time.time()))
        raise DataError("rl.jsonl:7: field 'image': a bad record met mid-run")
    accelerator.reduce(torch.ones(1), "sum")  # rank 0 waits here for a rank that never comes
    time.sleep(600)


config.run(main)
"""


@pytest.mark.slow
def test_one_rank_data_error_ends_every_rank_with_its_line(tmp_path):
    """accelerate launch, 2 CPU processes: rank 1 raises a DataError while rank 0 sits in a collective. The launch
    must end within seconds of the error, non-zero, and the launcher's failure summary (its last lines) must name
    the error's one line as the root cause."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    script, stamp = tmp_path / "one_rank_fails.py", tmp_path / "raised_at"
    script.write_text(ONE_RANK_FAILS.format(root=str(ROOT), stamp=str(stamp)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
    ]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    ended = time.time()
    out = (p.stdout + p.stderr).splitlines()
    line = "error: rl.jsonl:7: field 'image': a bad record met mid-run"
    assert p.returncode != 0 and line in out, "\n".join(out[-30:])
    assert ended - float(stamp.read_text()) < 30, ended - float(stamp.read_text())
    tail = [s.strip() for s in out[-4:]]
    assert f"traceback : {line}" in tail, "\n".join(out[-30:])


def test_train_grpo_refuses_a_long_prompt_before_the_first_step(tiny_dir, tmp_path):
    """The record-loading lines of train_grpo.py pass the limits: one line naming file and line, no step taken."""
    import subprocess
    import sys

    from nanosrpo import synthetic
    from tests.conftest import ROOT

    path = synthetic.write_rl_split(tmp_path, "rl", 3, seed=0)
    rows = path.read_text().splitlines()
    rows[1] = json.dumps({**json.loads(rows[1]), "question": "how many? " * 400})
    path.write_text("\n".join(rows) + "\n")
    p = subprocess.run(
        [
            sys.executable,
            "train_grpo.py",
            "--model",
            str(tiny_dir),
            "--data",
            str(path),
            "--eval_data",
            "",
            "--out_dir",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [s for s in p.stderr.splitlines() if s.strip()]
    assert p.returncode == 2 and not any("Traceback" in s for s in lines), p.stderr[-2000:]
    assert lines[-1].startswith(f"error: {path}:2: fields 'question'/'image': the prompt is "), lines[-1]
    assert lines[-1].endswith("over --max_prompt_length 1024; raise it, lower --max_pixels, or drop the record")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
