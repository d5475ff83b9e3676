"""Checkpoints that a run can continue from exactly, and that hand on a policy anyone can load.

Public API (shared by train_sft.py and train_grpo.py; keep it small and stable):
  save_checkpoint(accelerator, model, processor, out_dir, step, state, keep=2) -> Path of out_dir/checkpoint-{step}
  latest_checkpoint(out_dir) -> Path | None        the newest complete checkpoint (unfinished *.tmp saves are ignored)
  load_checkpoint(accelerator, ckpt_dir) -> dict   restores model, optimizer, scheduler, RNG; returns trainer_state

A checkpoint directory holds
  state/               accelerator.save_state: model, optimizer, scheduler, RNG states of every process (exact resume)
  policy/              save_pretrained of the model + processor: what model.load_policy, train_grpo.py and vLLM read
  trainer_state.json   the caller's `state` dict (step, data position, anything else) plus "step"

Saving is atomic: everything goes into checkpoint-{step}.tmp/ and only a finished save is renamed to checkpoint-{step},
so a run killed mid-save never leaves a checkpoint that looks complete. All processes must call save/load (FSDP gathers
the full weights across them); only the main process writes the policy and the json and renames.
"""

import json
import re
import shutil
from pathlib import Path

_NAME = re.compile(r"checkpoint-(\d+)$")


def save_checkpoint(accelerator, model, processor, out_dir, step: int, state: dict, keep: int = 2) -> Path:
    """Save checkpoint-{step} under out_dir and delete older checkpoints beyond the newest `keep` (keep<=0: keep all).

    model must have gone through accelerator.prepare (so does the optimizer and the scheduler: save_state stores them).
    """
    out_dir = Path(out_dir)
    final, tmp = out_dir / f"checkpoint-{step}", out_dir / f"checkpoint-{step}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous save of this step that was killed halfway
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    # get_state_dict gathers the full weights (a collective under FSDP/DeepSpeed), so every process calls it.
    state_dict = accelerator.get_state_dict(model)
    accelerator.unwrap_model(model).save_pretrained(
        tmp / "policy", state_dict=state_dict, is_main_process=main, safe_serialization=True
    )
    if main:
        processor.save_pretrained(tmp / "policy")
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


def load_checkpoint(accelerator, ckpt_dir) -> dict:
    """Restore what save_checkpoint saved into the prepared model/optimizer/scheduler and the RNGs; return the
    trainer_state dict (with "step"). Call after accelerator.prepare, on every process."""
    ckpt_dir = Path(ckpt_dir)
    accelerator.load_state(str(ckpt_dir / "state"))
    return json.loads((ckpt_dir / "trainer_state.json").read_text())
