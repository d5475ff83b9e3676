"""train_sft.py: reflection-oriented cold-start SFT (SRPO stage 1). (In progress.)"""

from nanosrpo import config


def main(argv=None):
    config.parse(config.SFTConfig, argv)
    raise SystemExit("train_sft.py is not implemented yet.")


if __name__ == "__main__":
    main()
