"""curate.py: reflection data, SRPO's stage 1 (the data behind the cold-start SFT).

    python curate.py                                   # tiny world: the tiny base answers, the oracle reflects
    python curate.py --model Qwen/Qwen2.5-VL-7B-Instruct --engine vllm --data mulberry.jsonl --image_dir images/ \\
        --teacher openai --teacher_model gpt-4o --teacher_api_key_env OPENAI_API_KEY --out_dir out/curate-7b
    python curate.py --help                            # every option; a YAML file of options may come first

Three steps (`--steps answer,reflect,build`), each resumable: it skips what an earlier run already wrote.
  1. answer   the policy writes one-round <think>R1</think> <answer>A1</answer> attempts (--samples_per_question,
              sampled unless --greedy) through nanosrpo.engine; each is judged with rewards.is_correct.
              -> <out_dir>/answers.jsonl
  2. reflect  a teacher that knows the gold answer reads each well-formed attempt and writes a reflection and a
              corrected second round (nanosrpo/teacher.py: openai, local or oracle). Replies are validated; a bad one
              is dropped and counted by reason, never trained on.  -> <out_dir>/reflections.jsonl
  3. build    two-round SFT records <think>R1</think> <answer>A1</answer> <reflection>F</reflection> <think>R2</think>
              <answer>A2</answer>, R1/A1 the policy's attempt verbatim, mixed --correct_fraction correct-and-refined
              (paper: 30%) to flawed-and-revised (--own_mix: every attempt, the policy's own share); a train/val
              split by question; messages and sharegpt layouts. Beside them, the same records as plain one-round
              chains of thought (the paper's plain-CoT SFT baseline, Table 3): a correct attempt verbatim, a flawed
              one replaced by the teacher's corrected second round, under the one-round prompt.
              -> <out_dir>/sft_{train,val}.jsonl, sft_{train,val}_sharegpt.jsonl, sft_{train,val}_cot.jsonl
Then <out_dir>/summary.json: counts per step, drops by reason, the mix achieved, teacher tokens and cost, the files.

Input (--data): the project's RL layout {"id", "question", "image", "answer", "choices"}, LLaVA-CoT-100k's
    {"id", "image", "conversations": [{"from": "human", "value"},
                                      {"from": "gpt", "value": "...<CONCLUSION>A</CONCLUSION>"}]}
or Mulberry-260k's
    {"messages": [{"role": "user", ...}, {"role": "assistant", "content": "... The final answer is: A"}],
     "images": [...]}.
A bad record (not JSON, no answer, unparseable gold, missing or unreadable image) is reported with
its file and line, skipped and counted; with --strict it stops the run.
"""

import hashlib
import json
import random
import re
import sys
import time
from pathlib import Path

from tqdm import tqdm

from nanosrpo import config, data, log, prompts, rewards, teacher

STEPS = ("answer", "reflect", "build")


# ------------------------------------------------------------------------------------------------------------ input
_CONCLUSION = re.compile(r"<CONCLUSION>(.*?)</CONCLUSION>", re.S)
_FINAL = re.compile(r"final answer is\s*:?\s*(.+)", re.I)


def _as_rl(rec: dict, lineno: int, stem: str) -> dict:
    """One input record in the RL layout {"id", "question", "images", "answer", "choices"}; raises ValueError."""
    rid = str(rec.get("id", f"{stem}-{lineno}"))
    if "question" in rec:  # the project's RL layout
        images = rec.get("image") or []
        return {
            "id": rid,
            "question": rec["question"],
            "images": [images] if isinstance(images, str) else images,
            "answer": rec.get("answer"),
            "choices": rec.get("choices"),
        }
    if "conversations" in rec:  # LLaVA-CoT-100k: the gold is the reference response's <CONCLUSION>
        turns = rec["conversations"]
        human = next((t.get("value") for t in turns if t.get("from") == "human"), None)
        gpt = next((t.get("value") for t in turns if t.get("from") == "gpt"), "") or ""
        m = _CONCLUSION.search(gpt)
        image = rec.get("image") or []
        return {
            "id": rid,
            "question": (human or "").replace("<image>", "").strip(),
            "choices": None,
            "images": [image] if isinstance(image, str) else image,
            "answer": m.group(1).strip() if m else None,
        }
    if (
        "messages" in rec
    ):  # Mulberry-260k (LLaMA-Factory sharegpt): the gold ends the reference with "The final answer is"
        turns = rec["messages"]
        user = next((t.get("content") for t in turns if t.get("role") == "user"), None)
        ref = next((t.get("content") for t in turns if t.get("role") == "assistant"), "") or ""
        finals = _FINAL.findall(ref)
        return {
            "id": rid,
            "question": (user or "").replace("<image>", "").strip(),
            "choices": None,
            "images": rec.get("images") or [],
            "answer": finals[-1].strip().rstrip(".").strip() if finals else None,
        }
    raise ValueError("no 'question', 'conversations' or 'messages' field (RL, LLaVA-CoT-100k or Mulberry-260k layout)")


def read_questions(path: str, image_dir: str = "", strict: bool = False) -> tuple[list[dict], dict[str, int]]:
    """Questions with gold answers from any of the three layouts, and {reason: count} of the records skipped."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: data file not found")
    root = Path(image_dir) if image_dir else path.parent
    records, skipped, seen = [], {}, set()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec, reason = _check(line, lineno, path.stem, root, seen)
            if rec is None:
                msg = f"{path}:{lineno}: {reason[1]}"
                if strict:
                    raise SystemExit(msg + " (--strict)")
                print(f"skipped {msg}", file=sys.stderr)
                skipped[reason[0]] = skipped.get(reason[0], 0) + 1
                continue
            seen.add(rec["id"])
            records.append(rec)
    if not records:
        raise SystemExit(f"{path}: no usable records")
    return records, skipped


def _check(line: str, lineno: int, stem: str, root: Path, seen: set):
    """(record, None) or (None, (reason, message)) for one input line."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        return None, ("not_json", f"not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(raw, dict):
        return None, ("not_json", "a record must be a JSON object")
    try:
        rec = _as_rl(raw, lineno, stem)
    except (ValueError, AttributeError, TypeError) as e:
        return None, ("bad_layout", str(e))
    if rec["id"] in seen:
        return None, ("duplicate_id", f"field 'id': duplicate id {rec['id']!r}")
    if not isinstance(rec["question"], str) or not rec["question"].strip():
        return None, ("no_question", "field 'question' is missing or empty")
    if rec["answer"] is None or str(rec["answer"]).strip() == "":
        return None, ("no_answer", "field 'answer' is missing or empty (no gold answer found)")
    rec["answer"] = str(rec["answer"]).strip()
    try:
        rewards.validate_gold(rec["answer"], rec["choices"])
    except ValueError as e:
        return None, ("bad_gold", f"field 'answer': {e}")
    images = []
    for v in rec["images"] if isinstance(rec["images"], list) else [rec["images"]]:
        p = Path(v) if isinstance(v, str) and Path(v).is_absolute() else root / str(v)
        if not isinstance(v, str) or not p.is_file():
            return None, ("image_missing", f"field 'image': image file not found: {p}")
        try:
            data.load_image(str(p))
        except Exception as e:  # PIL raises several kinds for a broken file
            return None, ("image_unreadable", f"field 'image': cannot read {p} ({type(e).__name__})")
        images.append(str(p.resolve()))
    rec["images"] = images
    return rec, None


# ------------------------------------------------------------------------------------------------------ our own files
def read_lines(path: Path) -> list[dict]:
    """Our own JSONL outputs. A run killed mid-write leaves at most one partial last line: it is ignored (redone)."""
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def append_lines(path: Path, rows: list[dict]) -> None:
    """Append rows in one write and flush them, so what was computed survives a kill."""
    if not rows:
        return
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()


# ----------------------------------------------------------------------------------------------------------- step 1
def answer(cfg, records: list[dict], out: Path, policy_path: str) -> dict:
    """The policy's own one-round attempts, samples_per_question per question, judged against the gold."""
    import torch

    from nanosrpo import engine, model

    path = out / "answers.jsonl"
    done = {a["id"] for a in read_lines(path)}
    todo = [r for r in records if r["id"] not in done]
    if todo:
        torch.manual_seed(cfg.seed + len(done))  # a resumed run does not replay the same random stream
        policy, processor = (
            model.load_policy(policy_path)
            if cfg.engine == "transformers"
            else (None, model.load_processor(model.resolve(policy_path)))
        )
        if policy is not None and torch.cuda.is_available():
            policy = policy.to("cuda", torch.bfloat16)
        gen = engine.make(cfg, policy, processor, model.resolve(policy_path))
        system = prompts.system_prompt(reflection=False)  # the policy answers as it would before any reflection SFT
        n, chunk = cfg.samples_per_question, max(1, cfg.gen_batch_size // cfg.samples_per_question)
        bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="answer", unit="question")
        for s in range(0, len(todo), chunk):
            batch = todo[s : s + chunk]
            outs = gen.generate(
                [data.render_prompt(r, system, processor) for r in batch],
                n,
                cfg.max_new_tokens,
                cfg.temperature,
                cfg.top_p,
                greedy=cfg.greedy,
            )
            rows = []
            for r, group in zip(batch, outs):
                for k, o in enumerate(group):
                    what = rewards.outcome(o["text"], r["answer"], r["choices"])
                    rows.append(
                        {
                            "id": r["id"],
                            "sample": k,
                            "response": o["text"],
                            "rounds": int(what["rounds"]),
                            "correct": bool(what["first_correct"]),
                            "record": r,
                        }
                    )
            append_lines(path, rows)  # a question is written with all its samples, or not at all
            bar.update(len(batch))
        bar.close()
    attempts = read_lines(path)
    one = [a for a in attempts if a["rounds"] == 1]
    return {
        "questions": len({a["id"] for a in attempts}),
        "attempts": len(attempts),
        "one_round": len(one),
        "correct": sum(a["correct"] for a in one),
        "file": str(path),
    }


# ----------------------------------------------------------------------------------------------------------- step 2
def reflect(cfg, out: Path) -> dict:
    """Teacher reflections on every well-formed attempt, validated; kept replies and dropped ones both written."""
    attempts = read_lines(out / "answers.jsonl")
    if not attempts:
        raise SystemExit(f"reflect: no attempts in {out / 'answers.jsonl'}; run --steps answer first")
    path = out / "reflections.jsonl"
    done = {r["key"] for r in read_lines(path)}
    jobs = []
    for a in attempts:
        key = f"{a['id']}#{a['sample']}"
        p = rewards.parse_response(a["response"])
        if key in done or p.rounds != 1:  # a malformed attempt has no R1/A1 to reflect on (counted at build)
            continue
        jobs.append({"key": key, "record": a["record"], "think": p.think1, "answer": p.answer1})
    errors = {}  # transport failures: nothing usable came back; not written, so a rerun asks again
    if jobs:
        by_key = {j["key"]: j for j in jobs}
        t = teacher.make(cfg, str(out))
        bar = tqdm(
            total=len(done) + len(jobs), initial=len(done), desc=f"reflect ({cfg.teacher} teacher)", unit="attempt"
        )
        for key, reply, info in t.reflect(jobs):
            bar.update()
            if info["error"]:
                errors[info["error"]] = errors.get(info["error"], 0) + 1
                continue
            rec = by_key[key]["record"]
            parts, reason = teacher.validate(reply, rec["answer"], rec["choices"])
            row = {
                "key": key,
                "ok": parts is not None,
                "reason": reason,
                "reply": reply,
                **(parts or {}),
                "prompt_tokens": info["prompt_tokens"],
                "completion_tokens": info["completion_tokens"],
                "cached": info["cached"],
            }
            append_lines(path, [row])  # one line per reply as it arrives: a kill loses only the requests in flight
        bar.close()
    rows = read_lines(path)
    dropped = {}
    for r in rows:
        if not r["ok"]:
            dropped[r["reason"]] = dropped.get(r["reason"], 0) + 1
    for reason, n in errors.items():
        dropped[reason] = dropped.get(reason, 0) + n
    return {
        "replies": len(rows),
        "kept": sum(r["ok"] for r in rows),
        "dropped": dropped,
        "transport_errors_retried_next_run": errors,
        "cached_replies": sum(r["cached"] for r in rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows if not r["cached"]),
        "completion_tokens": sum(r["completion_tokens"] for r in rows if not r["cached"]),
        "file": str(path),
    }


# ----------------------------------------------------------------------------------------------------------- step 3
def mix_counts(n_correct: int, n_flawed: int, fraction: float) -> tuple[int, int]:
    """The largest (correct, flawed) selection whose correct share is `fraction` (paper: 0.3 correct-and-refined)."""
    if fraction <= 0:
        return 0, n_flawed
    if fraction >= 1:
        return n_correct, 0
    total = int(min(n_correct / fraction, n_flawed / (1 - fraction)) + 1e-9)
    k = min(n_correct, round(fraction * total))
    return k, min(n_flawed, total - k)


def is_val(question_id: str, fraction: float) -> bool:
    """A stable split by question: every attempt at one question lands on the same side (no leak into val)."""
    h = int(hashlib.sha256(question_id.encode()).hexdigest()[:8], 16)
    return h / 16**8 < fraction


def two_round(attempt: str, refl: dict) -> str:
    """R1/A1 exactly as the policy wrote them, then the teacher's reflection and second round."""
    text = (
        f"{attempt.strip()} <reflection>{refl['reflection']}</reflection> "
        f"<think>{refl['think']}</think> <answer>{refl['answer']}</answer>"
    )
    assert rewards.parse_response(text).rounds == 2, text
    return text


def one_round(attempt: str, correct: bool, refl: dict) -> str:
    """The plain-CoT twin of a two-round record: the attempt itself if it was right, else the corrected round."""
    text = attempt.strip() if correct else f"<think>{refl['think']}</think> <answer>{refl['answer']}</answer>"
    assert rewards.parse_response(text).rounds == 1, text
    return text


def sft_records(rec: dict, key: str, response: str) -> tuple[dict, dict]:
    """The same example in both layouts train_sft.py reads: messages (image parts) and sharegpt (<image> + images)."""
    msgs = data.prompt_messages(rec, prompts.SRPO_SYSTEM) + [{"role": "assistant", "content": response}]
    user = "<image>" * len(rec["images"]) + data.question_text(rec)
    sharegpt = {
        "id": key,
        "messages": [
            {"role": "system", "content": prompts.SRPO_SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": response},
        ],
        "images": rec["images"],
    }
    return {"id": key, "messages": msgs}, sharegpt


def build(cfg, out: Path) -> dict:
    attempts = {f"{a['id']}#{a['sample']}": a for a in read_lines(out / "answers.jsonl")}
    kept = [r for r in read_lines(out / "reflections.jsonl") if r["ok"] and r["key"] in attempts]
    if not kept:
        raise SystemExit(f"build: no usable reflections in {out / 'reflections.jsonl'}; run --steps reflect first")
    correct = sorted((r for r in kept if attempts[r["key"]]["correct"]), key=lambda r: r["key"])
    flawed = sorted((r for r in kept if not attempts[r["key"]]["correct"]), key=lambda r: r["key"])
    # --own_mix: the first rounds the SFT imitates are then the policy's own sample of attempts, not one skewed to its
    # mistakes, and the reflections' verdicts say "wrong" as often as the policy is wrong (docs/coldstart.md)
    k, m = (len(correct), len(flawed)) if cfg.own_mix else mix_counts(len(correct), len(flawed), cfg.correct_fraction)
    rng = random.Random(cfg.seed)
    chosen = rng.sample(correct, k) + rng.sample(flawed, m)
    rng.shuffle(chosen)
    names = ("train", "val", "train_sharegpt", "val_sharegpt", "train_cot", "val_cot")
    files = {name: out / f"sft_{name}.jsonl" for name in names}
    handles = {name: open(p.with_suffix(".jsonl.tmp"), "w") for name, p in files.items()}
    sizes = {"train": 0, "val": 0}
    for r in chosen:
        a = attempts[r["key"]]
        msgs, sharegpt = sft_records(a["record"], r["key"], two_round(a["response"], r))
        split = "val" if is_val(a["id"], cfg.val_fraction) else "train"
        handles[split].write(json.dumps(msgs) + "\n")
        handles[f"{split}_sharegpt"].write(json.dumps(sharegpt) + "\n")
        cot = data.prompt_messages(a["record"], prompts.GRPO_SYSTEM)
        cot.append({"role": "assistant", "content": one_round(a["response"], a["correct"], r)})
        handles[f"{split}_cot"].write(json.dumps({"id": r["key"], "messages": cot}) + "\n")
        sizes[split] += 1
    for name, h in handles.items():
        h.close()
        h_path = Path(h.name)
        h_path.replace(files[name])  # complete files only
    return {
        "records": len(chosen),
        **sizes,
        "correct_and_refined": k,
        "flawed_and_revised": m,
        "available": {"correct": len(correct), "flawed": len(flawed)},
        "correct_fraction": round(k / max(1, k + m), 4),
        "files": {n: str(p) for n, p in files.items()},
    }


# ------------------------------------------------------------------------------------------------------------ main
def main(argv=None):
    cfg = config.parse(config.CurateConfig, argv)
    steps = [s.strip() for s in cfg.steps.split(",") if s.strip()]
    if unknown := [s for s in steps if s not in STEPS]:
        raise SystemExit(f"--steps: unknown step(s) {unknown}; known: {','.join(STEPS)}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.lock_out_dir(out)  # one run per --out_dir: a second one ends here, naming the first one's pid
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.setdefault("steps", {})

    if "answer" in steps:
        t0 = time.time()
        from nanosrpo import tiny

        paths = tiny.resolve(cfg, policy="base", data="train")  # "tiny": the tiny base and the training questions
        data_path, policy_path = paths["data"], paths["model"]
        records, skipped = read_questions(data_path, cfg.image_dir, cfg.strict)
        records = records[: cfg.max_questions] if cfg.max_questions > 0 else records
        summary["input"] = {"file": str(data_path), "questions": len(records), "skipped": skipped}
        summary["steps"]["answer"] = {**answer(cfg, records, out, policy_path), "seconds": round(time.time() - t0, 1)}
    if "reflect" in steps:
        t0 = time.time()
        summary["steps"]["reflect"] = {
            **reflect(cfg, out),
            "teacher": cfg.teacher,
            "seconds": round(time.time() - t0, 1),
        }
        r = summary["steps"]["reflect"]
        summary["teacher_tokens"] = {"prompt": r["prompt_tokens"], "completion": r["completion_tokens"]}
        summary["estimated_usd"] = round(
            r["prompt_tokens"] / 1e6 * cfg.usd_per_mtok_in + r["completion_tokens"] / 1e6 * cfg.usd_per_mtok_out, 6
        )
    if "build" in steps:
        t0 = time.time()
        b = build(cfg, out)
        summary["files"] = b.pop("files")
        summary["correct_fraction"] = b["correct_fraction"]
        summary["steps"]["build"] = {**b, "seconds": round(time.time() - t0, 1)}

    # drops by reason over the whole pipeline: attempts with no usable R1/A1, and teacher replies that failed checks
    s = summary["steps"]
    summary["dropped"] = {
        "input": summary.get("input", {}).get("skipped", {}),
        "answer": {"not_one_round": s["answer"]["attempts"] - s["answer"]["one_round"]} if "answer" in s else {},
        "reflect": s.get("reflect", {}).get("dropped", {}),
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    config.run(main)
