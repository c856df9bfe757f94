"""`lorafleet finetune` on the command line: bad flags and bad data give clear messages."""
from __future__ import annotations

import json
import sys

import pytest
from ft_task import write_jsonl

from lorafleet.coordinator.cli import main


def _run(capsys, *args) -> tuple[int, str]:
    try:
        code = main(["finetune", *args])
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture()
def base_args(ft_model, task_file, tmp_path):
    return ["--model", str(ft_model), "--data", str(task_file), "--output", str(tmp_path / "out"), "--quiet"]


@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], "argument --rank: must be positive, got 0"),
    (["--rank", "two"], "argument --rank: 'two' is not an integer"),
    (["--lr", "-1"], "argument --lr: must be positive"),
    (["--targets", "q,x"], "unknown target 'x'; choose from q, k, v, o, gate, up, down"),
    (["--density", "2", "--method", "sparse-lora"], "argument --density: is a fraction of each weight in (0, 1]"),
    (["--epochs", "1", "--max-steps", "3"], "argument --max-steps: not allowed with argument --epochs"),
    (["--method", "dora"], "argument --method: invalid choice: 'dora'"),
    (["--on-bad-line", "ignore"], "argument --on-bad-line: invalid choice: 'ignore'"),
])
def test_bad_flags_are_refused_by_the_parser(capsys, base_args, flags, message):
    code, err = _run(capsys, *base_args, *flags)
    assert code == 2 and message in err, err


@pytest.mark.parametrize("flags, message", [
    (["--density", "0.01"], "--density apply to --method sparse-lora only"),
    (["--admin-token-file", "/nonexistent"], "--push-name, --push-path and --admin-token-file go with --push-to SERVER"),
    (["--push-to", "127.0.0.1:1", "--admin-token-file", "/nonexistent/token"], "--admin-token-file /nonexistent/token: no such file"),
    (["--method", "sparse-lora", "--max-steps", "4", "--sparse-steps", "4"], "--sparse-steps must be between 1 and 3"),
    (["--method", "sparse-lora", "--rank", "100"], "--rank 100 is above the smaller dimension of model.layers.0"),
])
def test_bad_combinations_are_refused_before_training(capsys, base_args, tmp_path, flags, message):
    code, err = _run(capsys, *base_args, *flags)
    assert code == 2 and f"lorafleet finetune: error: {message}" in err, err
    assert not (tmp_path / "out").exists()


def test_bad_folders_are_refused(capsys, ft_model, task_file, tmp_path):
    code, err = _run(capsys, "--model", str(tmp_path), "--data", str(task_file), "--output", str(tmp_path / "o"))
    assert code == 2 and f"{tmp_path} is not a Hugging Face model folder (no config.json)" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, err = _run(capsys, "--model", str(ft_model), "--data", str(task_file), "--output", str(tmp_path / "full"))
    assert code == 2 and "is not empty; pass --overwrite to replace it" in err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    code, err = _run(capsys, "--model", str(ft_model), "--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o"))
    assert code == 2 and "none.jsonl: no such file" in err


def test_bad_data_lines_stop_the_run_or_are_skipped(capsys, ft_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}, '{"prompt": "a"',
                                                  {"prompt": "c", "completion": "d"}, {"messages": []}])
    args = ["--model", str(ft_model), "--data", str(data), "--output", str(tmp_path / "out"), "--max-steps", "2", "--quiet"]
    code, err = _run(capsys, *args)
    assert code == 2 and f"lorafleet finetune: error: {data}:2: not valid JSON" in err
    assert "pass --on-bad-line skip" in err and not (tmp_path / "out").exists()

    code, err = _run(capsys, *args, "--on-bad-line", "skip")
    assert code == 0, err
    assert f"{data}:2: skipped: not valid JSON" in err and f"{data}:4: skipped: \"messages\" must be a non-empty list" in err
    assert "2 training examples" in err and "(2 bad lines skipped)" in err
    report = json.loads((tmp_path / "out" / "finetune_report.json").read_text())
    assert [b["line"] for b in report["examples"]["skipped_lines"]] == [2, 4]


def test_without_the_train_extra_it_says_what_to_install(capsys, monkeypatch, base_args):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    code, err = _run(capsys, *base_args)
    assert code == 2 and "needs peft, which is not installed: pip install lorafleet[train]" in err
