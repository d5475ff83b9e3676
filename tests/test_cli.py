"""A user's mistake on the command line is one clear line and a non-zero exit, never a traceback."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run(*argv):
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    return p.returncode, lines


@pytest.mark.parametrize("script", ["train_grpo.py", "train_sft.py", "curate.py", "evaluate.py"])
def test_mistyped_flag(script):
    code, lines = run(script, "--lrr", "1e-3")
    assert code != 0 and not any("Traceback" in line for line in lines)
    assert lines[-1] == "unknown option(s) ['--lrr', '1e-3']; see --help"


@pytest.mark.parametrize("script", ["train_grpo.py", "train_sft.py"])
def test_missing_data_file(script, tiny_dir, tmp_path):
    missing = tmp_path / "nope.jsonl"
    no_eval = ["--eval_data", ""] if script == "train_grpo.py" else []
    code, lines = run(
        script, "--model", str(tiny_dir), "--data", str(missing), *no_eval, "--out_dir", str(tmp_path / "out")
    )
    assert code == 2 and not any("Traceback" in line for line in lines)
    assert lines[-1] == f"error: {missing}: data file not found"


def test_bad_record_names_file_line_and_field(tiny_dir, tmp_path):
    bad = tmp_path / "rl.jsonl"
    bad.write_text(
        json.dumps({"id": "a", "question": "q", "answer": "1"}) + "\n" + json.dumps({"id": "b", "question": "q"}) + "\n"
    )
    code, lines = run(
        "train_grpo.py",
        "--model",
        str(tiny_dir),
        "--data",
        str(bad),
        "--eval_data",
        "",
        "--out_dir",
        str(tmp_path / "out"),
    )
    assert code == 2 and not any("Traceback" in line for line in lines)
    assert lines[-1] == f"error: {bad}:2: field 'answer' is missing or empty"


def test_missing_model_directory(tmp_path):
    code, lines = run(
        "train_grpo.py",
        "--model",
        str(tmp_path / "no-model"),
        "--data",
        "x.jsonl",
        "--eval_data",
        "",
        "--out_dir",
        str(tmp_path / "out"),
    )
    assert code == 2 and not any("Traceback" in line for line in lines)
    assert lines[-1] == f"error: model '{tmp_path / 'no-model'}': no such directory"
