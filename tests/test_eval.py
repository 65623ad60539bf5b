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
    latest = (run / "code" / "checkpoints" / "latest").read_text().strip()
    assert f"Evaluated checkpoints: code `{latest}`." in report
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


def test_report_lists_each_validation_split_once(tmp_path):
    """A last step evaluated twice (eval_every and the end of the run) shows once per split."""
    from codeling.evaluation.suite import write_report

    stage = tmp_path / "code"
    stage.mkdir()
    records = [{"step": 10, "loss": 4.0, "tokens": 1000, "elapsed": 60.0}]
    for loss in (3.5, 3.25):  # the second evaluation of step 10 is the one to show
        records += [{"step": 10, "split": "python-stdlib", "val_loss": loss,
                     "val_bits_per_byte": 2.0, "tokens": 1000, "elapsed": 60.0},
                    {"step": 10, "split": "shell-scripts", "val_loss": loss + 1,
                     "val_bits_per_byte": 3.0, "tokens": 1000, "elapsed": 60.0}]
    (stage / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    report = write_report(tmp_path).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| code |"))
    assert row.count("python-stdlib") == 1
    assert row.count("shell-scripts") == 1
    assert "python-stdlib 3.250 / 2.000; shell-scripts 4.250 / 3.000" in row


def test_eval_keeps_saved_results(trained_run, tmp_path, monkeypatch):
    """A second suite adds to the latest checkpoint's results, and an earlier checkpoint's
    results go to their own file, so neither replaces what the report card shows."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    latest = (run / "code" / "checkpoints" / "latest").read_text().strip()
    assert main(["eval", str(run), "--suite", "bpb"]) == 0
    assert main(["eval", str(run), "--suite", "copying"]) == 0
    saved = json.loads((run / "eval" / "code.json").read_text())
    assert "bpb" in saved
    assert "copying" in saved
    assert saved["checkpoint"].endswith(latest)

    earlier = run / "code" / "checkpoints" / "step-000001"
    shutil.copytree(run / "code" / "checkpoints" / latest, earlier)
    assert main(["eval", str(earlier), "--suite", "copying"]) == 0
    side = json.loads((run / "eval" / "code-step-000001.json").read_text())
    assert side["checkpoint"] == str(earlier)
    assert json.loads((run / "eval" / "code.json").read_text()) == saved

    (run / "code" / "checkpoints" / "latest").write_text("step-999999\n")  # a deleted one
    assert main(["eval", str(earlier), "--suite", "bpb"]) == 0
    assert "bpb" in json.loads((run / "eval" / "code-step-000001.json").read_text())
    (run / "code" / "checkpoints" / "latest").write_text(latest + "\n")

    monkeypatch.chdir(tmp_path)  # the same checkpoint by a relative path still adds
    assert main(["eval", f"run/code/checkpoints/{latest}", "--suite", "bpb"]) == 0
    assert "copying" in json.loads((run / "eval" / "code.json").read_text())


def test_eval_merges_from_any_directory(trained_run, tmp_path, monkeypatch):
    """Saved checkpoint paths are absolute, so a later eval from another directory (or by
    "." inside the checkpoint) still finds the same checkpoint and adds to its results."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    latest = run / "code" / "checkpoints" / (run / "code" / "checkpoints" / "latest").read_text(
        ).strip()
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "run", "--suite", "bpb"]) == 0
    monkeypatch.chdir(latest)
    assert main(["eval", ".", "--suite", "copying"]) == 0
    monkeypatch.chdir(latest.parent)
    assert main(["eval", "latest", "--suite", "syntax", "--max-new-tokens", "4"]) == 0
    saved = json.loads((run / "eval" / "code.json").read_text())
    assert saved["checkpoint"] == str(latest)
    for suite in ("bpb", "copying", "syntax"):
        assert suite in saved


def test_eval_replaces_unreadable_results(trained_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "eval").mkdir(exist_ok=True)
    broken_files = ["{not json", "[1, 2]", '{"checkpoint": 5, "bpb": {}}', b"\xff\xfe{"]
    for broken in broken_files:
        path = run / "eval" / "code.json"
        path.write_bytes(broken if isinstance(broken, bytes) else broken.encode())
        assert main(["eval", str(run), "--suite", "copying"]) == 0, broken
        assert "copying" in json.loads(path.read_text())
    (run / "eval" / "language.json").write_text("{not json")  # another stage's file
    assert main(["report", str(run)]) == 0
    assert "ignoring unreadable eval results" in caplog.text
    (run / "eval" / "code.json").write_text('{"checkpoint": "x", "bpb": 5, "syntax": "no"}')
    assert main(["report", str(run)]) == 0
    assert "ignoring the bpb, syntax results" in caplog.text


def test_eval_rejects_a_directory_as_results_file(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "eval" / "code.json").mkdir(parents=True)
    assert main(["eval", str(run), "--suite", "copying"]) == 2
    assert "move it aside" in capsys.readouterr().err
    assert not list((run / "eval").glob(".*.tmp"))


def test_eval_rejects_empty_suite_list(trained_run, capsys):
    assert main(["eval", str(trained_run), "--suite", " , "]) == 2
    assert "names no suite" in capsys.readouterr().err
