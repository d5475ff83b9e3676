"""The optimizer side of both training scripts: gradient sync while accumulating micro-batches, and clip-and-step.

Small on purpose, but each function fixes a way training silently goes wrong at scale (see the docstrings), so both
scripts call these instead of writing the lines inline.
"""

from contextlib import nullcontext


def grad_sync(accelerator, model, last: bool):
    """The context for one micro-batch's forward and backward inside an accumulated update.

    DDP: gradients are all-reduced once per update, on its last micro-batch (accelerator.no_sync before it): the
    gradients are full-size on every process anyway, so waiting costs no memory and saves communication.
    FSDP: reduce-scatter after every micro-batch, never no_sync. Under no_sync FSDP keeps every process's *unsharded*
    gradients until the last micro-batch (fp32, the whole model: ~28 GB per GPU at 7B); reduce-scattering each one keeps
    them sharded (1/world of that), for one collective per micro-batch.
    """
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FSDPModule

    sharded = accelerator.distributed_type == DistributedType.FSDP or isinstance(model, FSDPModule)
    return nullcontext() if last or sharded else accelerator.no_sync(model)


def clip_and_step(accelerator, model, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip the global gradient norm, step the optimizer and the schedule, zero the gradients; returns the norm before
    clipping (all processes, all shards).

    Clips `model.parameters()` of the *prepared* model: FSDP replaces the parameters when accelerator.prepare (or
    model.shard_policy, --fsdp) shards the model, so a list taken before holds the old tensors, which never get a
    gradient (clipping them does nothing and reports a norm of 0).
    """
    from torch.distributed.tensor import DTensor

    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    return float(norm)
