"""curate.py: build reflection data (SRPO stage 1).

The policy answers each question; a stronger teacher compares its chain of thought with the gold answer and writes a
reflection plus a corrected second round; the result is SFT records (~30% correct-and-refined, ~70% flawed-and-revised)
for train_sft.py. Not implemented yet: on the tiny world, nanosrpo.synthetic's oracle writes these records today.
"""

from nanosrpo import config


def main(argv=None):
    cfg = config.parse(config.CurateConfig, argv)
    raise SystemExit(
        "curate.py is not implemented yet (planned: policy attempts + teacher reflections). "
        f"The tiny world's reflection data is written by nanosrpo/synthetic.py under {cfg.cache_dir}."
    )


if __name__ == "__main__":
    main()
