import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# No test may touch the network: the hub is unreachable here anyway, so fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL policy (0.2M params) built once per test session and saved with save_pretrained."""
    from nanosrpo import tiny

    path = tmp_path_factory.mktemp("tiny") / "policy"
    tiny.build_tiny(path, size="0.2m", seed=0)
    return path


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end runs (minutes on a 2-core CPU); CI runs them, -m 'not slow' skips"
    )
