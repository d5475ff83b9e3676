"""train_grpo.py: reflection-aware GRPO (SRPO stage 2). Run as `accelerate launch train_grpo.py`. (In progress.)"""

from nanosrpo import config


def main(argv=None):
    config.parse(config.GRPOConfig, argv)
    raise SystemExit("train_grpo.py is not implemented yet.")


if __name__ == "__main__":
    main()
