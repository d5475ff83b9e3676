"""bench/memory_plan.py: parameter counts, byte formulas on hand-computed toy cases, the preset run, the CPU check."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("memory_plan", ROOT / "bench" / "memory_plan.py")
mp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mp)

# A toy text-only architecture small enough to do every formula by hand.
TOY = mp.Arch(vocab=10, hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, head_dim=2, tied=True)


def test_param_count_7b_by_hand():
    a = mp.arch_from_config(mp.QWEN25_VL_7B_CONFIG)
    p = mp.param_counts(a)
    # q 3584*3584+3584, k and v 3584*512+512 each, o 3584*3584, MLP 3*3584*18944, two norms 2*3584
    assert p["layer"] == 12_848_640 + 2 * 1_835_520 + 12_845_056 + 203_685_888 + 7_168 == 233_057_792
    assert p["text"] == 2 * 152_064 * 3_584 + 28 * 233_057_792 + 3_584 == 7_615_616_512  # untied embed + lm_head
    # block: norms 2*1280, qkv 1280*3840+3840, proj 1280^2+1280, gate/up 2*(1280*3420+3420), down 3420*1280+1280
    assert p["vision_block"] == 2_560 + 4_919_040 + 1_639_680 + 8_762_040 + 4_378_880 == 19_702_200
    # patch conv 3*2*14*14*1280; merger ln 1280, 5120^2+5120, 5120*3584+3584
    assert p["vision"] == 32 * 19_702_200 + 1_505_280 + 1_280 + 26_214_400 + 5_120 + 18_350_080 + 3_584 == 676_550_144
    assert p["total"] == 8_292_166_656  # the model card's "8.29B"
    assert mp.trainable_params(a, freeze_vision=True) == 7_615_616_512


def test_param_count_7b_equals_transformers_model_on_meta():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(**mp.QWEN25_VL_7B_CONFIG)
    with torch.device("meta"):  # no memory: shapes only
        m = Qwen2_5_VLForConditionalGeneration(cfg)
    assert (
        sum(p.numel() for p in m.parameters()) == mp.param_counts(mp.arch_from_config(mp.QWEN25_VL_7B_CONFIG))["total"]
    )


@pytest.mark.parametrize("size,text_only", [("1m", False), ("0.2m", True)])
def test_param_count_equals_built_tiny_model(tmp_path, size, text_only):
    from nanosrpo import model, tiny

    info = tiny.build_tiny(tmp_path / "m", size=size, text_only=text_only)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    a = mp.arch_from_config(cfg)
    assert a.tied and (a.v_depth == 0) == text_only
    assert mp.param_counts(a)["total"] == info["params"]
    policy, _ = model.load_policy(str(tmp_path / "m"))
    model.freeze_vision(policy)
    assert mp.trainable_params(a, freeze_vision=True) == sum(p.numel() for p in policy.parameters() if p.requires_grad)


def test_activation_bytes_toy_by_hand():
    # per token, s = 2, T = 2: norms 2*(4*4 + 2*2*4) = 64; q, k, v, out 4*2*(2*2) = 32; the mask copy s*T = 4;
    # logsumexp 4*2 = 8; SwiGLU 4*2*8 = 64
    assert mp.layer_activation_bytes_per_token(TOY, 2, T=2) == 64 + 32 + 4 + 8 + 64 == 172
    act = mp.activation_bytes(TOY, B=1, T=2, s=2, checkpointing=False)
    assert act["stored"] == 2 * (172 + 2 * 2 * 2) == 360  # + cos/sin 2*s*d
    assert act["head"] == 2 * (4 * 4 + 2 * 2 * 4) == 64
    assert act["logits"] == 2 * 2 * 10 == 40
    assert act["loss_bwd"] == 2 * 2 * 2 * 10 + 3 * 4 * 10 * 2 == 320  # chunk rows c = min(1024, B*T) = 2
    assert act["layer_bwd"] == 2 * (2 * 2 * 8 + 2 * 2 * 4) == 96
    assert act["peak"] == 360 + max(64 + 40 + 320, 96) == 784
    ckpt = mp.activation_bytes(TOY, B=1, T=2, s=2, checkpointing=True)
    assert ckpt["stored"] == 2 * (2 * 4 + 8) + 1 * 2 * 2 == 36  # only each layer's input s*h, + the bool mask B*T*T
    assert ckpt["layer_bwd"] == 2 * (172 + 32 + 16) == 440
    assert ckpt["peak"] == 36 + max(424, 440) == 476
    assert (
        mp.activation_bytes(TOY, 1, 2, 4, False)["loss_bwd"] == 2 * 2 * 4 * 10 + 2 * 4 * 10 * 2
    )  # fp32: no float copy


def test_fsdp_buffers_and_kv_cache_7b_by_hand():
    a = mp.arch_from_config(mp.QWEN25_VL_7B_CONFIG)
    root = 1_505_280 + 44_574_464  # patch conv + merger, frozen: no grads
    tail = 152_064 * 3_584 + 3_584  # lm_head + final norm: params and their unsharded grads
    assert mp.fsdp_buffer_bytes(a, freeze_vision=True) == 2 * (root + 2 * tail + 233_057_792) == 2_738_278_912
    assert mp.vllm_bytes(a, 80 * mp.GiB, 0.5)["kv_per_token"] == 2 * 28 * 4 * 128 * 2 == 57_344


def test_checkpoint_bytes_7b_by_hand():
    """Per rank of 8: the rank's shard of fp32 weights (all 8.29B) + AdamW m, v (the 7.62B trainable), one file each;
    a bf16 policy/ gathered on rank 0 only; tensor-by-tensor staging bounded by the embedding's shard."""
    a = mp.arch_from_config(mp.QWEN25_VL_7B_CONFIG)
    c = mp.checkpoint_bytes(a, freeze_vision=True, N=8)
    P, P_tr = 8_292_166_656, 8_292_166_656 - 676_550_144
    assert c["state_per_rank"] == (4 * P + 8 * P_tr) / 8 == 11_761_699_840
    assert c["state_total"] == c["before_rank0"] == 94_093_598_720  # ~33 GB weights + ~61 GB AdamW
    assert c["policy"] == c["host_export_rank0"] == 2 * P
    assert c["host_save"] == c["host_resume"] == 4 * 152_064 * 3_584 / 8
    assert c["gpu_export"] == 2 * 152_064 * 3_584
    assert mp.checkpoint_bytes(a, freeze_vision=True, N=8, export_bytes=4)["policy"] == 4 * P


def test_plan_rows_toy(monkeypatch):
    cfg = mp.preset_config("")  # GRPOConfig defaults: micro_batch_size 16, max_new_tokens 200, transformers engine
    cfg.micro_batch_size, cfg.max_new_tokens, cfg.engine = 1, 1, "transformers"
    r = mp.plan(TOY, cfg, gpus=2, gpu_gib=1.0, prompt_len=1, overhead_gib=0.0)
    P = 10 * 4 + (4 * 4 + 4 + 2 * (4 * 2 + 2) + 4 * 4 + 3 * 4 * 8 + 2 * 4) + 4  # tied embed, one layer, final norm
    assert r["params"]["total"] == P == 204
    rows = {name.split(",")[0]: (tr, ro) for name, tr, ro, _ in r["rows"]}
    assert rows["weights"] == (4 * 204 / 2, 4 * 204 / 2)
    assert rows["gradients"] == (4 * 204 / 2, 0)
    assert rows["AdamW m + v"] == (8 * 204 / 2, 8 * 204 / 2)
    assert (
        r["train"] == 16 * 204 / 2 + mp.fsdp_buffer_bytes(TOY, True) + mp.activation_bytes(TOY, 1, 2, 2, False)["peak"]
    )


def test_preset_7b_script_runs():
    out = subprocess.run(
        [sys.executable, "bench/memory_plan.py", "--preset", "qwen2.5-vl-7b", "--gpus", "8", "--gpu_gb", "80"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "8.292B total" in text and "micro-batch 4 x 3072 tokens" in text  # the preset's numbers, read from config
    weights = next(line for line in text.splitlines() if line.startswith("weights, fp32"))
    assert weights.split()[4:6] == ["3.86", "3.86"]  # 4 B x 8.292e9 / 8 GPUs = 3.86 GiB
    assert "FITS in 80 GiB" in text
    assert "state/   10.95 GiB on disk per rank" in text and "policy/  15.45 GiB on disk (bf16)" in text


def test_model_config_errors(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama"}))
    out = subprocess.run(
        [sys.executable, "bench/memory_plan.py", "--model_config", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "model_type 'llama'" in out.stderr and "Traceback" not in out.stderr


def test_cpu_step_matches_plan():
    """One real fp32 GRPO micro-batch on the tiny 10m model: measured live bytes vs the plan's formulas."""
    (res,) = mp.check_tiny([(2, 256, False)], out=lambda *_: None)
    m, p = res["measured"], res["planned"]
    assert abs(m["grads"] / p["grads"] - 1) < 0.01
    assert abs(m["adam"] / p["adam"] - 1) < 0.01
    assert abs(m["kept"] / p["kept"] - 1) < 0.10
    assert abs(m["activations"] / p["activations"] - 1) < 0.10
