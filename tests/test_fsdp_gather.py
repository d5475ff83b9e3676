"""The full-state-dict gather used for engine sync and saving, on a model sharded with torch's own FSDP2 (fully_shard)
over gloo: every rank gets every tensor whole, equal to the unsharded model's."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, path, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard

    from nanosrpo import engine, model

    policy, _ = model.load_policy(path)
    reference = {k: v.clone() for k, v in policy.state_dict().items()}
    for layer in policy.model.language_model.layers:
        fully_shard(layer)
    fully_shard(policy)
    # sharded for real: a layer's weight is a DTensor holding only a slice on this rank
    w = policy.model.language_model.layers[0].mlp.gate_proj.weight
    assert type(w).__name__ == "DTensor" and w.to_local().shape[0] < w.shape[0]
    full = engine.full_state_dict(policy)
    missing = set(reference) - set(full)
    assert not missing, missing
    for k, v in reference.items():
        assert type(full[k]) is torch.Tensor, (k, type(full[k]))
        torch.testing.assert_close(full[k].cpu(), v, rtol=0, atol=0, msg=k)
    (result_dir / f"ok-{rank}").write_text("ok")
    torch.distributed.destroy_process_group()


def test_fully_shard_full_state_dict_on_gloo(tiny_dir, tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tiny_dir), tmp_path), nprocs=2, join=True, start_method="spawn")
    assert (tmp_path / "ok-0").exists() and (tmp_path / "ok-1").exists()
