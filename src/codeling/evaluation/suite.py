"""`codeling eval` and the pipeline's eval stage: run the suites and write the report card.

Suites:
    bpb        bits per byte on the held-out split of every prepared source of the run
    syntax     share of sampled Python completions that `ast.parse` accepts and of Bash
               completions that `bash -n` accepts
    humaneval  pass@1 and pass@10 on HumanEval, completions executed in `codeling.sandbox`

The report card `report.md` has one row per training stage (its budget and final validation
losses), links each stage's loss plot, and lists the suites' results for the final checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from codeling.config import _build, option
from codeling.errors import ConfigError
from codeling.inference.generate import Generator
from codeling.training import checkpoint as ckpt

log = logging.getLogger(__name__)

SUITES = ["bpb", "syntax", "humaneval"]
TRAINING_STAGES = ("language", "code", "tools", "rlhf", "train", "quickstart")

SYNTAX_PROMPTS = [
    ("python", "def parse_args(argv):\n"),
    ("python", "import os\n\n\ndef read_lines(path):\n"),
    ("python", "class Counter:\n    def __init__(self):\n"),
    ("python", "def is_prime(n):\n    \"\"\"Return True if n is a prime number.\"\"\"\n"),
    ("bash", "#!/bin/sh\n# Count the files in each directory given as an argument.\n"),
    ("bash", "#!/bin/bash\nset -euo pipefail\n\nfor file in \"$@\"; do\n"),
]


@dataclass
class EvalConfig:
    """Settings of the evaluation suites."""

    suites: list[str] = option(list(SUITES), "suites to run: bpb, syntax, humaneval",
                               choices=SUITES)
    humaneval_samples: int = option(10, "completions sampled per HumanEval problem; pass@10 "
                                    "needs at least 10", min=1)
    humaneval_limit: int = option(0, "evaluate only the first N HumanEval problems; 0 = all",
                                  min=0)
    syntax_samples: int = option(4, "completions sampled per syntax prompt", min=1)
    max_new_tokens: int = option(256, "tokens generated at most per completion", min=1)
    temperature: float = option(0.8, "sampling temperature for syntax and HumanEval", min=0.0)
    bpb_max_tokens: int = option(0, "held-out tokens scored per source for bpb; 0 = all", min=0)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")


def build_eval_config(settings: dict, source: str = "eval") -> EvalConfig:
    """Validate eval settings and return an EvalConfig, raising one ConfigError for all problems."""
    problems: list[str] = []
    config = _build(EvalConfig, settings, "", problems)
    if problems:
        raise ConfigError(problems, source=source)
    return config


# -- the report card -----------------------------------------------------------------------------


def _stage_rows(run_dir: Path) -> list[str]:
    rows = []
    for stage in TRAINING_STAGES:
        metrics = run_dir / stage / "metrics.jsonl"
        if not metrics.is_file():
            continue
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        steps = [r for r in records if "loss" in r]
        if not steps:
            continue
        last_step = max(r["step"] for r in records if "val_loss" in r) if any(
            "val_loss" in r for r in records) else None
        val = "; ".join(f"{r['split']} {r['val_loss']:.3f} / {r['val_bits_per_byte']:.3f}"
                        for r in records if "val_loss" in r and r["step"] == last_step)
        done = run_dir / stage / "done.json"
        sources = ", ".join(json.loads(done.read_text())["sources"]) if done.is_file() else "-"
        rows.append(f"| {stage} | {sources} | {steps[-1]['step']} | "
                    f"{steps[-1]['tokens'] / 1e6:.2f}M | {steps[-1]['elapsed'] / 60:.1f} min | "
                    f"{steps[-1]['loss']:.3f} | {val or '-'} | [loss plot]({stage}/loss.png) |")
    return rows


def write_report(run_dir: Path, checkpoint: Path, results: dict) -> Path:
    """Write report.md: one row per stage, then the suites' results for `checkpoint`."""
    lines = ["# Report card", "", f"Run: `{run_dir}`. Evaluated checkpoint: `{checkpoint}`.", ""]
    rows = _stage_rows(run_dir)
    if rows:
        lines += ["## Stages", "",
                  "| stage | data | steps | tokens | time | final train loss | "
                  "validation loss / bits per byte | plot |", "|---|---|---|---|---|---|---|---|"]
        lines += rows + [""]
    if "bpb" in results:
        lines += ["## Bits per byte on held-out data", "", "| source | bits per byte | tokens |",
                  "|---|---|---|"]
        lines += [f"| {name} | {value['bits_per_byte']:.3f} | {value['tokens']:,} |"
                  for name, value in results["bpb"].items()]
        lines.append("")
    if "syntax" in results:
        lines += ["## Syntax validity of sampled completions", "", "| language | valid | samples |",
                  "|---|---|---|"]
        lines += [f"| {language} | {100 * value['valid_rate']:.1f}% | {value['samples']} |"
                  for language, value in results["syntax"].items()]
        lines.append("")
    if "humaneval" in results:
        human = results["humaneval"]
        scores = ", ".join(f"{key} {100 * value:.1f}%" for key, value in human["pass_at_k"].items())
        lines += ["## HumanEval", "", f"{human['problems']} problems, {human['samples']} samples "
                  f"each, temperature {human['temperature']}: {scores}.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# -- running the suites ----------------------------------------------------------------------------


def run_dir_of(checkpoint: Path) -> Path:
    """Return the run directory of a checkpoint at <run>/<stage>/checkpoints/step-N."""
    return checkpoint.parents[2]


def run_bpb(generator: Generator, run_dir: Path, config: EvalConfig) -> dict:
    """Score bits per byte on the val split of every prepared source made with this tokenizer."""
    from codeling.data.shards import read_manifest
    from codeling.evaluation.bits_per_byte import evaluate_prepared_source

    fingerprint = generator.tokenizer.fingerprint
    results = {}
    for data_dir in sorted(p for p in (run_dir / "data").glob("*") if p.is_dir()):
        if not (data_dir / "manifest.json").is_file():
            continue
        manifest = read_manifest(data_dir)
        if manifest["tokenizer_fingerprint"] != fingerprint or not manifest["splits"]["val"]["tokens"]:
            continue
        result = evaluate_prepared_source(
            generator.model, data_dir, batch_size=8, device=generator.device,
            bf16=generator.bf16, max_tokens=config.bpb_max_tokens or None,
            tokenizer_fingerprint=fingerprint)
        results[data_dir.name] = result
        log.info("bpb: %s %.3f bits/byte over %d tokens", data_dir.name,
                 result["bits_per_byte"], result["tokens"])
    return results


def run_syntax(generator: Generator, config: EvalConfig) -> dict:
    from codeling.evaluation.syntax import syntax_validity

    result = syntax_validity(generator, SYNTAX_PROMPTS, n_samples=config.syntax_samples,
                             temperature=config.temperature,
                             max_new_tokens=min(config.max_new_tokens, 128),
                             stop=("\n\n\n", "\ndef ", "\nclass ", "\nif __name__"))
    for language, rate in result["rates"].items():
        log.info("syntax: %s %.1f%% of %d samples valid", language, 100 * rate["rate"],
                 rate["samples"])
    return result


def run_humaneval(generator: Generator, config: EvalConfig) -> dict:
    from codeling.evaluation.humaneval import evaluate

    k = tuple(value for value in (1, 10) if value <= config.humaneval_samples)
    result = evaluate(generator, n_samples=config.humaneval_samples, k=k,
                      limit=config.humaneval_limit or None, temperature=config.temperature,
                      max_new_tokens=config.max_new_tokens)
    log.info("HumanEval: %s on %d problems", ", ".join(
        f"{key} {100 * value:.1f}%" for key, value in result["pass_at_k"].items()),
        result["problems"])
    return result


def run_suites(checkpoint: Path, config: EvalConfig, run_dir: Path | None = None) -> dict:
    """Run the configured suites on one checkpoint; return their results by suite name."""
    generator = Generator.from_checkpoint(checkpoint, device=config.device)
    run_dir = run_dir or run_dir_of(checkpoint)
    results: dict = {"checkpoint": str(checkpoint)}
    started = time.perf_counter()
    if "bpb" in config.suites:
        results["bpb"] = run_bpb(generator, run_dir, config)
    if "syntax" in config.suites:
        results["syntax"] = run_syntax(generator, config)
    if "humaneval" in config.suites:
        results["humaneval"] = run_humaneval(generator, config)
    results["seconds"] = time.perf_counter() - started
    return results


def evaluate_run(target: Path, config: EvalConfig) -> tuple[Path, dict]:
    """Evaluate the newest checkpoint under `target`, save eval.json and write the report card."""
    checkpoint = ckpt.resolve_checkpoint(target)
    run_dir = run_dir_of(checkpoint)
    results = run_suites(checkpoint, config, run_dir)
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    temporary = out_dir / ".results.json.tmp"
    temporary.write_text(json.dumps(results, indent=2))
    os.replace(temporary, out_dir / "results.json")
    report = write_report(run_dir, checkpoint, _summary_for_report(results, config))
    log.info("report card: %s", report)
    return report, results


def _summary_for_report(results: dict, config: EvalConfig) -> dict:
    summary: dict = {}
    if "bpb" in results:
        summary["bpb"] = results["bpb"]
    if "syntax" in results:
        summary["syntax"] = {language: {"valid_rate": rate["rate"], "samples": rate["samples"]}
                             for language, rate in results["syntax"]["rates"].items()}
    if "humaneval" in results:
        human = results["humaneval"]
        summary["humaneval"] = {"problems": human["problems"], "samples": human["n_samples"],
                                "temperature": config.temperature,
                                "pass_at_k": human["pass_at_k"]}
    return summary


def run_eval_stage(run_dir: Path, config: EvalConfig) -> None:
    """The pipeline's eval stage: evaluate the run's newest checkpoint unless already done."""
    done = run_dir / "eval" / "done.json"
    if done.is_file():
        log.info("stage eval: done (%s exists), skipping", done)
        return
    report, results = evaluate_run(run_dir, config)
    temporary = run_dir / "eval" / ".done.tmp"
    temporary.write_text(json.dumps({"checkpoint": results["checkpoint"],
                                     "report": str(report)}, indent=2))
    os.replace(temporary, done)


def eval_command(args) -> Path:
    """`codeling eval`: run the chosen suites and print where the report card is."""
    suites = [name.strip() for name in args.suite.split(",") if name.strip()]
    config = build_eval_config({"suites": suites, "humaneval_samples": args.humaneval_samples,
                                "humaneval_limit": args.humaneval_limit,
                                "max_new_tokens": args.max_new_tokens, "device": args.device},
                               source="codeling eval")
    report, _ = evaluate_run(Path(args.checkpoint), config)
    print(report.read_text())
    print(f"report card: {report}")
    return report
