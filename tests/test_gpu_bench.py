"""bench/gpu.py without a GPU: it refuses in one line, its FLOP count by hand, its model configs' parameter counts."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_refuses_on_cpu_in_one_line():
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--size", "3b"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1
    assert r.stdout == "" and r.stderr.strip().splitlines() == [
        "bench/gpu.py measures a CUDA GPU and there is none here (torch.cuda.is_available() is False)"
    ]


def test_train_flops_by_hand():
    # 6 * 1000 * (3 + 5) = 48,000; 12 * 2 * 8 * (3^2 + 5^2) = 6,528; 2 * 100 * 10 = 2,000
    assert gpu.train_flops(1000, 2, 8, [3, 5], n_vision_params=100, n_patches=10) == 56_528
    # attention grows with each sequence's own square: one sequence of 8 costs more than 3 + 5 packed
    assert gpu.train_flops(1000, 2, 8, [8]) - gpu.train_flops(1000, 2, 8, [3, 5]) == 12 * 2 * 8 * (64 - 34)


def test_shared_flops_by_hand():
    # prompt 3, completions 2 and 4: 6 * 1000 * 9 = 54,000; 12 * 2 * 8 * (9 + 2*5 + 4*7) = 9,024; the tower 2,000
    assert gpu.shared_flops(1000, 2, 8, 3, [2, 4], n_vision_params=100, n_patches=10) == 65_024
    # the same samples padded (5 and 7 tokens): the prompt twice, and attention over the full squares
    assert gpu.train_flops(1000, 2, 8, [5, 7]) == 86_208


def test_peak_by_device_name():
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_tflops("a CPU") is None


@pytest.mark.parametrize("size,params", [("7b", 8_292_166_656), ("3b", 3_754_622_976)])
def test_configs_build_the_released_sizes(size, params):
    """The released models' parameter counts (7B: the model card's 8.29B, bench/memory_plan.py's exact count;
    3B: 3.75B), built on the meta device (no memory, no weights)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        m = Qwen2_5_VLForConditionalGeneration(gpu.qwen25_vl_config(size))
    assert sum(p.numel() for p in m.parameters()) == params
    assert (
        m.config.vision_config.hidden_size == 1280
        and m.config.vision_config.out_hidden_size == gpu.SIZES[size]["hidden"]
    )
