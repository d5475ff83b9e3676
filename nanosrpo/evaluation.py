"""What a policy's responses say: first and final answers, their verdicts, reflection transitions, format.

One implementation for both users: train_grpo.py's periodic eval (greedy_eval) and evaluate.py (generate + score +
summarize). A response is read like this:
  final answer  the last <answer>...</answer> block; first answer: the first one (the answer *before* reflection);
                with no <answer> block both are the last \\boxed{...} in the response; else there is none (wrong).
                Each is rewards.extract_answer of its block (its last \\boxed{...}, else the block; $...$, **...**,
                \\text{...} peeled off), the same extraction the training reward judges.
  verdict       benchmarks.is_right(benchmark, record, answer): the benchmark's official rule on that answer.
  format        rewards.parse_response: well-formed one- or two-round responses (the training reward's strict parse).
  transitions   over well-formed two-round responses only: wrong->right, right->wrong, right->right, wrong->wrong,
                as fractions of *all* responses (one-round and malformed ones count in none of the four).
This is more lenient than the training reward (rewards.outcome), which calls a malformed response wrong whatever it
says: an evaluation should measure what the model answered, and the format rate reports the format separately.
Records are sharded across processes (rank r takes records r, r + world, ...) and the rows gathered back in order.
"""

import io
import math
import time

from nanosrpo import benchmarks, data, rewards

# -----------------------------------------------------------------------------------------------------------------
# extraction


def extract_answers(text) -> tuple[str | None, str | None]:
    """(first answer, final answer) of a response (module docstring); None where there is none. Each is
    rewards.extract_answer of its block, the extraction the training reward judges too."""
    if not isinstance(text, str):
        return None, None
    # rewards.lenient_blocks: <answer>(.*?)</answer> in linear time (an unclosed block is not an answer)
    blocks = [rewards.extract_answer(b) for b in rewards.lenient_blocks(text, "answer")]
    if blocks:
        return blocks[0] or None, blocks[-1] or None
    boxed = rewards.extract_answer(text) if rewards.last_boxed(text) is not None else None
    return (boxed, boxed) if boxed else (None, None)


def score_response(benchmark: str, rec: dict, response, sample: int = 0, tokens: int | None = None) -> dict:
    """One row of predictions.jsonl: the response, both extracted answers, their verdicts, its shape."""
    first, final = extract_answers(response)
    return {
        "id": rec["id"],
        "sample": sample,
        "response": response,
        "first_answer": first,
        "final_answer": final,
        "first_correct": benchmarks.is_right(benchmark, rec, first),
        "final_correct": benchmarks.is_right(benchmark, rec, final),
        "rounds": rewards.parse_response(response).rounds if isinstance(response, str) else 0,
        "tokens": tokens,
    }


# -----------------------------------------------------------------------------------------------------------------
# counting

TRANSITIONS = {
    (False, True): "wrong_to_right",
    (True, False): "right_to_wrong",
    (True, True): "right_to_right",
    (False, False): "wrong_to_wrong",
}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(benchmark: str, records: list[dict], rows: list[dict]) -> dict:
    """results.json's numbers from scored rows (one per record and sample). Fractions in [0, 1]."""
    n = len(rows)
    if n == 0:
        return {"n": 0}
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    out = {
        "n": n,
        "accuracy": mean([r["final_correct"] for r in rows]),
        "first_accuracy": mean([r["first_correct"] for r in rows]),
        "format_rate": mean([r["rounds"] > 0 for r in rows]),
        "two_round_rate": mean([r["rounds"] == 2 for r in rows]),
    }
    counts = dict.fromkeys(TRANSITIONS.values(), 0)
    for r in rows:
        if r["rounds"] == 2:
            counts[TRANSITIONS[(bool(r["first_correct"]), bool(r["final_correct"]))]] += 1
    out.update({key: c / n for key, c in counts.items()})
    tokens = [r["tokens"] for r in rows if r.get("tokens") is not None]
    out["mean_response_tokens"] = mean(tokens)
    by_id = {rec["id"]: rec for rec in records}
    samples: dict[str, list[bool]] = {}
    for r in rows:
        samples.setdefault(r["id"], []).append(bool(r["final_correct"]))
    k_max = min(len(v) for v in samples.values())
    if k_max > 1:  # several samples per record: pass@k for k = 1, 2, 4, ..., and n_samples
        for k in sorted({2**i for i in range(k_max.bit_length()) if 2**i <= k_max} | {k_max}):
            out[f"pass@{k}"] = mean([pass_at_k(len(v), sum(v), k) for v in samples.values()])
    # per category: MathVista's skills are lists (a record counts under each of its skills), the rest single values
    by_cat: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        for field, value in by_id[r["id"]].get("categories", {}).items():
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None:
                    by_cat.setdefault(field, {}).setdefault(str(v), []).append(r)
    out["by_category"] = {
        field: {
            v: {
                "n": len(rs),
                "accuracy": mean([r["final_correct"] for r in rs]),
                "first_accuracy": mean([r["first_correct"] for r in rs]),
            }
            for v, rs in sorted(values.items())
        }
        for field, values in by_cat.items()
    }
    if benchmark == "wemath":  # the official metrics on sample 0, for the final and the first answer
        first_rows = [r for r in rows if r["sample"] == 0]
        out["wemath"] = benchmarks.wemath_four_dimensional(records, {r["id"]: r["final_correct"] for r in first_rows})
        out["wemath_first"] = benchmarks.wemath_four_dimensional(
            records, {r["id"]: r["first_correct"] for r in first_rows}
        )
    return out


# -----------------------------------------------------------------------------------------------------------------
# generation, sharded over processes


def shard(items: list, rank: int, world: int) -> list:
    """This process's share: items rank, rank + world, rank + 2 world, ..."""
    return items[rank::world]


def unshard(parts: list[list]) -> list:
    """Inverse of shard: parts[r] = shard(items, r, len(parts)) -> items, in the original order."""
    world = len(parts)
    return [parts[i % world][i // world] for i in range(sum(len(p) for p in parts))]


def _open_image(im):
    if isinstance(im, (bytes, bytearray)):
        from PIL import Image

        with Image.open(io.BytesIO(im)) as img:
            return img.convert("RGB")
    return data.load_image(im)


def render(rec: dict, system: str | None, processor) -> dict:
    """An engine prompt for a benchmark record: data.render_prompt's chat with the record's question text (choices
    already written in, as the benchmark lays them out), images given as paths or embedded bytes, and no system
    turn at all when system is None (--prompt none: the chat template's own default)."""
    messages = data.prompt_messages(
        {"question": rec["question"], "choices": None, "images": ["<image>"] * len(rec["images"])}, system or ""
    )
    text = processor.apply_chat_template(
        messages if system is not None else messages[1:], tokenize=False, add_generation_prompt=True
    )
    images = [_open_image(im) for im in rec["images"]]
    return {"text": text, "images": images, "ids": data.encode(processor, text, images)}


def generate(
    engine,
    benchmark: str,
    records: list[dict],
    system: str | None,
    processor,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    chunk: int = 64,
    on_chunk=None,
) -> list[dict]:
    """Generate and score n responses per record (greedy when temperature is 0), `chunk` records per process at a
    time. Every process returns all rows, in record order (record-major, sample-minor); on_chunk(rows, seconds) is
    called on every process after each chunk (progress, appending to predictions.jsonl)."""
    from accelerate import PartialState

    state = PartialState()
    world, out = state.num_processes, []
    step = max(1, chunk) * world
    for s in range(0, len(records), step):
        t0 = time.time()
        mine = shard(records[s : s + step], state.process_index, world)
        outs = (
            engine.generate(
                [render(r, system, processor) for r in mine],
                n,
                max_new_tokens,
                temperature,
                top_p,
                greedy=temperature == 0,
            )
            if mine
            else []
        )
        groups = [
            [score_response(benchmark, r, o["text"], i, len(o["ids"])) for i, o in enumerate(group)]
            for r, group in zip(mine, outs)
        ]
        if world > 1:
            from accelerate.utils import gather_object

            groups = unshard(gather_object([groups]))  # [groups of rank 0, groups of rank 1, ...] -> record order
        rows = [row for g in groups for row in g]
        if on_chunk is not None:
            on_chunk(rows, time.time() - t0)
        out += rows
    return out


KEYS = (
    "accuracy",
    "first_accuracy",
    "format_rate",
    "wrong_to_right",
    "right_to_wrong",
    "right_to_right",
    "wrong_to_wrong",
    "mean_response_tokens",
)


def greedy_eval(engine, records: list[dict], system: str, processor, max_new_tokens: int) -> dict:
    """train_grpo.py's periodic eval: greedy-decode every RL record once, counted exactly as evaluate.py counts the
    'jsonl' benchmark. Returns {"eval_accuracy", "eval_first_accuracy", "eval_format_rate", "eval_wrong_to_right",
    ...} ({} when there is nothing to evaluate); every process gets the same numbers."""
    if not records:
        return {}
    import torch

    recs = [r if "categories" in r else benchmarks.from_rl_record(r) for r in records]
    with torch.no_grad():
        rows = generate(engine, "jsonl", recs, system, processor, 1, max_new_tokens, temperature=0.0, chunk=len(recs))
    s = summarize("jsonl", recs, rows)
    return {f"eval_{k}": s[k] for k in KEYS}
