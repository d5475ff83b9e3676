"""One GRPO step's rollouts: draw prompts, sample a group of completions for each, score them, filter the groups by
accuracy (dynamic sampling), and turn the batch into group advantages and training samples. What `collect` returns is
everything the policy update needs.

The shapes that flow from here into the update, built here and nowhere else:
  group  = {"rec": an RL record (data.load_rl_records), "prompt": its engine prompt (data.render_prompt),
            "completions": group_size engine completions {"ids", "text", "logprobs"},
            "scores": per completion, the reward breakdown (rewards.KEYS) + rewards.outcome + {"tokens": length}}
  sample = {"input_ids": prompt ids + completion ids, "loss_mask": 0 on the prompt, 1 on the completion,
            "images": the prompt's images, "engine_lp": the engine's log-prob of each token (0 on the prompt),
            "group": its group's number, "prompt_len": the prompt's length (data.shared_batch lays a group out
            with one copy of its prompt)}
Samples are ordered group by group, so sample i belongs to group i // group_size and has advantage advantages[i].
"""

import torch

from nanosrpo import data, grpo, rewards
from nanosrpo.data import DataError


def collect(engine, records: list[dict], cursor: int, cfg, reward, system: str, processor, accelerator) -> dict:
    """Sample cfg.rollout_batch_size / world prompts' groups on this process, starting at prompt position `cursor`.

    reward(text, record) -> the reward breakdown of one completion (the script's srpo_reward call).
    Dynamic sampling (cfg.filter_accuracy): a group is kept only if grpo.keep_group says so, and more prompts are drawn
    until every process has a full batch, at most cfg.max_draws times; a process still short tops up with filtered-out
    groups whose advantages are zeroed (every process must run the same number of backward passes), and reports how
    many as "short" so the caller can warn.
    Returns {"groups", "samples", "advantages" [N], "cursor" (the next prompt position), "filtered", "short"}.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    quota = cfg.rollout_batch_size // world
    kept, dropped = [], []
    for _ in range(cfg.max_draws):
        batch = [records[data.prompt_index((cursor + i) * world + rank, len(records), cfg.seed)] for i in range(quota)]
        cursor += quota
        prompts = [render(rec, system, processor, cfg.max_prompt_length) for rec in batch]
        outs = engine.generate(prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                               logprobs=cfg.tis_cap > 0)
        for rec, prompt, completions in zip(batch, prompts, outs):
            scores = [{**reward(c["text"], rec), **rewards.outcome(c["text"], rec["answer"], rec["choices"]),
                       "tokens": len(c["ids"])} for c in completions]
            group = {"rec": rec, "prompt": prompt, "completions": completions, "scores": scores}
            (kept if not cfg.filter_accuracy or _keep(scores, cfg) else dropped).append(group)
        full = torch.tensor([int(len(kept) >= quota)], device=accelerator.device)
        if not cfg.filter_accuracy or accelerator.gather(full).all():
            break
    groups = (kept + dropped)[:quota]
    advantages = grpo.group_advantages(torch.tensor([s["total"] for g in groups for s in g["scores"]]),
                                       cfg.group_size, normalize_std=cfg.normalize_std)
    advantages[len(kept) * cfg.group_size :] = 0.0  # filtered groups that only top up a short batch teach nothing
    samples = [
        {"input_ids": g["prompt"]["ids"] + c["ids"], "loss_mask": [0] * len(g["prompt"]["ids"]) + [1] * len(c["ids"]),
         "images": g["prompt"]["images"], "group": k, "prompt_len": len(g["prompt"]["ids"]),
         "engine_lp": torch.tensor([0.0] * len(g["prompt"]["ids"]) + (c["logprobs"] or [0.0] * len(c["ids"])))}
        for k, g in enumerate(groups) for c in g["completions"]
    ]
    return {"groups": groups, "samples": samples, "advantages": advantages, "cursor": cursor,
            "filtered": len(dropped), "short": max(0, quota - len(kept))}


def _keep(scores: list[dict], cfg) -> bool:
    """The accuracy filter on the accuracy reward of the variant in use, as a fraction of its largest value (paper:
    the first answer's 0 / 0.5; released code: its merged 0 / 0.25 / 0.75 / 1; GRPO: 0 / 1)."""
    top = rewards.ACCURACY_MAX[cfg.reward_variant]
    return grpo.keep_group([s["total"] for s in scores], [s["accuracy"] / top for s in scores], cfg.filter_low, cfg.filter_high)


def render(rec: dict, system: str, processor, max_prompt_length: int) -> dict:
    """data.render_prompt, refusing a prompt longer than max_prompt_length tokens (images included; 0: no cap).

    train_grpo.py refuses such records when it loads them (data.load_rl_records counts the same ids from the images'
    sizes), before the first step; this check stays for callers that pass records of their own."""
    prompt = data.render_prompt(rec, system, processor)
    if max_prompt_length and len(prompt["ids"]) > max_prompt_length:
        raise DataError(f"record {rec['id']!r}: the prompt is {len(prompt['ids'])} tokens (images included), over "
                        f"--max_prompt_length {max_prompt_length}; raise it, lower --max_pixels, or drop the record")
    return prompt
