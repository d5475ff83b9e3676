"""Greedy evaluation of a policy on RL-layout records: final-answer and first-answer accuracy, format rate.

Used by train_grpo.py's periodic eval and by evaluate.py. Records are split across processes and the counts summed.
"""

import torch

from nanosrpo import data, rewards


@torch.no_grad()
def greedy_eval(engine, records: list[dict], system: str, processor, max_new_tokens: int) -> dict:
    """Greedy-decode every record once; {} when there is nothing to evaluate."""
    if not records:
        return {}
    from accelerate import PartialState

    state = PartialState()
    mine = records[state.process_index :: state.num_processes]
    outs = engine.generate([data.render_prompt(r, system, processor) for r in mine], 1, max_new_tokens, greedy=True)
    rows = [rewards.outcome(o[0]["text"], r["answer"], r["choices"]) for r, o in zip(mine, outs)]
    counts = torch.tensor([[o["final_correct"], o["first_correct"], float(o["rounds"] > 0), 1.0] for o in rows] or [[0.0] * 4]).sum(0)
    if state.num_processes > 1:
        from accelerate.utils import reduce

        counts = reduce(counts.to(state.device), reduction="sum").cpu()
    final, first, fmt, n = counts.tolist()
    return {"eval_accuracy": final / n, "eval_first_accuracy": first / n, "eval_format_rate": fmt / n}
