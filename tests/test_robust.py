"""Robustness at scale: processes that see different data must never wait on each other forever, a bad record is
found before the first step, and SFT shares GRPO's chunked log-prob path.

  - an image-free micro-batch on one process of a sharded (FSDP2) multimodal policy while another has images
  - every record validated at load time (prompt length with image tokens, image count, readable images), cheaply
  - one process's DataError ends every process within seconds, with its one line
  - the SFT loss from grpo.sequence_logprobs, equal to the old full-vocabulary cross-entropy
"""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from nanosrpo import data, grpo, model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_with_deadline(worker, args: tuple, deadline_s: float, nprocs: int = 2) -> None:
    """mp.spawn of `worker(rank, nprocs, port, *args)`, failing (not hanging) when the processes are not done by the
    deadline: a collective that one process never enters waits for gloo's 30-minute timeout otherwise."""
    ctx = mp.start_processes(worker, args=(nprocs, _free_port(), *args), nprocs=nprocs, join=False,
                             start_method="spawn")
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=1):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {nprocs} processes did not finish within {deadline_s:.0f} s (a collective hung)")


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------- FSDP2 images
LAYOUTS = {"padded": lambda proc, s: data.collate(proc, s, share_images=True),
           "shared": lambda proc, s: data.shared_batch(proc, s),
           "packed": lambda proc, s: data.packed_batch(proc, s, share_images=True)}


def _mixed_worker(rank, world, port, path, result_dir):
    """Rank 0 trains on micro-batches with images, rank 1 on text-only ones, through a policy sharded as accelerate's
    FSDP config shards it (each decoder layer and vision block a unit), vision tower trainable. Every layout; the
    averaged sharded gradient must equal the unsharded one over both ranks' micro-batches."""
    _init(rank, world, port)
    from tests.test_shared_prompt import _groups

    policy, processor = model.load_policy(path)
    per_rank = [_groups(processor, text_only=False), _groups(processor, text_only=True)]
    n_tokens = sum(sum(s["loss_mask"]) for samples in per_rank for s in samples)

    def loss(m, batch):
        return -(grpo.sequence_logprobs(m, batch) * batch["loss_mask"]).sum() / n_tokens

    unsharded, _ = model.load_policy(path)
    for samples in per_rank:
        loss(unsharded, data.collate(processor, samples, share_images=True)).backward()
    want = {n: p.grad for n, p in unsharded.named_parameters() if p.grad is not None}
    assert any(".visual.blocks.0." in f".{n}" for n in want)

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


def test_fsdp_ranks_with_and_without_images_do_not_hang(tiny_dir, tmp_path):
    """Without the image-free vision pass, rank 1 skips the vision blocks' all-gathers that rank 0 issues, and the
    pair hangs (or gloo pairs mismatched collectives): the deadline turns that into a failure."""
    spawn_with_deadline(_mixed_worker, (str(tiny_dir), tmp_path), deadline_s=240)
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
        lp = grpo.sequence_logprobs(policy, batch)
        (lp * batch["loss_mask"]).sum().backward()
        return lp.detach(), {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}

    lp0, g0 = run()
    calls = []
    monkeypatch.setattr(grpo, "_world_size", lambda: 2)
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
