"""--fsdp on CPU: the policy sharded by model.shard_policy (accelerate's own FSDP2 wrapping, as accelerate_fsdp.yaml
does on GPUs) over gloo, 2 processes. Sharded checkpoints (nanosrpo/checkpoint.py) resume exactly, each process
writes only its shard, the bf16 policy export loads with from_pretrained; the transformers engine samples from a full
copy synced from the shards (ranks decode different numbers of steps without hanging); train_sft.py --fsdp resumes
exactly end to end."""

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_fsdp_gather import _batch, _free_port, _loss

ROOT = Path(__file__).resolve().parent.parent


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
    # a rank that waits on a collective the other never joins fails after 2 minutes instead of hanging the suite
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))


def _build(accelerator, path):
    """A fresh sharded policy with its AdamW and schedule, as train_grpo.py --fsdp builds them."""
    from nanosrpo import model

    policy, processor = model.load_policy(path)
    model.freeze_vision(policy)
    policy = model.shard_policy(policy, accelerator)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    return policy, processor, optimizer, scheduler


def _step(accelerator, policy, optimizer, scheduler, i, rank):
    """One update on this rank's own batch; returns (loss, grad norm, a draw from the RNG) to compare runs by."""
    from nanosrpo import optim

    loss = _loss(policy, _batch(policy.config.get_text_config().vocab_size, rows=2, seed=100 * i + rank))
    loss.backward()
    norm = optim.clip_and_step(accelerator, policy, optimizer, scheduler, 0.5)
    return loss.item(), norm, torch.rand(()).item()


def _full(policy) -> dict:
    from nanosrpo import model

    return {k: v.clone() for k, v in model.trainer_weights(policy)}


# ----------------------------------------------------------------------------------------------------- checkpoints
def _resume_worker(rank, world, port, path, out):
    _init(rank, world, port)
    from accelerate import Accelerator

    from nanosrpo import checkpoint

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(rank)
    policy, processor, optimizer, scheduler = _build(accelerator, path)
    assert type(policy.model.language_model.layers[0].mlp.gate_proj.weight).__name__ == "DTensor"
    for i in range(2):
        _step(accelerator, policy, optimizer, scheduler, i, rank)
    at_save = _full(policy)
    checkpoint.save_checkpoint(
        accelerator,
        policy,
        processor,
        out,
        2,
        {"cursor": 5},
        optimizer=optimizer,
        scheduler=scheduler,
        export_dtype=torch.bfloat16,
    )
    want = [_step(accelerator, policy, optimizer, scheduler, i, rank) for i in (2, 3)]
    want_weights = _full(policy)

    torch.manual_seed(1234)  # a resumed process starts with other RNG states: the checkpoint must restore them
    policy, processor, optimizer, scheduler = _build(accelerator, path)
    state = checkpoint.load_checkpoint(
        accelerator, out / "checkpoint-2", model=policy, optimizer=optimizer, scheduler=scheduler
    )
    assert state == {"cursor": 5, "step": 2}
    got = [_step(accelerator, policy, optimizer, scheduler, i, rank) for i in (2, 3)]
    assert got == want, (got, want)  # exactly: losses, gradient norms, RNG draws
    for k, v in _full(policy).items():
        assert torch.equal(v, want_weights[k]), k
    if rank == 0:
        torch.save(at_save, out / "at_save.pt")
    (out / f"ok-{rank}").write_text("ok")
    torch.distributed.destroy_process_group()


def test_sharded_checkpoint_resumes_exactly_and_exports_bf16(tiny_dir, tmp_path):
    _spawn(_resume_worker, str(tiny_dir), tmp_path)
    assert (tmp_path / "ok-0").exists() and (tmp_path / "ok-1").exists()
    ckpt = tmp_path / "checkpoint-2"

    # Each process wrote its own shard, and no file holds the whole optimizer state: rank 0 wrote about half.
    import torch.distributed.checkpoint as dcp

    files = sorted(p.name for p in (ckpt / "state").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "rank0.pt", "rank1.pt"], files
    meta = dcp.FileSystemReader(ckpt / "state").read_metadata()
    key = "optim.state.model.language_model.layers.0.mlp.gate_proj.weight.exp_avg"
    holders = {info.relative_path for index, info in meta.storage_data.items() if index.fqn == key}
    assert holders == {"__0_0.distcp", "__1_0.distcp"}  # one Adam moment, split between the two files
    optim_bytes = sum(info.length for index, info in meta.storage_data.items() if index.fqn.startswith("optim.state."))
    for name in ("__0_0.distcp", "__1_0.distcp"):
        mine = sum(
            info.length
            for index, info in meta.storage_data.items()
            if index.fqn.startswith("optim.state.") and info.relative_path == name
        )
        assert 0.3 * optim_bytes < mine < 0.7 * optim_bytes, (name, mine, optim_bytes)

    # policy/: bf16 safetensors that from_pretrained loads as bf16 (dtype "auto" reads config.json, as vLLM does),
    # holding the step-2 weights rounded to bf16.
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(ckpt / "policy", dtype="auto")
    assert loaded.dtype == torch.bfloat16
    config = json.loads((ckpt / "policy" / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == config["vision_config"]["dtype"] == "bfloat16"
    at_save = torch.load(tmp_path / "at_save.pt")
    got = loaded.state_dict()
    for k, v in at_save.items():
        assert torch.equal(got[k], v.to(torch.bfloat16)), k
    assert json.loads((ckpt / "trainer_state.json").read_text()) == {"cursor": 5, "step": 2}


# ----------------------------------------------------------------------------------------------------- the engine
def _engine_worker(rank, world, port, path, out):
    _init(rank, world, port)
    from accelerate import Accelerator

    from nanosrpo import data, engine, model, synthetic

    accelerator = Accelerator(cpu=True)
    policy, processor, optimizer, scheduler = _build(accelerator, path)
    cfg = SimpleNamespace(engine="transformers", gen_batch_size=64, attn_implementation="sdpa")
    gen = engine.make(cfg, policy, processor, path)
    assert gen.model is not policy and not model.is_sharded(gen.model)

    # Ranks sample different prompts, different numbers of them, to different lengths: decoding on the sharded
    # trainer would need the same number of forwards on every rank.
    recs = data.load_rl_records(synthetic.write_rl_split(out / f"data{rank}", "rl", 1 + 2 * rank, seed=rank))
    prompts = [data.render_prompt(r, "Count.", processor) for r in recs]
    torch.manual_seed(rank)
    sampled = gen.generate(prompts, 2, 6 + 10 * rank, temperature=1.0)
    assert len(sampled) == len(prompts)

    # The copy computes what the unsharded policy computes (greedy: the same tokens).
    plain, _ = model.load_policy(path)
    want = engine.TransformersEngine(plain, processor).generate(prompts, 1, 8, greedy=True)
    assert gen.generate(prompts, 1, 8, greedy=True) == want

    # After an update of the shards, sync brings the copy to the trainer's new weights (trainable ones; frozen ones
    # are not sent and cannot have changed).
    _step(accelerator, policy, optimizer, scheduler, 0, rank)
    gen.sync(policy)
    full, mine = _full(policy), gen.model.state_dict()
    for k, v in full.items():
        assert torch.equal(mine[k], v), k
    assert not torch.equal(mine["lm_head.weight"], plain.state_dict()["lm_head.weight"])
    (out / f"ok-{rank}").write_text("ok")
    torch.distributed.destroy_process_group()


def test_engine_samples_from_a_synced_full_copy_of_the_shards(tiny_dir, tmp_path):
    _spawn(_engine_worker, str(tiny_dir), tmp_path)
    assert (tmp_path / "ok-0").exists() and (tmp_path / "ok-1").exists()


# ----------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_train_sft_fsdp_resume_continues_exactly(tiny_dir, tmp_path):
    """train_sft.py --fsdp true on 2 processes (torchrun, gloo): 4 steps with a checkpoint at 2; drop the final
    checkpoint, resume: steps 3-4 are redone identically, and the final policies are equal."""
    from nanosrpo import prompts, synthetic

    sft = synthetic.write_sft_split(tmp_path / "data", "sft", 12, seed=7, system=prompts.SRPO_SYSTEM, reflection=True)
    out = tmp_path / "run"
    args = [
        "--model",
        str(tiny_dir),
        "--data",
        str(sft),
        "--out_dir",
        str(out),
        "--max_steps",
        "4",
        "--batch_size",
        "2",
        "--grad_accum",
        "2",
        "--lr",
        "3e-3",
        "--save_every",
        "2",
        "--keep_checkpoints",
        "0",
        "--fsdp",
        "true",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(ROOT / "train_sft.py"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + args, check=True, cwd=ROOT, env=env, timeout=900)
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (out / "checkpoint-4" / "state").glob("__*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    shutil.move(out / "checkpoint-4", tmp_path / "uninterrupted-4")
    subprocess.run(cmd + args + ["--resume"], check=True, cwd=ROOT, env=env, timeout=900)
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in resumed] == [
        (r["loss"], r["grad_norm"], r["lr"]) for r in first
    ]
    from safetensors.torch import load_file

    want = load_file(tmp_path / "uninterrupted-4" / "policy" / "model.safetensors")
    got = load_file(out / "checkpoint-4" / "policy" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
