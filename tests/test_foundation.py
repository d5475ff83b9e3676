"""The foundation: the tiny offline Qwen2.5-VL world, its processor, the synthetic task, data validation, config."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanosrpo import data, model, prompts, synthetic, tiny
from tests.conftest import ROOT


def _chat(prob, image_path):
    return [
        {"role": "system", "content": prompts.SRPO_SYSTEM},
        {
            "role": "user",
            "content": [{"type": "image", "image": str(image_path)}, {"type": "text", "text": prob.question}],
        },
        {"role": "assistant", "content": synthetic.one_round(prob)},
    ]


def test_tiny_model_roundtrip_forward_backward_generate(tiny_dir, tmp_path):
    policy, processor = model.load_policy(str(tiny_dir))  # the same from_pretrained path as a hub checkpoint
    assert type(policy).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__mro__[1].__name__ == "Qwen2_5_VLProcessor"
    for t in tiny.SPECIAL_TOKENS:
        assert processor.tokenizer.convert_tokens_to_ids(t) != processor.tokenizer.unk_token_id
    prob = synthetic.make_problem(0, 1, 0)
    synthetic.render(prob).save(tmp_path / "x.png")
    sample = data.tokenize_chat(processor, _chat(prob, tmp_path / "x.png"))
    # one image of 4x4 cells = 16 vision tokens after the 2x2 merge
    assert sum(i == policy.config.image_token_id for i in sample["input_ids"]) == 16
    batch = data.collate(processor, [sample, sample])
    out = policy(**{k: v for k, v in batch.items() if k != "loss_mask"})
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for n, p in policy.named_parameters() if "visual" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "the vision tower must get gradients"
    # sampled generation from a rendered prompt
    prompt = processor.apply_chat_template(
        _chat(prob, tmp_path / "x.png")[:2], tokenize=False, add_generation_prompt=True
    )
    enc = processor(text=[prompt], images=[synthetic.render(prob)], return_tensors="pt")
    gen = policy.generate(**enc, max_new_tokens=8, do_sample=True)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def test_tiny_build_is_deterministic_and_saves_all_parts(tmp_path):
    a = tiny.build_tiny(tmp_path / "a", size="0.2m", seed=3)
    tiny.build_tiny(tmp_path / "b", size="0.2m", seed=3)
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "chat_template.jinja",
    ]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert 1e5 < a["params"] < 1e6


def test_text_only_twin_shares_tokenizer(tmp_path):
    tiny.build_tiny(tmp_path / "vl", size="0.2m")
    tiny.build_tiny(tmp_path / "text", size="0.2m", text_only=True)
    twin, tok = model.load_policy(str(tmp_path / "text"))
    assert type(twin).__name__ == "Qwen2ForCausalLM"
    _, proc = model.load_policy(str(tmp_path / "vl"))
    text = synthetic.text_question(synthetic.make_problem(0, 1, 0))
    assert tok(text)["input_ids"] == proc.tokenizer(text)["input_ids"]
    out = twin.generate(**tok([text], return_tensors="pt"), max_new_tokens=4, do_sample=True)
    assert out.shape[1] > 4


def test_missing_model_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not a local directory"):
        model.resolve("nobody/no-such-model-xyz")


def _recount(img, n, color):
    """An independent recount from pixels: sample each cell's centre pixel."""
    rgb = synthetic.COLORS[color]
    return sum(
        img.getpixel((c * synthetic.CELL + 14, r * synthetic.CELL + 14)) == rgb for r in range(n) for c in range(n)
    )


def test_synthetic_answers_match_an_independent_recount():
    for i in range(300):
        difficulty = i % len(synthetic.LEVELS)
        prob = synthetic.make_problem(7, difficulty, i)
        img = synthetic.render(prob)
        n = len(prob.grid)
        assert img.size == (n * synthetic.CELL, n * synthetic.CELL)
        assert int(prob.answer) == sum(_recount(img, n, c) for c in prob.targets)
        # the question names the colours it asks about, and the chain's final total is the answer
        assert all(c in prob.question for c in prob.targets)
        assert synthetic.chain(prob)[1] == prob.answer


def test_synthetic_is_deterministic_and_flawed_chains_are_plausible():
    import random

    assert synthetic.make_problem(1, 2, 5) == synthetic.make_problem(1, 2, 5)
    assert synthetic.make_problem(1, 2, 5) != synthetic.make_problem(2, 2, 5)
    rng = random.Random(0)
    for i in range(100):
        prob = synthetic.make_problem(0, 1, i)
        counts = synthetic.flawed_counts(prob, rng)
        diffs = [abs(a - b) for a, b in zip(counts, prob.row_counts())]
        assert sorted(diffs) == [0] * (len(diffs) - 1) + [1]  # exactly one row off by one
        think, answer = synthetic.chain(prob, counts)
        assert answer != prob.answer
        reflection = synthetic.oracle_reflection(prob, think, answer)
        assert "wrong" in reflection and prob.answer not in reflection.split("so")[-1]
        ok_think, ok_answer = synthetic.chain(prob)
        assert "right" in synthetic.oracle_reflection(prob, ok_think, ok_answer)


def test_written_datasets_load_with_the_real_readers(tmp_path):
    rl = synthetic.write_rl_split(tmp_path, "train", 5, seed=0)
    recs = data.load_rl_records(rl)
    assert len(recs) == 5 and all(len(r["images"]) == 1 for r in recs)
    sft = synthetic.write_sft_split(tmp_path, "sft", 5, seed=0, system=prompts.SRPO_SYSTEM, reflection=True)
    chats = data.load_sft_records(sft)
    assert chats[0]["messages"][-1]["content"].count("<think>") == 2
    text = synthetic.write_rl_split(tmp_path, "text", 3, seed=0, text_only=True)
    assert "row 1:" in data.load_rl_records(text)[0]["question"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "a", "question": "q", "answer": "1"', "line 1: not valid JSON"),
        ('{"id": "a", "answer": "1"}', "field 'question'"),
        ('{"id": "a", "question": "q", "answer": ""}', "field 'answer'"),
        ('{"id": "a", "question": "q", "answer": "1", "image": "missing.png"}', "image file not found"),
        ('{"id": "a", "question": "q", "answer": "\\\\frac{"}', "field 'answer'"),
        ('{"id": "a", "question": "q", "answer": "1", "choices": []}', "field 'choices'"),
    ],
)
def test_bad_rl_records_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "ok", "question": "q", "answer": "2"}\n' + line.replace("line 1", "") + "\n")
    with pytest.raises(data.DataError) as e:
        data.load_rl_records(path)
    assert f"{path}:2" in str(e.value) and message.replace("line 1: ", "") in str(e.value)


def test_bad_sft_records_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "<image>hi"}], "images": []}) + "\n")
    with pytest.raises(data.DataError, match=rf"{path}:1: field 'images'"):
        data.load_sft_records(path)


def test_importing_the_package_is_light():
    code = (
        "import sys, nanosrpo; bad = [m for m in ('torch', 'transformers', 'vllm', 'flash_attn') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("script", ["train_sft.py", "train_grpo.py", "curate.py", "evaluate.py"])
def test_every_script_has_help(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--out_dir" in out.stdout and "--seed" in out.stdout


def test_config_yaml_preset_and_flags_precedence(tmp_path):
    from nanosrpo import config

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("seed: 5\nout_dir: from_yaml\n")
    cfg = config.parse(config.GRPOConfig, [str(cfg_file), "--out_dir", "from_cli"])
    assert (cfg.seed, cfg.out_dir) == (5, "from_cli")
    cfg_file.write_text("no_such_option: 1\n")
    with pytest.raises(SystemExit, match="no_such_option"):
        config.parse(config.GRPOConfig, [str(cfg_file)])


def test_missing_local_model_path_says_so():
    with pytest.raises(OSError, match="no such directory"):
        model.resolve("/nonexistent/policy")


@pytest.mark.parametrize("cls_name, field_name, value", [("SFTConfig", "lr", 1e-5), ("GRPOConfig", "lr", 1e-6)])
def test_paper_preset_reaches_each_script(cls_name, field_name, value):
    from nanosrpo import config

    cls = getattr(config, cls_name)
    default = config.parse(cls, [])
    cfg = config.parse(cls, ["--preset", "qwen2.5-vl-7b"])
    assert getattr(cfg, field_name) == value != getattr(default, field_name)
    assert config.parse(cls, ["--preset", "qwen2.5-vl-7b", "--lr", "0.5"]).lr == 0.5  # flags win over the preset


def test_single_cpu_process_uses_every_core_despite_launcher_default():
    """`accelerate launch` without a config exports OMP_NUM_THREADS=1; a single CPU process takes all cores back."""
    import psutil

    code = (
        "import torch; from accelerate import Accelerator; from nanosrpo import model; a = Accelerator(cpu=True); "
        "print(torch.get_num_threads(), model.use_cpu_cores(a), model.use_cpu_cores(a, 1))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", str(psutil.cpu_count(logical=False)), "1"]
