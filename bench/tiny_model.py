"""Figures for docs/tiny_world.md: tiny model sizes, build time, forward+backward time of 8 one-image sequences.

python bench/tiny_model.py
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanosrpo import data, model, prompts, synthetic, tiny  # noqa: E402


def main():
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    print(f"torch threads: {torch.get_num_threads()}")
    for size in tiny.TINY_SIZES:
        info = tiny.build_tiny(tmp / size, size=size)
        policy, processor = model.load_policy(str(tmp / size))
        samples = []
        for i in range(8):
            prob = synthetic.make_problem(0, 1, i)
            synthetic.render(prob).save(tmp / f"{i}.png")
            messages = [
                {"role": "system", "content": prompts.GRPO_SYSTEM},
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": str(tmp / f"{i}.png")},
                        {"type": "text", "text": prob.question},
                    ],
                },
                {"role": "assistant", "content": synthetic.one_round(prob)},
            ]
            samples.append(data.tokenize_chat(processor, messages))
        batch = data.collate(processor, samples)
        batch.pop("loss_mask")
        times = []
        for _ in range(6):
            t = time.perf_counter()
            policy(**batch).loss.backward()
            times.append(time.perf_counter() - t)
        times = sorted(times[1:])  # drop the warm-up
        print(
            f"{size:>5}: {info['params']:>10,} params | build+save {info['seconds']:.2f} s | fwd+bwd of "
            f"8 x {batch['input_ids'].shape[1]} tokens (one {synthetic.CELL * 4}px image each): "
            f"median {1000 * times[len(times) // 2]:.0f} ms"
        )


if __name__ == "__main__":
    main()
