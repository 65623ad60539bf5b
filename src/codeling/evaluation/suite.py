"""`codeling eval` and the pipeline's eval stage: run the suites and write the report card.

Suites:
    bpb        bits per byte on the held-out split of every prepared source of the run
    copying    loss and top-1 accuracy on the second pass of repeated random token sequences:
               whether the model can copy from its context, as tool-call arguments need (see
               `codeling.evaluation.copying`)
    syntax     share of sampled Python completions that `ast.parse` accepts and of Bash
               completions that `bash -n` accepts
    humaneval  pass@1 and pass@10 on HumanEval, completions executed in `codeling.sandbox`
    tools      function calling on the run's held-out tool conversations (see
               `codeling.evaluation.tools`), with and without constrained decoding
    preferences  share of held-out preference pairs whose chosen response the model finds more
               likely, and DPO reward accuracy for a DPO-tuned checkpoint (see
               `codeling.evaluation.preferences`)
    execution  pass rate of sampled code on the held-out code tasks, tests run in
               `codeling.sandbox` (see `codeling.evaluation.execution`)

The report card `report.md` has one row per training stage (its budget and final validation
losses), links each stage's loss plot, and lists the suites' results for the final checkpoint.
When a run has an rlhf stage, the tools stage gets the chat suites and HumanEval too, so the
report shows them before and after preference tuning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from codeling.config import build_section, option
from codeling.errors import CodelingError, ConfigError
from codeling.evaluation import copying
from codeling.inference.generate import Generator
from codeling.training import checkpoint as ckpt

log = logging.getLogger(__name__)

SUITES = ["bpb", "copying", "syntax", "humaneval", "tools", "preferences", "execution"]
# Suites cheap enough to run on every stage's checkpoint, so the report shows each stage's change.
EVERY_STAGE_SUITES = ("bpb", "copying")
# Suites that need a model tuned for chat; earlier stages are not scored on them.
CHAT_SUITES = ("tools", "preferences", "execution")
CHAT_STAGES = ("tools", "rlhf")
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

    suites: list[str] = option(["bpb", "copying", "syntax", "humaneval"],
                               "suites to run: bpb, copying, syntax, humaneval, tools, "
                               "preferences, execution", choices=SUITES)
    humaneval_samples: int = option(10, "completions sampled per HumanEval problem; pass@10 "
                                    "needs at least 10", min=1)
    humaneval_limit: int = option(0, "evaluate only the first N HumanEval problems; 0 = all",
                                  min=0)
    syntax_samples: int = option(4, "completions sampled per syntax prompt", min=1)
    max_new_tokens: int = option(256, "tokens generated at most per completion", min=1)
    temperature: float = option(0.8, "sampling temperature for syntax and HumanEval", min=0.0)
    bpb_max_tokens: int = option(0, "held-out tokens scored per source for bpb; 0 = all", min=0)
    tools_limit: int = option(100, "held-out conversations scored per tools split; 0 = all",
                              min=0)
    tools_data: str = option("", "folder with test_seen.jsonl and test_unseen.jsonl; empty = "
                             "the run's data/tool-conversations")
    preferences_data: str = option("", "JSONL file of held-out preference pairs; empty = the "
                                   "run's data/preferences/test.jsonl")
    preferences_limit: int = option(0, "held-out preference pairs scored; 0 = all", min=0)
    execution_samples: int = option(4, "responses sampled per held-out code task", min=1)
    execution_limit: int = option(0, "score only the first N held-out code tasks; 0 = all",
                                  min=0)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")


def build_eval_config(settings: dict, source: str = "eval") -> EvalConfig:
    """Validate eval settings and return an EvalConfig, raising one ConfigError for all problems."""
    problems: list[str] = []
    config = build_section(EvalConfig, settings, problems)
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
        evaluated = [r["step"] for r in records if "val_loss" in r]
        last_step = max(evaluated) if evaluated else None
        # The last step can be evaluated twice (at eval_every and at the end, or again after a
        # resume), so keep one entry per split, the latest.
        last = {r["split"]: r for r in records if "val_loss" in r and r["step"] == last_step}
        val = "; ".join(f"{split} {r['val_loss']:.3f} / {r['val_bits_per_byte']:.3f}"
                        for split, r in last.items())
        done_file = run_dir / stage / "done.json"
        done = json.loads(done_file.read_text()) if done_file.is_file() else {}
        sources = ", ".join(done.get("sources", [])) or "-"
        step = done.get("step", steps[-1]["step"])
        tokens = done.get("tokens", steps[-1]["tokens"])
        rows.append(f"| {stage} | {sources} | {step} | {tokens / 1e6:.2f}M | "
                    f"{steps[-1]['elapsed'] / 60:.1f} min | {steps[-1]['loss']:.3f} | "
                    f"{val or '-'} |")
    return rows


def _load_results(run_dir: Path) -> dict[str, dict]:
    """Return the saved eval results of each stage, in pipeline order."""
    found = {}
    for stage in TRAINING_STAGES:
        path = run_dir / "eval" / f"{stage}.json"
        if path.is_file() and (results := _read_results(path)):
            found[stage] = results
    return found


def _read_results(path: Path) -> dict:
    """Return a saved results file, or {} with a warning when it is not a readable JSON object."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError covers bad JSON and bad UTF-8
        log.warning("ignoring unreadable eval results %s (%s); run `codeling eval` on that "
                    "stage again", path, error)
        return {}
    if not isinstance(results, dict):
        log.warning("ignoring eval results %s, which are not a JSON object; run `codeling "
                    "eval` on that stage again", path)
        return {}
    malformed = [suite for suite in SUITES if suite in results
                 and not isinstance(results[suite], dict)]
    if malformed:
        log.warning("ignoring the %s results in %s, which are not JSON objects; run `codeling "
                    "eval` with those suites again", ", ".join(malformed), path)
    return {key: value for key, value in results.items() if key not in malformed}


def _bpb_table(results: dict[str, dict]) -> list[str]:
    stages = [stage for stage, result in results.items() if "bpb" in result]
    if not stages:
        return []
    sources = sorted({name for stage in stages for name in results[stage]["bpb"]})
    lines = ["## Bits per byte on held-out data", "",
             "Lower is better, and comparable across tokenizers. One column per stage's final "
             "checkpoint.", "",
             "| source | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for name in sources:
        cells = [f"{results[stage]['bpb'][name]['bits_per_byte']:.3f}"
                 if name in results[stage]["bpb"] else "-" for stage in stages]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _syntax_section(stage: str, syntax: dict) -> list[str]:
    lines = [f"## Syntax validity of sampled completions ({stage})", "",
             "| language | valid | samples |", "|---|---|---|"]
    lines += [f"| {language} | {100 * rate['rate']:.1f}% | {rate['samples']} |"
              for language, rate in syntax["rates"].items()]
    lines += ["", f"## Samples ({stage})", ""]
    for entry in syntax["results"]:
        completion = entry["completions"][0]
        mark = "valid" if completion["valid"] else "invalid"
        lines += [f"{entry['language']}, {mark} syntax:", "", f"```{entry['language']}",
                  entry["prompt"] + completion["completion"], "```", ""]
    return lines


def _humaneval_section(stage: str, human: dict) -> list[str]:
    scores = ", ".join(f"{key} {100 * value:.1f}%" for key, value in human["pass_at_k"].items())
    settings = human["settings"]
    return [f"## HumanEval ({stage})", "",
            f"{human['problems']} problems, {human['n_samples']} samples each, temperature "
            f"{settings['temperature']}, at most {settings['max_new_tokens']} new tokens: "
            f"{scores}. Completions ran in `codeling.sandbox`.", ""]


def write_report(run_dir: Path) -> Path:
    """Write report.md from the run's metrics and saved eval results; return its path."""
    results = _load_results(run_dir)
    lines = ["# Report card", "", f"Run: `{run_dir}`.", ""]
    rows = _stage_rows(run_dir)
    if rows:
        lines += ["## Stages", "",
                  "| stage | data | steps | tokens | time | last logged train loss | "
                  "last validation during training (first eval_batches of each split): "
                  "loss / bits per byte |", "|---|---|---|---|---|---|---|"]
        lines += rows + [""]
        for stage in TRAINING_STAGES:
            if (run_dir / stage / "loss.png").is_file():
                lines += [f"![{stage} loss]({stage}/loss.png)", ""]
    evaluated = [f"{stage} `{Path(result['checkpoint']).name}`" for stage, result in
                 results.items() if isinstance(result.get("checkpoint"), str)]
    if evaluated:
        lines += ["Evaluated checkpoints: " + ", ".join(evaluated) + ".", ""]
    lines += _bpb_table(results)
    lines += copying.report_table(results)
    for stage, result in results.items():
        if "syntax" in result:
            lines += _syntax_section(stage, result["syntax"])
        if "humaneval" in result:
            lines += _humaneval_section(stage, result["humaneval"])
        if "tools" in result:
            from codeling.evaluation.tools import report_section

            lines += report_section(stage, result["tools"])
        if "preferences" in result:
            from codeling.evaluation.preferences import report_section as preference_section

            lines += preference_section(stage, result["preferences"])
        if "execution" in result:
            from codeling.evaluation.execution import report_section as execution_section

            lines += execution_section(stage, result["execution"])
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# -- running the suites ----------------------------------------------------------------------------


def run_dir_of(checkpoint: Path) -> Path:
    """Return the run directory of a checkpoint at <run>/<stage>/checkpoints/step-N."""
    return checkpoint.absolute().parents[2]


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
        if "tokenizer_fingerprint" not in manifest:
            continue  # not token shards (for example the tool conversations)
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


def run_copying(generator: Generator) -> dict:
    # A model whose context is under 2 x 64 + 1 tokens gets shorter sequences.
    length = min(copying.DEFAULT_LENGTH, (generator.model.config.max_seq_len - 1) // 2)
    result = copying.copying_score(generator.model, generator.tokenizer.eos_id, length=length,
                                   device=generator.device, bf16=generator.bf16)
    log.info("copying: second pass top-1 %.1f%%, loss %.2f nats (first pass %.2f)",
             100 * result["second_pass_accuracy"], result["second_pass_loss"],
             result["first_pass_loss"])
    return result


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
    results: dict = {"checkpoint": str(checkpoint.absolute())}
    started = time.perf_counter()
    if "bpb" in config.suites:
        results["bpb"] = run_bpb(generator, run_dir, config)
    if "copying" in config.suites:
        results["copying"] = run_copying(generator)
    if "syntax" in config.suites:
        results["syntax"] = run_syntax(generator, config)
    if "humaneval" in config.suites:
        results["humaneval"] = run_humaneval(generator, config)
    if "tools" in config.suites:
        from codeling.data.chat_data import tool_dataset_dir
        from codeling.evaluation.tools import evaluate_tool_calls

        data_dir = Path(config.tools_data) if config.tools_data else tool_dataset_dir(run_dir)
        results["tools"] = evaluate_tool_calls(generator, data_dir, limit=config.tools_limit,
                                               max_new_tokens=min(config.max_new_tokens, 160))
    if "preferences" in config.suites:
        from codeling.data.preferences import preference_dataset_dir
        from codeling.evaluation.preferences import evaluate_preferences

        data_file = Path(config.preferences_data) if config.preferences_data else \
            preference_dataset_dir(run_dir) / "test.jsonl"
        results["preferences"] = evaluate_preferences(generator, data_file, checkpoint,
                                                      limit=config.preferences_limit)
    if "execution" in config.suites:
        from codeling.evaluation.execution import evaluate_execution

        results["execution"] = evaluate_execution(
            generator, samples=config.execution_samples, temperature=config.temperature,
            max_new_tokens=min(config.max_new_tokens, 128), limit=config.execution_limit)
    results["seconds"] = time.perf_counter() - started
    return results


def save_results(run_dir: Path, checkpoint: Path, results: dict) -> Path:
    """Save one checkpoint's results atomically, without dropping results saved before.

    The stage's latest checkpoint writes eval/<stage>.json, which the report card reads. Suites
    saved there earlier for the same checkpoint stay, unless this run repeats them. Any other
    checkpoint writes eval/<stage>-<checkpoint>.json, so evaluating an earlier checkpoint
    leaves the report card's results of the latest one in place.
    """
    checkpoint = checkpoint.absolute()
    path = results_path(run_dir, checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = _read_results(path) if path.is_file() else {}
    saved_from = previous.get("checkpoint")
    if isinstance(saved_from, str) and Path(saved_from).resolve() == checkpoint.resolve():
        results = {**previous, **results}
    elif previous:
        dropped = sorted(key for key in previous if key not in ("checkpoint", "seconds"))
        log.warning("replacing the eval results of %s in %s (suites %s) with those of %s",
                    saved_from, path, ", ".join(dropped) or "none", checkpoint)
    temporary = path.parent / f".{path.name}.tmp"
    temporary.write_text(json.dumps(results, indent=2))
    os.replace(temporary, path)
    return path


def results_path(run_dir: Path, checkpoint: Path) -> Path:
    """Return the file that `save_results` writes for a checkpoint; raise if it cannot be one."""
    stage_dir = checkpoint.absolute().parents[1]
    try:
        latest = ckpt.latest_checkpoint(stage_dir)
    except ckpt.CheckpointError:  # `latest` names a deleted checkpoint: this one is not it
        latest = None
    if latest is not None and latest.resolve() == checkpoint.resolve():
        path = run_dir / "eval" / f"{stage_dir.name}.json"
    else:
        path = run_dir / "eval" / f"{stage_dir.name}-{checkpoint.name}.json"
    if path.exists() and not path.is_file():
        raise CodelingError(f"{path} exists and is not a file, so eval results cannot be saved "
                            "there; move it aside and run the evaluation again")
    return path


def evaluate_run(target: Path, config: EvalConfig) -> tuple[Path, dict]:
    """Evaluate the newest checkpoint under `target`, save its results, rewrite the report."""
    checkpoint = ckpt.resolve_checkpoint(target).absolute()
    run_dir = run_dir_of(checkpoint)
    results_path(run_dir, checkpoint)  # fail before the suites run, not after
    results = run_suites(checkpoint, config, run_dir)
    saved = save_results(run_dir, checkpoint, results)
    report = write_report(run_dir)
    if saved.name != f"{checkpoint.parents[1].name}.json":
        log.info("%s is not the latest checkpoint of its stage, so its results are in %s and "
                 "the report card keeps the latest checkpoint's", checkpoint, saved)
    log.info("report card: %s", report)
    return report, results


def run_eval_stage(run_dir: Path, config: EvalConfig) -> None:
    """Run the pipeline's eval stage, unless done: every suite on the last training stage and
    bits per byte and copying on the earlier ones, so the report shows what each stage
    changed. With an rlhf stage, the tools stage also gets HumanEval and the chat suites, as
    the baseline."""
    done = run_dir / "eval" / "done.json"
    if done.is_file():
        log.info("stage eval: done (%s exists), skipping", done)
        return
    stages = [stage for stage in TRAINING_STAGES
              if ckpt.latest_checkpoint(run_dir / stage) is not None]
    if not stages:
        raise CodelingError(f"no trained stage in {run_dir} to evaluate; run the training "
                            "stages first")
    for stage in stages:
        checkpoint = ckpt.latest_checkpoint(run_dir / stage)
        suites = config.suites if stage == stages[-1] else [
            s for s in config.suites if s in EVERY_STAGE_SUITES]
        if stage == "tools" and "rlhf" in stages and stage != stages[-1]:
            suites = [s for s in config.suites
                      if s in (*EVERY_STAGE_SUITES, "humaneval", *CHAT_SUITES)]
        if stage not in CHAT_STAGES:
            suites = [s for s in suites if s not in CHAT_SUITES]
        if not suites:
            continue
        log.info("evaluating %s (%s): %s", stage, checkpoint, ", ".join(suites))
        stage_config = dataclasses.replace(config, suites=suites)
        save_results(run_dir, checkpoint, run_suites(checkpoint, stage_config, run_dir))
    report = write_report(run_dir)
    temporary = run_dir / "eval" / ".done.tmp"
    temporary.write_text(json.dumps({"stages": stages, "report": str(report)}, indent=2))
    os.replace(temporary, done)
    log.info("report card: %s", report)


def report_command(run_dir: Path) -> Path:
    """Rewrite report.md from saved metrics and eval results (`codeling report RUN`)."""
    if not run_dir.is_dir():
        raise CodelingError(f"run directory {str(run_dir)!r} not found; pass a run directory "
                            "such as runs/cpu-tiny")
    report = write_report(run_dir)
    print(report.read_text())
    print(f"report card: {report}")
    return report


def eval_command(args) -> Path:
    """`codeling eval`: run the chosen suites and print where the report card is."""
    suites = [name.strip() for name in args.suite.split(",") if name.strip()]
    if not suites:
        raise CodelingError(f"--suite {args.suite!r} names no suite; pass a comma-separated "
                            f"list of {', '.join(SUITES)}")
    config = build_eval_config({"suites": suites, "humaneval_samples": args.humaneval_samples,
                                "humaneval_limit": args.humaneval_limit,
                                "max_new_tokens": args.max_new_tokens, "device": args.device,
                                "tools_limit": args.tools_limit, "tools_data": args.tools_data},
                               source="codeling eval")
    report, _ = evaluate_run(Path(args.checkpoint), config)
    print(report.read_text())
    print(f"report card: {report}")
    return report
