"""`codeling pipeline`: plan validation, offline fallback, replay, skip and resume."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import yaml

from codeling.cli import main
from codeling.config import REPO_ROOT
from codeling.errors import ConfigError
from codeling.stages.pipeline import build_plan

STDLIB = sysconfig.get_paths()["stdlib"]


def recipe(tmp_path: Path, **stages) -> dict:
    train = dict(batch_size=4, seq_len=32, max_steps=4, warmup_steps=1, eval_every=2,
                 eval_batches=2, checkpoint_every=2, log_every=1, precision="fp32")
    return {
        "name": "tiny", "run_dir": str(tmp_path / "run"),
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
        "tokenizer": {"vocab_size": 512, "max_bytes_per_source": 200_000,
                      "sources": ["tinystories", f"files:{STDLIB}/email/*.py"]},
        "data": {"fallback_sources": [f"files:{STDLIB}/unittest/*.py", f"files:{STDLIB}/json/*.py"],
                 "val_fraction": 0.3},
        "train": train,
        "stages": stages or {
            "tokenizer": {}, "data": {},
            "language": {"data": {"sources": ["tinystories"]}},
            "code": {"init_from": "language",
                     "data": {"sources": [f"files:{STDLIB}/email/*.py"], "replay_fraction": 0.25}},
            "eval": {"suites": ["bpb", "syntax", "humaneval"], "humaneval_samples": 2,
                     "humaneval_limit": 2, "syntax_samples": 1, "max_new_tokens": 16},
        },
    }


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_shipped_recipes_validate():
    for path in sorted((REPO_ROOT / "configs" / "pipelines").glob("*.yaml")):
        plan = build_plan(str(path))
        assert "language" in plan.configs, path.name
        assert plan.configs["code"].init_from == "language"


def test_plan_reports_all_problems(tmp_path):
    data = recipe(tmp_path)
    data["stages"]["language"]["train"] = {"lr": -1}
    data["stages"]["code"]["data"]["colour"] = "red"
    data["stages"]["polish"] = {}
    with pytest.raises(ConfigError) as info:
        build_plan(str(write(tmp_path, data)))
    message = str(info.value)
    assert "stages.language" in message
    assert "train.lr" in message
    assert "data.colour" in message
    assert "'polish'" in message
    assert not (tmp_path / "run").exists()


def test_stages_out_of_order(tmp_path):
    data = recipe(tmp_path)
    data["stages"] = {"code": {}, "language": {}}
    with pytest.raises(ConfigError, match="out of order"):
        build_plan(str(write(tmp_path, data)))


def test_pipeline_runs_skips_and_resumes(tmp_path, offline, capsys):
    path = write(tmp_path, recipe(tmp_path))
    assert main(["pipeline", str(path)]) == 0
    run = tmp_path / "run"
    language = json.loads((run / "language" / "done.json").read_text())
    assert language["sources"] == [f"files:{STDLIB}/unittest/*.py", f"files:{STDLIB}/json/*.py"]
    code_config = yaml.safe_load((run / "code" / "config.yaml").read_text())
    assert code_config["data"]["replay_sources"] == language["sources"]
    assert code_config["init_from"] == "language"
    code_metrics = (run / "code" / "metrics.jsonl").read_text()
    assert "unittest" in code_metrics  # replayed first-stage data is evaluated too

    report = (run / "report.md").read_text()
    assert "| language |" in report
    assert "| code |" in report
    assert "## Bits per byte on held-out data" in report
    assert "## Syntax validity" in report
    assert "2 problems, 2 samples each" in report
    assert "## Samples (code)" in report
    results = json.loads((run / "eval" / "code.json").read_text())
    assert results["checkpoint"].endswith("step-000004")
    assert results["humaneval"]["problems"] == 2
    language_results = json.loads((run / "eval" / "language.json").read_text())
    assert set(language_results) >= {"bpb", "checkpoint"}
    assert "humaneval" not in language_results
    assert "| source | language | code |" in report

    before = {p: p.stat().st_mtime_ns for p in run.rglob("metrics.jsonl")}
    before[run / "report.md"] = (run / "report.md").stat().st_mtime_ns
    assert main(["pipeline", str(path)]) == 0
    after = {p: p.stat().st_mtime_ns for p in run.rglob("metrics.jsonl")}
    after[run / "report.md"] = (run / "report.md").stat().st_mtime_ns
    assert after == before

    (run / "code" / "done.json").unlink()  # as if the run was killed after its checkpoint
    assert main(["pipeline", str(path), "--set", "train.max_steps=6"]) == 0
    steps = [json.loads(line)["step"] for line in
             (run / "code" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (run / "code" / "checkpoints" / "latest").read_text().strip() == "step-000006"
