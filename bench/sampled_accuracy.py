"""Sampled (temperature 1.0) accuracy and format of a policy on RL-layout records: the SFT figures of docs/train_sft.md.

    python bench/sampled_accuracy.py out/tiny/1m/base    out/tiny/1m/data/eval.jsonl
    python bench/sampled_accuracy.py out/tiny/1m/reflect out/tiny/1m/data/eval.jsonl --reflect

Prints the fractions of one-round, two-round and malformed responses, the first-/second-answer accuracy (both as
fractions of all responses), and the wrong->right / right->wrong rates of two-round responses (also fractions of all
responses: a two-round response whose first answer was wrong and second right, and the reverse).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanosrpo import data, engine, model, prompts, rewards  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("policy")
    ap.add_argument("records")
    ap.add_argument("--reflect", action="store_true", help="SRPO (two-round) system prompt instead of the GRPO one")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max_new_tokens", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    policy, processor = model.load_policy(a.policy)
    records = data.load_rl_records(a.records)[: a.n]
    system = prompts.system_prompt(a.reflect)
    t0 = time.time()
    outs = engine.TransformersEngine(policy, processor).generate(
        [data.render_prompt(r, system, processor) for r in records], 1, a.max_new_tokens
    )
    n = len(records)
    counts = {
        "one_round": 0,
        "two_round": 0,
        "malformed": 0,
        "first_accuracy": 0,
        "second_accuracy": 0,
        "wrong_to_right": 0,
        "right_to_wrong": 0,
    }
    for r, o in zip(records, outs):
        what = rewards.outcome(o[0]["text"], r["answer"], r["choices"])  # the same judge as training's metrics
        counts[["malformed", "one_round", "two_round"][int(what["rounds"])]] += 1
        counts["first_accuracy"] += what["first_correct"]
        counts["second_accuracy"] += what["rounds"] == 2 and what["final_correct"]  # A2 of two-round responses only
        if what["rounds"] == 2:
            counts["wrong_to_right"] += not what["first_correct"] and what["final_correct"]
            counts["right_to_wrong"] += what["first_correct"] and not what["final_correct"]
    print(json.dumps({"n": n, **{k: v / n for k, v in counts.items()}, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
