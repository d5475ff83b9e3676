"""One GRPO step's rollouts: draw prompts, sample a group of completions for each, score them, filter the groups by
accuracy (dynamic sampling); then, given the group advantages, the samples the update trains on.

The shapes that flow from here into the update, built here and nowhere else:
  group  = {"rec": an RL record (data.load_rl_records), "prompt": its engine prompt (data.render_prompt),
            "completions": group_size engine completions {"ids", "text", "logprobs"},
            "scores": per completion, the reward breakdown (rewards.KEYS) + rewards.outcome + {"tokens": length}}
  sample = {"input_ids": prompt ids + completion ids, "loss_mask": 0 on the prompt, 1 on the completion (0 on all of a
            top-up group's: see collect), "advantage": its group advantage (0 for a top-up group),
            "images": the prompt's images, "engine_logprobs": the engine's log-prob of each token (0 on the prompt),
            "group": its group's number, "prompt_len": the prompt's length (data.shared_batch lays a group out
            with one copy of its prompt)}
Samples are ordered group by group, so sample i belongs to group i // group_size. data.micro_batches carries a
sample's advantage and log-prob rows into its micro-batch (data.carried).
"""

import torch

from nanosrpo import data, grpo, rewards
from nanosrpo.data import DataError


def collect(engine, records: list[dict], cursor: int, cfg, reward, system: str, processor, accelerator) -> dict:
    """Sample cfg.rollout_batch_size / world prompts' groups on this process, starting at prompt position `cursor`.

    reward(text, record) -> the reward breakdown of one completion (the script's srpo_reward call).
    Dynamic sampling (cfg.filter_accuracy): a group is kept only if grpo.keep_group says so, and more prompts are drawn
    until every process has a full batch, at most cfg.max_draws times; a process still short tops up with filtered-out
    groups (every process must run the same number of forward and backward passes), and reports how many as "short"
    so the caller can warn. A top-up group is there only to keep the processes in step: its advantages are zero and
    its loss_mask is 0 everywhere (training_samples), so it adds nothing to the loss (policy gradient or KL) nor to
    the loss's denominator (loss_count): the update is the kept groups' alone, as if the batch had been full of them.
    Returns {"groups", "rewards" [N] (each completion's total reward, group by group), "kept" (the groups that passed,
    first in "groups"), "cursor" (the next prompt position), "filtered", "short"}.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    quota = cfg.rollout_batch_size // world
    kept, dropped = [], []
    for _ in range(cfg.max_draws):
        batch = [records[data.prompt_index((cursor + i) * world + rank, len(records), cfg.seed)] for i in range(quota)]
        cursor += quota
        prompts = [render(rec, system, processor, cfg.max_prompt_length) for rec in batch]
        outs = engine.generate(
            prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p, logprobs=cfg.tis_cap > 0
        )
        for rec, prompt, completions in zip(batch, prompts, outs):
            scores = [
                {
                    **reward(c["text"], rec),
                    **rewards.outcome(c["text"], rec["answer"], rec["choices"]),
                    "tokens": len(c["ids"]),
                }
                for c in completions
            ]
            group = {"rec": rec, "prompt": prompt, "completions": completions, "scores": scores}
            (kept if not cfg.filter_accuracy or _keep(scores, cfg) else dropped).append(group)
        full = torch.tensor([int(len(kept) >= quota)], device=accelerator.device)
        if not cfg.filter_accuracy or accelerator.gather(full).all():
            break
    groups = (kept + dropped)[:quota]
    return {
        "groups": groups,
        "rewards": torch.tensor([s["total"] for g in groups for s in g["scores"]]),
        "kept": len(kept),
        "cursor": cursor,
        "filtered": len(dropped),
        "short": max(0, quota - len(kept)),
    }


def training_samples(batch: dict, advantages: torch.Tensor) -> list[dict]:
    """collect's groups as the update's samples (the module docstring's `sample`), one per completion, group by group,
    each with its advantage. A top-up group (collect) is there only to keep the processes in step: its loss_mask is 0
    and its advantage 0, so it teaches nothing."""
    samples = []
    for k, g in enumerate(batch["groups"]):
        learn = int(k < batch["kept"])  # 0: a top-up group, no token of it is learned
        prompt = g["prompt"]["ids"]
        for c in g["completions"]:
            samples.append(
                {
                    "input_ids": prompt + c["ids"],
                    "loss_mask": [0] * len(prompt) + [learn] * len(c["ids"]),
                    "advantage": advantages[len(samples)].item() if learn else 0.0,
                    "images": g["prompt"]["images"],
                    "group": k,
                    "prompt_len": len(prompt),
                    "engine_logprobs": torch.tensor([0.0] * len(prompt) + (c["logprobs"] or [0.0] * len(c["ids"]))),
                }
            )
    return samples


def accuracy_score(score: dict, cfg) -> float:
    """One completion's score for the accuracy filter, in [0, 1]: the reward's correctness terms, accuracy +
    effectiveness, as a fraction of their largest sum (each sum is >= 0, so its range starts at 0).

    The paper's reward splits correctness into R_acc (the first answer: 0 / 0.5) and I_eff (what the reflection did
    to it: -0.25 ... +0.5); the released code merged the two into one "accuracy" number and filtered on that. Here the
    sum plays that role: right->right 1, wrong->right 2/3, right->wrong 1/3, wrong->wrong and malformed 0, a one-round
    answer 2/3 right and 0 wrong. So a group whose first answers are all wrong (or all right) but whose reflections
    fix (or break) some of them keeps a mean inside the bounds: these are the groups that teach reflection.
    Without I_eff (--use_effectiveness false) the reward has no term on the second answer, and the score is the first
    answer's 0 / 1. Released code: its merged 0 / 0.25 / 0.75 / 1. GRPO: 0 / 1; two-step: the final answer's 0 / 1.
    """
    top = rewards.ACCURACY_MAX[cfg.reward_variant]
    if cfg.reward_variant == "paper" and cfg.use_effectiveness:  # the largest R_acc + I_eff: right->right, 0.75
        top = max(rewards.R_ACCURACY * right + eff for (right, _), eff in rewards.I_EFF.items())
    return (score["accuracy"] + score["effectiveness"]) / top


def _keep(scores: list[dict], cfg) -> bool:
    """The accuracy filter (grpo.keep_group) on the completions' accuracy scores."""
    return grpo.keep_group(
        [s["total"] for s in scores], [accuracy_score(s, cfg) for s in scores], cfg.filter_low, cfg.filter_high
    )


def loss_count(samples: list[dict], indices: list[int], aggregation: str) -> int:
    """These samples' share of the loss's denominator over an update (grpo.policy_loss's `normalizer`): their loss
    tokens (token-mean) or their sequences with a loss token (the seq-mean variants). A top-up group has none."""
    if aggregation == "token-mean":
        return sum(sum(samples[i]["loss_mask"]) for i in indices)
    return sum(any(samples[i]["loss_mask"]) for i in indices)


def render(rec: dict, system: str, processor, max_prompt_length: int) -> dict:
    """data.render_prompt, refusing a prompt longer than max_prompt_length tokens (images included; 0: no cap).

    train_grpo.py refuses such records when it loads them (data.load_rl_records counts the same ids from the images'
    sizes), before the first step; this check stays for callers that pass records of their own."""
    prompt = data.render_prompt(rec, system, processor)
    if max_prompt_length and len(prompt["ids"]) > max_prompt_length:
        raise DataError(
            f"record {rec['id']!r}: the prompt is {len(prompt['ids'])} tokens (images included), over "
            f"--max_prompt_length {max_prompt_length}; raise it, lower --max_pixels, or drop the record"
        )
    return prompt
