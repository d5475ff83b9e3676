"""evaluate.py: accuracy of a policy on a benchmark (first answer, final answer, reflection transitions).

Not implemented yet; train_grpo.py reports the same numbers on the tiny world's held-out split while it trains.
"""

from nanosrpo import config


def main(argv=None):
    config.parse(config.EvalConfig, argv)
    raise SystemExit("evaluate.py is not implemented yet (planned: greedy/sampled accuracy on a JSONL benchmark).")


if __name__ == "__main__":
    main()
