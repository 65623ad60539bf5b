"""The `codeling` command line: argument parsing and dispatch only.

Every user-facing failure is a `CodelingError`, printed as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from codeling.chat_session import add_chat_parser
from codeling.errors import CodelingError
from codeling.export.command import add_export_parser
from codeling.quantize_command import add_quantize_parser
from codeling.serve.command import add_serve_parser


def _add_quickstart(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "quickstart", help="train a tokenizer and a tiny model on real code, then sample from it",
        description="Train a byte-level BPE tokenizer and a tiny model on the Python standard "
        "library and the shell scripts of this machine, within a wall-clock budget, then print "
        "code samples and the validation loss. Works offline.")
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="total wall-clock budget in minutes, tokenizer and data included "
                        "(default: 5)")
    parser.add_argument("--run-dir", default="runs/quickstart",
                        help="directory for everything the run writes (default: runs/quickstart)")
    parser.add_argument("--arch", default="dense", choices=["dense", "mamba", "moe", "hybrid"],
                        help="model architecture; uses the ARCH-tiny preset (default: dense)")
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, for example "
                        "train.batch_size=8; repeatable")
    parser.add_argument("--force", action="store_true",
                        help="delete an existing run directory first, instead of stopping")
    parser.add_argument("--compile", dest="compile_mode", default="auto",
                        choices=["auto", "on", "off"],
                        help="torch.compile the model: auto = on when --minutes is 3 or more, "
                        "where the compile time (about 30 s on a CPU) pays back (default: auto)")


def _add_tokenizer(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("tokenizer", help="stage 0: train or inspect a BPE tokenizer")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train a byte-level BPE tokenizer on sources")
    train.add_argument("--sources", nargs="+", default=["python-stdlib", "shell-scripts"],
                       help="source specs: python-stdlib, shell-scripts, files:GLOB, "
                       "jsonl:PATH[:FIELD], hf:DATASET (default: python-stdlib shell-scripts)")
    train.add_argument("--vocab-size", type=int, default=4096,
                       help="vocabulary size in tokens, special tokens included (default: 4096)")
    train.add_argument("--max-bytes-per-source", type=int, default=8_000_000,
                       help="text sampled from each source, in bytes (default: 8000000)")
    train.add_argument("--out", required=True, help="output directory for tokenizer.json")


def _add_data(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("data", help="tokenize sources into memmapped shards, or "
                                 "generate synthetic tool conversations")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    prepare = actions.add_parser("prepare", help="deduplicate, split and tokenize sources")
    prepare.add_argument("--sources", nargs="+", required=True, help="source specs to prepare")
    prepare.add_argument("--tokenizer", required=True,
                         help="tokenizer.json or a directory containing it")
    prepare.add_argument("--out", required=True,
                         help="output directory; each source gets a sub-directory")
    prepare.add_argument("--val-fraction", type=float, default=0.05,
                         help="fraction of documents held out for validation (default: 0.05)")
    prepare.add_argument("--workers", type=int, default=0,
                         help="tokenizer processes; 0 = one per CPU core (default: 0)")
    prepare.add_argument("--max-documents", type=int, default=0,
                         help="documents taken per source; 0 = all (default: 0)")
    tools = actions.add_parser(
        "tools", help="generate synthetic function-calling conversations",
        description="Write train.jsonl, val.jsonl, test_seen.jsonl (held-out phrasings), "
        "test_unseen.jsonl (held-out tools) and manifest.json.")
    tools.add_argument("--out", required=True,
                       help="output directory; must not exist or must be empty")
    tools.add_argument("--seed", type=int, default=0,
                       help="random seed; the same seed writes identical files (default: 0)")
    tools.add_argument("--train-examples", type=int, default=100000,
                       help="conversations in train.jsonl (default: 100000)")
    tools.add_argument("--val-examples", type=int, default=500,
                       help="conversations in val.jsonl (default: 500)")
    tools.add_argument("--test-examples", type=int, default=300,
                       help="conversations in each of the two test files (default: 300)")
    _add_data_preferences(actions)


def _add_data_preferences(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "preferences", help="build preference pairs whose labels are checked by running code "
        "and validating tool calls",
        description="Write train.jsonl, test.jsonl (held-out code tasks and tool phrasings) and "
        "manifest.json. Code pairs: the chosen response passes the task's tests in the sandbox "
        "and the rejected one fails, taken from the model's own samples where it produces both "
        "and from mutations of the reference solution otherwise. Tool pairs: the correct call "
        "against a wrong tool, a missing or changed argument, a value that breaks the schema, "
        "or a text reply where a call is needed; a plain reply against a call where none is "
        "needed.")
    parser.add_argument("--run", required=True,
                        help="run directory; its tool conversations are used (generated if "
                        "missing)")
    parser.add_argument("--out", required=True,
                        help="output directory; must not exist or must be empty")
    parser.add_argument("--checkpoint", default="",
                        help="checkpoint or stage directory whose model is sampled (default: "
                        "the run's latest checkpoint)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for sampling and mutations (default: 0)")
    parser.add_argument("--samples", type=int, default=4,
                        help="responses sampled per code task (default: 4)")
    parser.add_argument("--code-limit", type=int, default=0,
                        help="code tasks used per split; 0 = all (default: 0)")
    parser.add_argument("--tool-train", type=int, default=800,
                        help="tool pairs in train.jsonl (default: 800)")
    parser.add_argument("--tool-test", type=int, default=200,
                        help="tool pairs in test.jsonl (default: 200)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train a model from a YAML run config")
    parser.add_argument("--config", help="run config YAML, for example configs/runs/dense-tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key, for example train.lr=0.001; repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint of the run's stage")


def _add_generate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="complete a prompt with a trained model")
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="run directory, stage directory or checkpoint directory")
    parser.add_argument("--prompt", required=True, help="text to complete")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="tokens to generate at most (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature; 0 = greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample from the k most likely tokens; 0 = off (default: 0)")
    parser.add_argument("--top-p", type=float, default=0.95,
                        help="nucleus sampling probability mass, in (0, 1] (default: 0.95)")
    parser.add_argument("--stop", action="append", default=[],
                        help="stop before this string; \\n and \\t stand for a newline and a "
                        "tab; repeatable")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _add_compare(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare", help="train several architectures on the same data and budget; write a table",
        description="Train each architecture with the same tokenizer, data, seed and budget, "
        "then write compare.md (parameters, speed, MFU, validation loss, decode speed, peak "
        "memory, recall probes) and compare.png (validation loss against tokens and time).")
    parser.add_argument("--archs", default="dense,mamba,moe,hybrid",
                        help="comma-separated architectures (default: dense,mamba,moe,hybrid)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base"],
                        help="preset size; uses the ARCH-SIZE model presets (default: tiny)")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="training budget per architecture in minutes (0 = none)")
    parser.add_argument("--tokens", type=int, default=0,
                        help="training budget per architecture in tokens (0 = none)")
    parser.add_argument("--run-dir", default="runs/compare",
                        help="directory for the shared data and each architecture's run "
                        "(default: runs/compare)")
    parser.add_argument("--sources", nargs="+", default=["python-stdlib", "shell-scripts"],
                        help="data sources (default: python-stdlib shell-scripts)")
    parser.add_argument("--seed", type=int, default=1337, help="seed shared by every run")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key for every run; "
                        "repeatable")


def _add_pipeline(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "pipeline", help="run the stages of a recipe in order (tokenizer, data, language, code, "
        "eval); rerun to resume",
        description="Run every stage a recipe names, in one run directory. A finished stage is "
        "skipped on a rerun and an interrupted one resumes from its latest checkpoint.")
    parser.add_argument("recipe", metavar="RECIPE.yaml",
                        help="pipeline recipe, for example configs/pipelines/cpu-tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a recipe key, for example "
                        "stages.code.train.max_minutes=5; repeatable")


def _add_eval(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="evaluate a checkpoint: bits per byte, syntax "
                                 "validity, HumanEval, tool calling; writes report.md for a run")
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="run directory, stage directory or checkpoint directory")
    parser.add_argument("--suite", default="bpb,copying,syntax,humaneval",
                        help="comma-separated suites: bpb, copying, syntax, humaneval, tools, "
                        "preferences, execution "
                        "(default: bpb,copying,syntax,humaneval)")
    parser.add_argument("--humaneval-samples", type=int, default=10,
                        help="completions sampled per HumanEval problem (default: 10)")
    parser.add_argument("--humaneval-limit", type=int, default=0,
                        help="evaluate only the first N HumanEval problems; 0 = all 164")
    parser.add_argument("--tools-limit", type=int, default=100,
                        help="held-out conversations scored per tools split; 0 = all "
                        "(default: 100)")
    parser.add_argument("--tools-data", default="",
                        help="folder with test_seen.jsonl and test_unseen.jsonl (default: the "
                        "run's data/tool-conversations)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="tokens generated at most per completion (default: 256)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _add_report(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("report", help="rewrite a run's report.md from its metrics "
                                 "and saved evaluation results")
    parser.add_argument("run_dir", metavar="RUN", help="run directory, for example runs/cpu-tiny")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `codeling` command."""
    parser = argparse.ArgumentParser(
        prog="codeling", description="Train small code language models from scratch and use them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quickstart(commands)
    _add_tokenizer(commands)
    _add_data(commands)
    _add_train(commands)
    _add_generate(commands)
    _add_compare(commands)
    _add_pipeline(commands)
    _add_eval(commands)
    _add_report(commands)
    add_serve_parser(commands)
    add_export_parser(commands)
    add_quantize_parser(commands)
    add_chat_parser(commands)
    return parser


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command; return its exit status."""
    if args.command == "quickstart":
        from codeling.stages.quickstart import run_quickstart

        run_quickstart(minutes=args.minutes, run_dir=Path(args.run_dir), arch=args.arch,
                       seed=args.seed, overrides=args.overrides, force=args.force,
                       compile_mode=args.compile_mode)
    elif args.command == "tokenizer":
        from codeling.stages.commands import train_tokenizer_command

        train_tokenizer_command(args.sources, args.vocab_size, args.max_bytes_per_source,
                                Path(args.out))
    elif args.command == "data" and args.action == "tools":
        from codeling.data.tool_data import format_summary, generate_tool_dataset

        manifest = generate_tool_dataset(Path(args.out), args.seed, args.train_examples,
                                         args.val_examples, args.test_examples)
        for line in format_summary(manifest, args.out):
            print(line)
    elif args.command == "data" and args.action == "preferences":
        from codeling.data.preference_builder import (BuildSettings, build_preference_dataset,
                                                      format_manifest)

        settings = BuildSettings(seed=args.seed, samples=args.samples, code_limit=args.code_limit,
                                 tool_train=args.tool_train, tool_test=args.tool_test,
                                 device=args.device)
        manifest = build_preference_dataset(Path(args.run), Path(args.out),
                                            args.checkpoint or args.run, settings)
        for line in format_manifest(manifest):
            print(line)
        print(f"preference pairs: {args.out}")
    elif args.command == "data":
        from codeling.stages.commands import prepare_data_command

        prepare_data_command(args.sources, args.tokenizer, Path(args.out), args.val_fraction,
                             args.workers, args.max_documents)
    elif args.command == "train":
        from codeling.config import load_config
        from codeling.stages.pretrain import run_training

        result = run_training(load_config(args.config, args.overrides), resume=args.resume)
        if result.stop_reason in ("interrupted", "SIGTERM"):
            return 130  # stopped early, with a checkpoint to resume from
    elif args.command == "compare":
        from codeling.stages.compare import parse_archs, run_compare

        run_compare(parse_archs(args.archs), args.size, args.minutes, args.tokens,
                    Path(args.run_dir), args.sources, args.seed, args.overrides)
    elif args.command == "pipeline":
        from codeling.stages.pipeline import run_pipeline

        return run_pipeline(args.recipe, args.overrides)
    elif args.command == "eval":
        from codeling.evaluation.suite import eval_command

        eval_command(args)
    elif args.command == "report":
        from codeling.evaluation.suite import report_command

        report_command(Path(args.run_dir))
    elif args.command == "quantize":
        from codeling.quantize_command import run_quantize

        return run_quantize(args)
    elif args.command == "export":
        from codeling.export.command import run_export

        return run_export(args)
    elif args.command == "serve":
        from codeling.serve.command import run_serve

        return run_serve(args)
    elif args.command == "chat":
        from codeling.chat_session import chat_command

        return chat_command(args)
    elif args.command == "generate":
        from codeling.stages.commands import generate_command

        generate_command(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `codeling` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return _run(args)
    except CodelingError as error:
        print(f"codeling: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("codeling: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
