"""The trainer's collectives on a model sharded with torch's own FSDP2 (fully_shard) over gloo, 2 processes, on CPU:
the full-state gather used for engine sync and saving, gradient clipping, gradient sync while accumulating, and the
sharded KL reference. Each check compares with the same computation on the unsharded model."""

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, *args):
    mp.start_processes(worker, args=(2, _free_port(), *args), nprocs=2, join=True, start_method="spawn")


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


def _shard(policy):
    from torch.distributed.fsdp import fully_shard

    for layer in policy.model.language_model.layers:
        fully_shard(layer)
    fully_shard(policy)


def _batch(vocab: int, rows: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab - 10, (rows, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ----------------------------------------------------------------------------------------------------- gather
def _gather_worker(rank, world, port, path, result_dir):
    _init(rank, world, port)
    from nanosrpo import model

    policy, _ = model.load_policy(path)
    model.freeze_vision(policy)
    reference = {k: v.clone() for k, v in policy.state_dict().items()}
    _shard(policy)
    # sharded for real: a layer's weight is a DTensor holding only a slice on this rank
    w = policy.model.language_model.layers[0].mlp.gate_proj.weight
    assert type(w).__name__ == "DTensor" and w.to_local().shape[0] < w.shape[0]
    full = dict(model.trainer_weights(policy))
    missing = set(reference) - set(full)
    assert not missing, missing
    for k, v in reference.items():
        assert type(full[k]) is torch.Tensor, (k, type(full[k]))
        torch.testing.assert_close(full[k].cpu(), v, rtol=0, atol=0, msg=k)
    # the engine's dtype, cast shard by shard before the gather; frozen weights (the vision tower) left out
    sent = dict(model.trainer_weights(policy, torch.bfloat16, skip_frozen=True))
    assert sent and not any(".visual." in f".{k}" for k in sent)
    assert set(sent) == {k for k in reference if ".visual." not in f".{k}" and "rotary_emb" not in k}
    for k, v in sent.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, reference[k].to(torch.bfloat16)), k
    (result_dir / f"ok-{rank}").write_text("ok")
    torch.distributed.barrier()  # both ranks done before either tears gloo down (an exit race aborted one, rarely)
    torch.distributed.destroy_process_group()


def test_fully_shard_full_state_dict_on_gloo(tiny_dir, tmp_path):
    _spawn(_gather_worker, str(tiny_dir), tmp_path)
    assert (tmp_path / "ok-0").exists() and (tmp_path / "ok-1").exists()


# ----------------------------------------------------------------------------------------------------- training
def _loss(policy, batch):
    from nanosrpo import forward

    return -forward.sequence_logprobs(policy, batch).mean()


def _train_worker(rank, world, port, path, result_dir):
    _init(rank, world, port)
    from accelerate import Accelerator

    from nanosrpo import forward, model, optim

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    policy, _ = model.load_policy(path)
    batch = _batch(policy.config.get_text_config().vocab_size)
    lr = 0.1

    # the unsharded reference: the whole batch, its gradient norm, a clipped SGD step
    unsharded, _ = model.load_policy(path)
    _loss(unsharded, batch).backward()
    want_norm = float(torch.nn.utils.clip_grad_norm_(unsharded.parameters(), float("inf")))
    max_norm = want_norm / 4  # so that clipping changes the update
    clipped = {
        n: (p - lr * p.grad * max_norm / want_norm).detach() if p.grad is not None else p.detach()
        for n, p in unsharded.named_parameters()
    }

    stale = list(policy.parameters())  # what train_grpo.py clipped before: parameters taken before sharding
    _shard(policy)
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    # gradient sync while accumulating: FSDP must reduce-scatter every micro-batch. torch's no-sync switch (what
    # accelerate's no_sync sets for FSDP2) keeps the gradients unsharded instead: the sharded .grad stays empty.
    mine = {k: v[rank * 2 : rank * 2 + 2] for k, v in batch.items()}  # this rank's half of the batch
    probe, _ = model.load_policy(path)
    _shard(probe)
    probe.set_requires_gradient_sync(False)
    _loss(probe, mine).backward()
    assert all(p.grad is None for p in probe.parameters())
    for j, half in enumerate(([0], [1])):
        with optim.grad_sync(accelerator, policy, last=j == 1):
            (_loss(policy, {k: v[half] for k, v in mine.items()}) / 2).backward()  # mean over the two micro-batches
        if j == 0:
            w = policy.model.language_model.layers[0].mlp.gate_proj.weight
            assert w.grad is not None and w.grad.to_local().shape[0] < w.shape[0]  # reduce-scattered: sharded

    assert float(accelerator.clip_grad_norm_(stale, max_norm)) == 0.0  # the defect: stale parameters have no grads
    norm = optim.clip_and_step(accelerator, policy, optimizer, scheduler, max_norm)
    assert abs(norm - want_norm) < 1e-4 * want_norm, (norm, want_norm)
    got = dict(model.trainer_weights(policy))
    for n, v in clipped.items():
        torch.testing.assert_close(got[n], v, atol=1e-5, rtol=1e-4, msg=n)

    # the KL reference, sharded like the policy: same log-probs as unsharded, a slice of each layer per rank
    ref, _ = model.load_policy(path)
    with torch.no_grad():
        want_lp = forward.sequence_logprobs(ref, batch)
    model.shard_like_fsdp(ref)
    w = ref.model.language_model.layers[0].mlp.gate_proj.weight
    assert type(w).__name__ == "DTensor" and w.to_local().shape[0] < w.shape[0]
    with torch.no_grad():
        torch.testing.assert_close(forward.sequence_logprobs(ref, batch), want_lp, atol=1e-5, rtol=1e-5)
    (result_dir / f"ok-{rank}").write_text("ok")
    torch.distributed.barrier()  # both ranks done before either tears gloo down (an exit race aborted one, rarely)
    torch.distributed.destroy_process_group()


def test_clip_accumulate_and_reference_under_fully_shard(tiny_dir, tmp_path):
    _spawn(_train_worker, str(tiny_dir), tmp_path)
    assert (tmp_path / "ok-0").exists() and (tmp_path / "ok-1").exists()


# ----------------------------------------------------------------------------------------------------- shared prompts
def _shared_worker(rank, world, port, path, result_dir):
    """The 7B preset's training forward on this CPU: FSDP2, gradient checkpointing, the shared-prompt layout. Each rank
    trains on one group; the averaged sharded gradient must equal the unsharded padded batch's over both groups."""
    _init(rank, world, port)
    from nanosrpo import data, forward, model
    from tests.test_shared_prompt import _groups

    policy, processor = model.load_policy(path)
    model.freeze_vision(policy)
    samples = _groups(processor, text_only=False)
    n_tokens = sum(sum(s["loss_mask"]) for s in samples)

    def loss(m, batch):  # both groups' tokens weigh the same: a token mean over the whole update
        return -(forward.sequence_logprobs(m, batch) * batch["loss_mask"]).sum() / n_tokens

    unsharded, _ = model.load_policy(path)
    model.freeze_vision(unsharded)
    unsharded.train()
    loss(unsharded, data.collate(processor, samples, share_images=True)).backward()
    want = {n: p.grad for n, p in unsharded.named_parameters() if p.grad is not None}

    policy.train()
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _shard(policy)
    mine = [s for s in samples if s["group"] == rank]
    (loss(policy, data.shared_batch(processor, mine)) * world).backward()  # FSDP averages over ranks: * world sums
    got = {n: p.grad.full_tensor() for n, p in policy.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and any("layers.0." in n for n in got)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, atol=1e-5 * float(g.abs().max()) + 1e-7, rtol=1e-4, msg=n)
    (result_dir / f"ok-{rank}").write_text("ok")
    torch.distributed.barrier()  # both ranks done before either tears gloo down (an exit race aborted one, rarely)
    torch.distributed.destroy_process_group()


def test_shared_prompt_gradients_under_fully_shard_with_checkpointing(tiny_dir, tmp_path):
    _spawn(_shared_worker, str(tiny_dir), tmp_path)
    assert (tmp_path / "ok-0").exists() and (tmp_path / "ok-1").exists()
