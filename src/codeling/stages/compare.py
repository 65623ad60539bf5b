"""`codeling compare`: train several architectures on the same data and budget, side by side.

All architectures share one tokenizer and one set of shards in the compare run directory, the
same seed (so the same batches in the same order), and the same budget in tokens or minutes.
Each one trains in its own process, so its peak memory is its own. The parent then loads each
checkpoint to measure decode speed and the recall probes, and writes `compare.md` with one row
per architecture plus `compare.png` with validation loss against tokens and against time.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from codeling.config import load_config, save_config
from codeling.errors import CodelingError
from codeling.evaluation.recall import recall_scores
from codeling.inference.generate import GenerationConfig, Generator
from codeling.stages import pretrain
from codeling.training import checkpoint as ckpt

log = logging.getLogger(__name__)

SIZES = ("tiny", "small", "base")
ARCHS = ("dense", "mamba", "moe", "hybrid")


@dataclass
class ArchResult:
    arch: str
    params_total: int = 0
    params_active: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    mfu: float = 0.0
    val: dict[str, dict[str, float]] = field(default_factory=dict)
    decode_tokens_per_s: float = 0.0
    peak_memory_mb: float = 0.0
    copy_recall: float = 0.0
    associative_recall: float = 0.0
    curve: list[dict] = field(default_factory=list)


def parse_archs(text: str) -> list[str]:
    """Split a comma-separated architecture list and check each name."""
    archs = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in archs if name not in ARCHS]
    if unknown or not archs:
        raise CodelingError(f"--archs {text!r}: unknown architecture {unknown or text!r}; "
                            f"choose from {','.join(ARCHS)}")
    return archs


def compare_overrides(run_dir: Path, arch: str, size: str, minutes: float, tokens: int,
                      seed: int) -> list[str]:
    """Return the settings of one architecture's run inside the compare directory."""
    settings = [f"run_dir={run_dir}", f"stage={arch}", f"model={arch}-{size}",
                "train.max_steps=10000000", f"train.seed={seed}", "train.eval_every=50",
                "train.eval_batches=8", "train.checkpoint_every=0", "train.log_every=25"]
    if minutes:
        settings.append(f"train.max_minutes={minutes}")
    if tokens:
        settings.append(f"train.max_tokens={tokens}")
    return settings


def _train_in_subprocess(config_path: Path, overrides: list[str]) -> None:
    command = [sys.executable, "-m", "codeling", "train", "--config", str(config_path)]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(command, env=os.environ.copy())
    if result.returncode != 0:
        raise CodelingError(f"training failed (exit status {result.returncode}) for: "
                            f"{' '.join(command)}; its log is above")


def _read_metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _decode_speed(generator: Generator, new_tokens: int = 64) -> float:
    config = GenerationConfig(max_new_tokens=new_tokens, temperature=1.0, seed=0)
    start = time.perf_counter()
    generator.complete("def main():\n", config)
    elapsed = time.perf_counter() - start
    return generator.last_usage["completion_tokens"] / elapsed


def measure(arch: str, stage_dir: Path) -> ArchResult:
    """Collect one architecture's training metrics, then probe its final checkpoint."""
    records = _read_metrics(stage_dir)
    steps = [r for r in records if "loss" in r]
    final = [r for r in records if "peak_memory_mb" in r][-1]
    result = ArchResult(arch)
    result.tokens = steps[-1]["tokens"]
    result.train_seconds = steps[-1]["elapsed"]
    later = steps[len(steps) // 2:] or steps  # skip compilation and warm-up
    result.mfu = sum(r["mfu"] for r in later) / len(later)
    result.peak_memory_mb = final["peak_memory_mb"]
    result.curve = [r for r in records if "val_loss" in r]
    if result.curve:  # empty when no source has a validation split long enough
        last_step = max(r["step"] for r in result.curve)
        result.val = {r["split"]: {"loss": r["val_loss"],
                                   "bits_per_byte": r["val_bits_per_byte"]}
                      for r in result.curve if r["step"] == last_step}

    generator = Generator.from_checkpoint(stage_dir)
    model = generator.model
    result.params_total = model.num_parameters()
    result.params_active = model.num_parameters(active=True)
    result.decode_tokens_per_s = _decode_speed(generator)
    scores = recall_scores(model)
    result.copy_recall, result.associative_recall = scores.copy_accuracy, scores.associative_accuracy
    return result


def write_table(results: list[ArchResult], path: Path, header: str) -> str:
    """Write the comparison as a markdown table and return its text."""
    splits = sorted({name for r in results for name in r.val})
    columns = ["arch", "params total / active", "train tokens", "train tok/s", "MFU"]
    columns += [f"val {name} loss / bits per byte" for name in splits]
    columns += ["decode tok/s", "peak memory", "copy recall", "assoc. recall"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        cells = [r.arch, f"{r.params_total / 1e6:.2f}M / {r.params_active / 1e6:.2f}M",
                 f"{r.tokens / 1e6:.2f}M", f"{r.tokens / max(r.train_seconds, 1e-9):,.0f}",
                 f"{100 * r.mfu:.1f}%"]
        for name in splits:
            values = r.val.get(name)
            cells.append(f"{values['loss']:.3f} / {values['bits_per_byte']:.3f}" if values else "-")
        cells += [f"{r.decode_tokens_per_s:,.0f}", f"{r.peak_memory_mb:,.0f} MB",
                  f"{100 * r.copy_recall:.1f}%", f"{100 * r.associative_recall:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot_curves(results: list[ArchResult], path: Path, split: str) -> None:
    """Plot validation loss of one split against tokens and against wall-clock time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in results:
        points = [p for p in r.curve if p["split"] == split]
        by_tokens.plot([p["tokens"] / 1e6 for p in points], [p["val_loss"] for p in points],
                       marker="o", markersize=3, label=r.arch)
        by_time.plot([p["elapsed"] / 60 for p in points], [p["val_loss"] for p in points],
                     marker="o", markersize=3, label=r.arch)
    by_tokens.set_xlabel("training tokens (millions)")
    by_time.set_xlabel("wall-clock training time (minutes)")
    by_tokens.set_ylabel(f"validation loss on {split} (nats/token)")
    for axis in (by_tokens, by_time):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_compare(archs: list[str], size: str, minutes: float, tokens: int, run_dir: Path,
                sources: list[str], seed: int, overrides: list[str]) -> list[ArchResult]:
    """Train each architecture under the same budget and write compare.md and compare.png."""
    if size not in SIZES:
        raise CodelingError(f"--size {size!r} is unknown; choose from {', '.join(SIZES)}")
    if not minutes and not tokens:
        raise CodelingError("give a budget: --minutes M or --tokens N (or both)")
    if minutes < 0 or tokens < 0:
        raise CodelingError(f"budgets must be positive, got --minutes {minutes} --tokens {tokens}")
    for arch in archs:
        if ckpt.latest_checkpoint(run_dir / arch) is not None:
            raise CodelingError(f"{run_dir / arch} already has checkpoints; choose another "
                                "--run-dir or delete it")
    shared = [f"run_dir={run_dir}", f"data.sources=[{', '.join(sources)}]"] + overrides
    base = load_config(None, shared)
    pretrain.check_sources(base.data.sources)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = pretrain.ensure_tokenizer(base, run_dir)
    pretrain.ensure_data(base, run_dir, tokenizer)
    config_path = run_dir / "compare-base.yaml"
    save_config(base, config_path)

    results = []
    for arch in archs:
        arch_overrides = compare_overrides(run_dir, arch, size, minutes, tokens, seed) + overrides
        load_config(config_path, arch_overrides)  # fail here, not in the subprocess
        log.info("=== training %s-%s ===", arch, size)
        _train_in_subprocess(config_path, arch_overrides)
        results.append(measure(arch, run_dir / arch))

    budget = " and ".join(filter(None, [f"{minutes:g} minutes" if minutes else "",
                                        f"{tokens:,} tokens" if tokens else ""]))
    device = "CUDA" if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    header = (f"Architectures at size {size}, each trained for {budget} (whichever ends first) "
              f"on {', '.join(sources)} with the same tokenizer, data order and seed; {device}.")
    table = write_table(results, run_dir / "compare.md", header)
    split = sorted(results[0].val)[0] if results[0].val else None
    if split:
        plot_curves(results, run_dir / "compare.png", split)
    print(table)
    print(f"table: {run_dir / 'compare.md'}\nplot:  {run_dir / 'compare.png'}")
    return results
