"""Checkpoints that a run can continue from exactly, and that hand on a policy anyone can load.

Public API (shared by train_sft.py and train_grpo.py; keep it small and stable):
  save_checkpoint(accelerator, model, processor, out_dir, step, state, keep=2, *, optimizer, scheduler,
                  export_dtype=None) -> Path of out_dir/checkpoint-{step}
  latest_checkpoint(out_dir) -> Path | None        the newest complete checkpoint (unfinished *.tmp saves are ignored)
  load_checkpoint(accelerator, ckpt_dir, *, model, optimizer, scheduler) -> dict
                                                   restores model, optimizer, scheduler, RNG; returns trainer_state

A checkpoint directory holds
  state/               the training state, sharded: torch.distributed.checkpoint (DCP) of the model's and the
                       optimizer's state dicts, every process writing its own file (__{rank}_0.distcp) with what it
                       holds, plus .metadata; and rank{r}.pt per process: the scheduler and that process's RNG states.
                       Exact resume reads it back into the same layout (same number of processes, same sharding).
  policy/              save_pretrained of the weights (safetensors, in export_dtype) + processor: what
                       model.load_policy, train_grpo.py --model and vLLM read. For handing on, never for resuming.
  trainer_state.json   the caller's `state` dict (step, data position, anything else) plus "step"

Why DCP for every run, sharded or not: one code path, exact (the tensors as they are, fp32 master weights and Adam
moments included), and it never gathers anything. Under FSDP2 each process writes only its shard (at 7B on 8 GPUs
3.9 GiB of fp32 weights + 7.1 GiB of AdamW state per rank, where accelerate's FULL_STATE_DICT save_state put all
87.6 GiB through rank 0; bench/memory_plan.py counts it); under DDP, whose tensors are replicated, DCP has each
tensor written once, by one process; a single process (no process group) writes one file.

The policy export gathers one tensor at a time (model.trainer_weights: cast to export_dtype on each shard, then
all-gathered) and only the main process keeps the result, on the CPU: one copy of the weights in export_dtype (bf16:
15.4 GiB at 7B), never the optimizer. export_dtype None keeps the training dtype (the tiny CPU runs: fp32, so a policy
handed to the next stage is bit-for-bit the trained one).

Saving is atomic: everything goes into checkpoint-{step}.tmp/ and only a finished save is renamed to checkpoint-{step},
so a run killed mid-save never leaves a checkpoint that looks complete. All processes must call save/load (they are
collectives); only the main process writes the policy and the json and renames.
"""

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"checkpoint-(\d+)$")
# DCP warns at every save and load of a single-process run (no process group) that it assumes a single process: it is
# right, and the two-line warning would cut into the run's progress bar at every checkpoint
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")


def save_checkpoint(
    accelerator,
    model,
    processor,
    out_dir,
    step: int,
    state: dict,
    keep: int = 2,
    *,
    optimizer,
    scheduler,
    export_dtype: torch.dtype | None = None,
) -> Path:
    """Save checkpoint-{step} under out_dir and delete older checkpoints beyond the newest `keep` (keep<=0: keep all).

    model: the trained module (DDP-wrapped, FSDP2-sharded or plain); optimizer, scheduler: its optimizer and schedule
    (as returned by accelerator.prepare or not).
    """
    import torch.distributed.checkpoint as dcp

    out_dir = Path(out_dir)
    final, tmp = out_dir / f"checkpoint-{step}", out_dir / f"checkpoint-{step}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous save of this step that was killed halfway
        (tmp / "state").mkdir(parents=True)
    accelerator.wait_for_everyone()
    dcp.save(_training_state(model, optimizer), checkpoint_id=tmp / "state")
    extra = {"scheduler": scheduler.state_dict(), "rng": _rng_state()}  # small; the RNGs differ per process
    torch.save(extra, tmp / "state" / f"rank{accelerator.process_index}.pt")
    export_policy(accelerator, model, processor, tmp / "policy", export_dtype)
    if main:
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again (e.g. resumed right at the end)
        tmp.rename(final)
        if keep > 0:
            for old in _checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def export_policy(accelerator, model, processor, path, dtype: torch.dtype | None = None) -> None:
    """save_pretrained of model's full weights in `dtype` (None: as trained) + processor into `path`, on the main
    process. Collective under FSDP2 (every process must call it); rank 0 holds one copy of the weights, on the CPU."""
    from nanosrpo.forward import unwrap
    from nanosrpo.model import is_sharded, trainer_weights

    module = unwrap(model)
    main = accelerator.is_main_process
    full = {}
    if main or is_sharded(module):  # a replicated model needs no gather: the main process has it all
        for name, t in trainer_weights(module, dtype):  # one tensor at a time, all processes
            if main:
                full[name] = t.detach().cpu()
    if not main:
        return
    module.save_pretrained(path, state_dict=full, is_main_process=True, safe_serialization=True)
    if dtype is not None:  # save_pretrained wrote the trainer's dtype; from_pretrained and vLLM's "auto" read it
        config = json.loads((Path(path) / "config.json").read_text())
        for c in [config] + [v for v in config.values() if isinstance(v, dict) and "dtype" in v]:  # + text_config, ...
            c["dtype"] = str(dtype).removeprefix("torch.")
        (Path(path) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(path)


def export_dtype(name: str, accelerator) -> torch.dtype | None:
    """--export_dtype as a dtype for export_policy. auto: bf16 when the run trains under bf16 mixed precision (the
    GPU runs; the weights are bf16 wherever they compute), else None: as trained (the tiny CPU runs' fp32, so that
    the next stage starts from exactly the trained weights)."""
    if name == "auto":
        return torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
    return getattr(torch, name)


def _checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints under out_dir, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint-{step} under out_dir, or None. checkpoint-{step}.tmp dirs are never returned."""
    found = _checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(accelerator, ckpt_dir, *, model, optimizer, scheduler) -> dict:
    """Restore what save_checkpoint saved into model/optimizer/scheduler (built and sharded as when saving) and this
    process's RNGs; return the trainer_state dict (with "step"). Every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    ckpt_dir = Path(ckpt_dir)
    state = _training_state(model, optimizer)  # this process's layout; dcp.load fills it in place from the files
    # A trainable parameter that never had a gradient has no Adam state in the checkpoint (nor had it in the run): it
    # is left out of what is loaded, and so stays without state, as in the uninterrupted run (strict=False below).
    saved = dcp.FileSystemReader(ckpt_dir / "state").read_metadata().state_dict_metadata
    state["optim"]["state"] = {
        fqn: s for fqn, s in state["optim"]["state"].items() if all(f"optim.state.{fqn}.{k}" in saved for k in s)
    }
    dcp.load(state, checkpoint_id=ckpt_dir / "state")
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, _inner(optimizer), state["optim"], options=StateDictOptions(strict=False))
    extra = torch.load(ckpt_dir / "state" / f"rank{accelerator.process_index}.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    return json.loads((ckpt_dir / "trainer_state.json").read_text())


def _inner(optimizer):
    """The torch optimizer under accelerate's AcceleratedOptimizer (DCP maps its param ids to parameter names)."""
    return getattr(optimizer, "optimizer", optimizer)


def _training_state(model, optimizer) -> dict:
    """{"model", "optim"}: state dicts keyed by parameter name, holding what this process owns (DTensor shards under
    FSDP2, whole tensors otherwise). An optimizer that has not stepped yet gets zero-filled moments (DCP's own
    initialisation) so that there is a layout to load into."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _inner(optimizer))
    return {"model": model_sd, "optim": optim_sd}


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
