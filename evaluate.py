"""evaluate.py: a policy on the paper's benchmarks: first vs final answer, what reflection did, official scoring.

    python evaluate.py                                                   # the tiny world's eval split, tiny policy
    python evaluate.py --model <path | hub id> --benchmark mathvista --data MathVista/data/testmini.json --out_dir DIR
    python evaluate.py --benchmark mathvista,wemath --data A,B ...       # one folder each + summary.md
    python evaluate.py --predictions preds.jsonl --benchmark mathvista --data ...   # re-score, no model
    accelerate launch evaluate.py ...                                    # records sharded over processes/GPUs

Writes results.json (accuracy = final answer by the benchmark's official rule, strict_accuracy = the same without
credit for a guessed answer, first_accuracy, format_rate, reflection transitions, tokens, time, by_category; WeMath
adds its four-dimensional metrics), results.md (the same as tables) and predictions.jsonl (one line per record and
sample: response, both extracted answers, verdicts). A rerun with the same --out_dir skips the records already in
predictions.jsonl. --predictions needs no model and no images. Scoring rules: nanosrpo/benchmarks.py and README
"Evaluation".
"""

import json
import time
from pathlib import Path

from nanosrpo import benchmarks, config, evaluation, log, prompts, tiny
from nanosrpo.data import DataError

SYSTEMS = {"srpo": prompts.SRPO_SYSTEM, "grpo": prompts.GRPO_SYSTEM, "none": None}


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",")] if s else []


def read_jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append({**json.loads(line), "_line": lineno})
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def read_predictions(path: str, benchmark: str, records: list[dict]) -> list[dict]:
    """Scored rows from a JSONL of {"id": the benchmark's own id, "response": full output} (optional "sample",
    "tokens"; WeMath also takes {"ID", "key"}). A record with no prediction is scored as an empty response (wrong)
    and flagged "missing"; a prediction for an unknown id is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    by_id = {r["id"]: r for r in records}
    rows, seen = [], set()
    for p in read_jsonl_rows(path):
        where = f"{path}:{p['_line']}"
        rid = p.get("id")
        if rid is None and benchmark == "wemath" and "ID" in p and "key" in p:
            rid = f"{p['ID']}/{p['key']}"
        if rid is None:
            raise DataError(f"{where}: field 'id' is missing")
        if not isinstance(p.get("response"), str):
            raise DataError(f"{where}: field 'response' is missing or not a string")
        rid, sample = str(rid), int(p.get("sample", 0))
        if rid not in by_id:
            raise DataError(f"{where}: field 'id': {rid!r} is not a record of {benchmark}")
        if (rid, sample) in seen:
            raise DataError(f"{where}: field 'id': duplicate prediction for {rid!r} (sample {sample})")
        seen.add((rid, sample))
        rows.append(evaluation.score_response(benchmark, by_id[rid], p["response"], sample, p.get("tokens")))
    missing = [r for r in records if (r["id"], 0) not in seen]  # wrong, even where an official rule would guess
    rows += [
        {
            **evaluation.score_response(benchmark, r, ""),
            "response": None,
            "missing": True,
            "first_correct": False,
            "final_correct": False,
        }
        for r in missing
    ]
    order = {r["id"]: i for i, r in enumerate(records)}
    return sorted(rows, key=lambda r: (order[r["id"]], r["sample"]))


def add_strict(benchmark: str, records: list[dict], rows: list[dict], res: dict) -> dict:
    """The strict figures beside the official ones: a verdict the official rule reached by guessing (MathVista's
    most-similar choice, MMMU-Pro's random letter; benchmarks.judge) earns no credit. Marks each row's
    first_guessed / final_guessed and returns res with strict_accuracy, first_strict_accuracy and guessed_rate
    (final answers scored by a guess) placed after first_accuracy."""
    by_id = {r["id"]: r for r in records}
    for row in rows:
        for which in ("first", "final"):
            guessed = benchmarks.judge(benchmark, by_id[row["id"]], row[f"{which}_answer"])[1]
            row[f"{which}_guessed"] = guessed and not row.get("missing")  # a missing prediction is simply wrong
    n = len(rows)
    strict = {
        "strict_accuracy": sum(r["final_correct"] and not r["final_guessed"] for r in rows) / n if n else None,
        "first_strict_accuracy": sum(r["first_correct"] and not r["first_guessed"] for r in rows) / n if n else None,
        "guessed_rate": sum(r["final_guessed"] for r in rows) / n if n else None,
    }
    out = {}
    for k, v in res.items():
        out[k] = v
        if k == "first_accuracy":
            out.update(strict)
    return out if "first_accuracy" in res else {**res, **strict}


def markdown(name: str, res: dict) -> str:
    """results.md: the headline numbers, then one table per category field."""
    pct = lambda x: "" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        f"# {name}",
        "",
        "`accuracy` is the official figure (the benchmark's own rule-based scoring on the "
        "extracted final answer); `strict_accuracy` is the strict one (no credit where that rule had to guess: "
        "no usable answer). docs/evaluate.md.",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    for k, v in res.items():
        if k in ("by_category", "wemath", "wemath_first") or isinstance(v, dict):
            continue
        is_frac = k.endswith(("accuracy", "rate")) or k.startswith(("pass@", "wrong_to", "right_to"))
        lines.append(f"| {k} | {pct(v) if is_frac and isinstance(v, float) else v} |")
    for key in ("wemath", "wemath_first"):
        if key in res:
            label = "final answer" if key == "wemath" else "first answer"
            lines += ["", f"## WeMath four-dimensional metrics ({label})", "", "| metric | value |", "|---|---:|"]
            lines += [f"| {k} | {v if k == 'groups' else pct(v)} |" for k, v in res[key].items()]
    for field, values in res.get("by_category", {}).items():
        lines += [
            "",
            f"## by {field} (official)",
            "",
            "| value | n | accuracy | first accuracy |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {v} | {s['n']} | {pct(s['accuracy'])} | {pct(s['first_accuracy'])} |" for v, s in values.items()]
    return "\n".join(lines) + "\n"


def write_results(out: Path, res: dict, rows: list[dict], name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "results.md").write_text(markdown(name, res))
    with open(out / "predictions.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def run_benchmark(cfg, name, records, out: Path, gen, processor, state, model_path) -> dict:
    """Generate (resuming from predictions.jsonl), score, summarise, write. Returns results.json's dict."""
    from tqdm import tqdm

    n, pred_path = cfg.n_samples, out / "predictions.jsonl"
    done = {}  # (id, sample) -> row already generated by an earlier run with this --out_dir
    if pred_path.exists():
        ids = {r["id"] for r in records}
        done = {
            (r["id"], r["sample"]): r
            for r in read_jsonl_rows(pred_path)
            if r.get("id") in ids and r.get("response") is not None
        }
    todo = [r for r in records if any((r["id"], i) not in done for i in range(n))]
    timing = {"seconds": 0.0, "samples": 0}
    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=name, disable=not state.is_main_process)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    def on_chunk(rows, seconds):
        timing["seconds"] += seconds
        timing["samples"] += len(rows)
        if state.is_main_process:  # append as we go: a killed run resumes where it stopped
            with open(pred_path, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            bar.update(len(rows) // n)

    new = (
        evaluation.generate(
            gen,
            name,
            todo,
            SYSTEMS[cfg.prompt],
            processor,
            n,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_p,
            chunk=max(1, cfg.gen_batch_size // n),
            on_chunk=on_chunk,
        )
        if todo
        else []
    )
    bar.close()
    by_key = {(r["id"], r["sample"]): r for r in new}
    by_id = {r["id"]: r for r in records}
    rows = []
    for rec in records:
        for i in range(n):
            r = by_key.get((rec["id"], i)) or done[(rec["id"], i)]
            # earlier rows are re-scored: a fix to the scoring rules applies to the whole file
            rows.append(evaluation.score_response(name, by_id[rec["id"]], r["response"], i, r.get("tokens")))
    res = add_strict(name, records, rows, evaluation.summarize(name, records, rows))
    res["seconds_per_sample"] = timing["seconds"] / timing["samples"] if timing["samples"] else None
    res.update(
        benchmark=name,
        model=model_path,
        prompt=cfg.prompt,
        n_samples=n,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        resumed=len(records) - len(todo),
    )
    if state.is_main_process:
        write_results(out, res, rows, name)
    return res


def main(argv=None):
    cfg = config.parse(config.EvalConfig, argv)
    names = _split(cfg.benchmark)
    datas = _split(cfg.data) or [config.TINY]
    preds = _split(cfg.predictions)
    for name in names:
        if name not in benchmarks.BENCHMARKS:
            raise SystemExit(f"unknown --benchmark {name!r}; known: {', '.join(benchmarks.BENCHMARKS)}")
    if len(datas) != len(names) or (preds and len(preds) != len(names)):
        raise SystemExit(
            f"--data (and --predictions) need one entry per --benchmark: {len(names)} benchmark(s), "
            f"{len(datas)} data, {len(preds)} predictions"
        )
    if cfg.prompt not in SYSTEMS:
        raise SystemExit(f"--prompt must be srpo, grpo or none, got {cfg.prompt!r}")
    log.lock_out_dir(cfg.out_dir)  # one run per --out_dir: a second one ends here, naming the first one's pid

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState, unlike Accelerator, does not read ACCELERATE_USE_CPU (the CPU multi-process recipe) itself
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    tiny_needed = config.TINY in datas or (config.TINY == cfg.model and not preds)
    with state.main_process_first():  # the tiny world is built once, on first use
        world = tiny.ensure_world(cfg.cache_dir, cfg.tiny_size, cfg.text_only) if tiny_needed else {}
    try:  # all data first: a bad record stops the run before a model is loaded
        sets = []
        for name, path in zip(names, datas):
            if path == config.TINY and name != "jsonl":
                raise DataError(f"--data tiny is the tiny world's eval split: it needs --benchmark jsonl, not {name}")
            records = benchmarks.load(
                name, world["eval"] if path == config.TINY else path, cfg.split, cfg.image_dir or None, images=not preds
            )  # re-scoring needs no images
            sets.append((name, records[: cfg.limit] if cfg.limit else records))
    except DataError as e:
        raise SystemExit(f"error: {e}")

    out_root = Path(cfg.out_dir)
    outs = [out_root if len(names) == 1 else out_root / name for name in names]
    results = {}
    if preds:  # re-scoring: no model
        for (name, records), pred, out in zip(sets, preds, outs):
            try:
                rows = read_predictions(pred, name, records)
            except DataError as e:
                raise SystemExit(f"error: {e}")
            res = add_strict(name, records, rows, evaluation.summarize(name, records, rows))
            res.update(
                benchmark=name,
                predictions=pred,
                missing_predictions=sum(bool(r.get("missing")) for r in rows),
                seconds_per_sample=None,
            )
            if state.is_main_process:
                write_results(out, res, rows, name)
            results[name] = res
    else:
        import torch

        from nanosrpo import engine, model

        model.use_cpu_cores(state, cfg.cpu_threads)
        torch.manual_seed(cfg.seed * 1_000_003 + state.process_index)  # sampling differs per process, repeatably
        model_path = cfg.model
        if cfg.model == config.TINY:  # the tiny policy trained for this prompt: one round (grpo) or reflection (srpo)
            with state.main_process_first():
                model_path = tiny.ensure_policy(
                    cfg.cache_dir, cfg.tiny_size, cfg.text_only, stage="base" if cfg.prompt == "grpo" else "reflect"
                )
        t0 = time.time()
        if cfg.engine == "vllm":  # vLLM loads the weights itself: no second copy in transformers
            policy, processor = None, model.load_processor(model.resolve(model_path))
        else:
            dtype = torch.bfloat16 if state.device.type == "cuda" else torch.float32
            policy, processor = model.load_policy(model_path, dtype=dtype)
            policy.to(state.device).eval()
        gen = engine.make(cfg, policy, processor, model.resolve(model_path))
        state.print(f"loaded {model_path} in {time.time() - t0:.1f}s")
        for (name, records), out in zip(sets, outs):
            results[name] = run_benchmark(cfg, name, records, out, gen, processor, state, model_path)

    if state.is_main_process:
        for name, res in results.items():
            print(
                f"{name}: n={res['n']} accuracy={res['accuracy']:.4f} (official) strict_accuracy="
                f"{res['strict_accuracy']:.4f} first_accuracy={res['first_accuracy']:.4f} "
                f"format_rate={res['format_rate']:.4f} wrong_to_right={res['wrong_to_right']:.4f} "
                f"right_to_wrong={res['right_to_wrong']:.4f}"
            )
        if len(names) > 1:
            write_summary(out_root, results)
    return results


# evaluation.KEYS (what the training eval logs) with the sample count and the strict accuracy beside the official one
SUMMARY_KEYS = ("n", "accuracy", "strict_accuracy", *evaluation.KEYS[1:])


def write_summary(out_root: Path, results: dict) -> None:
    """summary.json and summary.md: one row per benchmark."""
    out_root.mkdir(parents=True, exist_ok=True)
    table = {name: {k: res.get(k) for k in SUMMARY_KEYS} for name, res in results.items()}
    (out_root / "summary.json").write_text(json.dumps(table, indent=2) + "\n")

    def fmt(k, v):
        if v is None:
            return ""
        return str(v) if k == "n" else f"{v:.1f}" if k == "mean_response_tokens" else f"{100 * v:.1f}%"

    lines = ["| benchmark | " + " | ".join(SUMMARY_KEYS) + " |", "|---|" + "---:|" * len(SUMMARY_KEYS)]
    lines += [f"| {name} | " + " | ".join(fmt(k, row[k]) for k in SUMMARY_KEYS) + " |" for name, row in table.items()]
    (out_root / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    config.run(main)
