"""`codeling eval` on a trained run: bits per byte, syntax validity, HumanEval, report card."""

from __future__ import annotations

import json
import shutil

from codeling.cli import main


def test_eval_command_writes_report(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    code = main(["eval", str(run), "--suite", "bpb,syntax,humaneval", "--humaneval-samples", "2",
                 "--humaneval-limit", "2", "--max-new-tokens", "12"])
    assert code == 0
    out = capsys.readouterr().out
    assert "# Report card" in out
    report = (run / "report.md").read_text()
    assert "| code |" in report
    assert "pass@1" in report
    assert "pass@10" not in report  # needs at least 10 samples
    results = json.loads((run / "eval" / "code.json").read_text())
    assert results["bpb"], "no held-out split was scored"
    for value in results["bpb"].values():
        assert 0 < value["bits_per_byte"] < 10
    assert results["syntax"]["rates"]["all"]["samples"] == 6 * 4


def test_report_command_rewrites_card(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "| code |" in report
    assert "![code loss](code/loss.png)" in report
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_eval_rejects_unknown_suite(trained_run, capsys):
    assert main(["eval", str(trained_run), "--suite", "bpb,vibes"]) == 2
    assert "vibes" in capsys.readouterr().err
