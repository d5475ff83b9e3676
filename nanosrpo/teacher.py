"""Reflection teachers (SRPO stage 1, curate.py's reflect step) behind one interface, and the check of their replies.

    teacher.reflect(jobs) -> yields (job key, reply text or None, info) as replies arrive, in any order
        jobs[i] = {"key", "record": RL record (data.load_rl_records' shape), "think": R1, "answer": A1}
        info    = {"prompt_tokens", "completion_tokens", "cached": bool, "error": None or a reason (reply is None)}

A teacher sees the question, its images, the gold answer and the policy's first attempt, and replies
    <reflection>F</reflection> <think>R2</think> <answer>A2</answer>
`validate` accepts exactly that shape with a correct A2, and names the reason otherwise. Three teachers:
  OpenAITeacher  any OpenAI-compatible chat-completions endpoint (OpenAI, Azure, a vLLM or SGLang server), through the
                 official `openai` client (an optional dependency, imported only here). Bounded concurrency; the
                 client retries 429/5xx/timeouts with exponential backoff and honours Retry-After; every reply is kept
                 in an on-disk cache keyed by the request, so a rerun never pays twice for it.
  LocalTeacher   a local checkpoint through nanosrpo.engine (e.g. a larger model on the same GPUs).
  OracleTeacher  the tiny world's programmatic teacher: it rebuilds the grid from the record id, names the first
                 miscounted row of the attempt (or confirms it) and writes the correct row-by-row count.
Teachers never train anything.
"""

import base64
import hashlib
import json
import mimetypes
import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from nanosrpo import data, prompts, rewards, synthetic


def validate(reply: str | None, gold, choices=None) -> tuple[dict | None, str | None]:
    """({"reflection", "think", "answer"}, None) for a usable reply, else (None, reason).

    Exactly one reflection, one think and one answer, in that order, with nothing around them: the reply is parsed as
    the second half of a two-round response by the same parser the reward uses (rewards.parse_response).
    """
    if not isinstance(reply, str) or not reply.strip():
        return None, "empty_reply"
    if "<reflection>" not in reply:
        return None, "no_reflection"
    p = rewards.parse_response("<think>-</think> <answer>-</answer> " + reply.strip())
    if p.rounds != 2:
        return None, "malformed_reply"
    if not rewards.is_correct(p.answer2, gold, choices):
        return None, "wrong_answer"
    return {"reflection": p.reflection, "think": p.think2, "answer": p.answer2}, None


def teacher_text(job: dict) -> str:
    """The teacher's instruction for one attempt (prompts.TEACHER_PROMPT filled in; images are attached separately)."""
    rec = job["record"]
    return prompts.TEACHER_PROMPT.format(
        question=data.question_text(rec), answer=rec["answer"], think=job["think"], student_answer=job["answer"]
    )


def image_data_url(path: str) -> str:
    """An image file as a base64 data URL, its bytes sent as they are on disk (no re-encoding)."""
    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def chat_messages(job: dict) -> list[dict]:
    """OpenAI chat messages: the teacher's system line, then the images (data URLs) and the instruction."""
    text = teacher_text(job)
    images = job["record"].get("images") or []
    content = text
    if images:  # text-only servers reject a list with image parts, so a plain string when there are none
        content = [{"type": "image_url", "image_url": {"url": image_data_url(p)}} for p in images]
        content.append({"type": "text", "text": text})
    return [{"role": "system", "content": prompts.TEACHER_SYSTEM}, {"role": "user", "content": content}]


# ----------------------------------------------------------------------------------------------------------- OpenAI
class OpenAITeacher:
    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str,
        cache_dir: str,
        concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 120.0,
        max_tokens: int = 1024,
        temperature: float = 0.0,
    ):
        try:
            import openai
        except ImportError:
            raise SystemExit("--teacher openai needs the openai package: pip install openai") from None
        if not model:
            raise SystemExit("--teacher openai needs --teacher_model (the model name the endpoint serves)")
        key = os.environ.get(api_key_env)
        if not key:  # the variable's name is printed, never its value
            raise SystemExit(
                f"--teacher openai: the environment variable {api_key_env} (--teacher_api_key_env) is not set"
            )
        self.openai = openai
        # The client retries 408/409/429/5xx and timeouts max_retries times with exponential backoff, and waits as long
        # as a Retry-After header says (up to a minute); `timeout` bounds each attempt.
        self.client = openai.OpenAI(base_url=url, api_key=key, max_retries=max_retries, timeout=timeout)
        self.url, self.model, self.concurrency = url, model, max(1, concurrency)
        self.max_tokens, self.temperature = max_tokens, temperature
        self.cache = Path(cache_dir)

    def request(self, job: dict) -> dict:
        return {
            "model": self.model,
            "messages": chat_messages(job),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    def cache_path(self, body: dict) -> Path:
        """The reply's file: a hash of everything that decides it (endpoint, model, messages incl. images, options)."""
        key = hashlib.sha256(json.dumps({"url": self.url, **body}, sort_keys=True).encode()).hexdigest()
        return self.cache / key[:2] / f"{key}.json"

    def _ask(self, job: dict):
        body = self.request(job)
        path = self.cache_path(body)
        if path.exists():
            hit = json.loads(path.read_text())
            return hit["text"], {
                "prompt_tokens": hit["prompt_tokens"],
                "completion_tokens": hit["completion_tokens"],
                "cached": True,
                "error": None,
            }
        try:
            resp = self.client.chat.completions.create(**body)
        except self.openai.APITimeoutError:
            return None, _failed("timeout")
        except self.openai.APIStatusError as e:
            return None, _failed(f"http_{e.status_code}")
        except self.openai.APIConnectionError:
            return None, _failed("connection_error")
        text = (resp.choices[0].message.content or "") if resp.choices else ""
        usage = resp.usage
        info = {
            "prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
            "completion_tokens": getattr(usage, "completion_tokens", 0) or 0,
            "cached": False,
            "error": None,
        }
        # Paid for: keep it before anything else can go wrong (write + rename, so a kill never leaves half a file).
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{id(job)}")
        tmp.write_text(
            json.dumps(
                {"text": text, "prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"]}
            )
        )
        os.replace(tmp, path)
        return text, info

    def reflect(self, jobs: list[dict]):
        """Replies as they arrive, at most `concurrency` requests in flight; identical requests are sent once."""
        groups: dict[tuple, list[dict]] = {}  # (question id, attempt) -> jobs: the same request, asked once
        for job in jobs:
            groups.setdefault((job["record"]["id"], job["think"], job["answer"]), []).append(job)
        todo = iter(groups.values())
        with ThreadPoolExecutor(self.concurrency) as pool:
            running = {}
            try:
                while True:
                    # keep the queue short: a killed run then loses only the requests actually in flight
                    while len(running) < 2 * self.concurrency and (group := next(todo, None)) is not None:
                        running[pool.submit(self._ask, group[0])] = group
                    if not running:
                        return
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        text, info = fut.result()
                        for i, job in enumerate(running.pop(fut)):
                            yield job["key"], text, info if i == 0 else {**info, "cached": True}
            finally:
                for fut in running:
                    fut.cancel()


def _failed(reason: str) -> dict:
    return {"prompt_tokens": 0, "completion_tokens": 0, "cached": False, "error": reason}


# ------------------------------------------------------------------------------------------------------------ local
class LocalTeacher:
    """A local checkpoint as the teacher, through the engine interface (greedy when temperature is 0)."""

    def __init__(self, gen, processor, max_tokens: int = 1024, temperature: float = 0.0, batch_size: int = 64):
        self.gen, self.processor = gen, processor
        self.max_tokens, self.temperature, self.batch_size = max_tokens, temperature, batch_size

    def reflect(self, jobs: list[dict]):
        for s in range(0, len(jobs), self.batch_size):
            chunk = jobs[s : s + self.batch_size]
            # the teacher's instruction goes in as the "question" of an RL record, with the question's images
            prompts_ = [
                data.render_prompt(
                    {"question": teacher_text(j), "images": j["record"]["images"], "choices": None},
                    prompts.TEACHER_SYSTEM,
                    self.processor,
                )
                for j in chunk
            ]
            outs = self.gen.generate(
                prompts_, 1, self.max_tokens, self.temperature or 1.0, 1.0, greedy=self.temperature == 0
            )
            for job, p, o in zip(chunk, prompts_, outs):
                info = {
                    "prompt_tokens": len(p["ids"]),
                    "completion_tokens": len(o[0]["ids"]),
                    "cached": False,
                    "error": None,
                }
                yield job["key"], o[0]["text"], info


# ----------------------------------------------------------------------------------------------------------- oracle
class OracleTeacher:
    """The tiny world's teacher: exact, free, and it reads the attempt's row-by-row counts."""

    def reflect(self, jobs: list[dict]):
        for job in jobs:
            prob = synthetic.problem_from_id(job["record"]["id"])
            if prob is None:
                yield job["key"], None, _failed("oracle_unknown_id")
                continue
            think2, answer2 = synthetic.chain(prob)
            reflection = synthetic.oracle_reflection(prob, job["think"], job["answer"])
            reply = f"<reflection>{reflection}</reflection> <think>{think2}</think> <answer>{answer2}</answer>"
            yield job["key"], reply, {"prompt_tokens": 0, "completion_tokens": 0, "cached": False, "error": None}


def make(cfg, out_dir: str):
    """The teacher --teacher names, built from the CurateConfig."""
    if cfg.teacher == "oracle":
        return OracleTeacher()
    if cfg.teacher == "openai":
        return OpenAITeacher(
            cfg.teacher_url,
            cfg.teacher_model,
            cfg.teacher_api_key_env,
            cfg.teacher_cache or str(Path(out_dir) / "teacher_cache"),
            cfg.teacher_concurrency,
            cfg.teacher_max_retries,
            cfg.teacher_timeout,
            cfg.teacher_max_tokens,
            cfg.teacher_temperature,
        )
    if cfg.teacher == "local":
        from nanosrpo import engine, model

        if not cfg.teacher_model:
            raise SystemExit("--teacher local needs --teacher_model (a checkpoint path or hub id)")
        policy, processor = model.load_policy(cfg.teacher_model)
        gen = engine.make(cfg, policy, processor, model.resolve(cfg.teacher_model))
        return LocalTeacher(gen, processor, cfg.teacher_max_tokens, cfg.teacher_temperature, cfg.gen_batch_size)
    raise SystemExit(f"unknown --teacher {cfg.teacher!r}: openai, local or oracle")
