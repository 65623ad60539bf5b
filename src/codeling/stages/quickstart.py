"""`codeling quickstart`: tokenizer, a tiny model trained on real code, samples, all in a budget.

The budget covers everything: stage 0 (tokenizer), data preparation, training, evaluation and
sampling. Training gets whatever time the first two leave, minus a reserve for the end.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from codeling.config import load_config, save_config
from codeling.data import sources
from codeling.errors import CodelingError
from codeling.inference.generate import GenerationConfig, Generator, decode_in_bf16
from codeling.stages import pretrain
from codeling.tokenizer import Tokenizer
from codeling.training.device import resolve_device, use_bf16
from codeling.training.trainer import Trainer

log = logging.getLogger(__name__)

SOURCES = ["python-stdlib", "shell-scripts"]

PROMPTS = [
    ("python", "def fibonacci(n):\n"),
    ("python", "import os\n\n\ndef list_python_files(directory):\n"),
    ("python", "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n"),
    ("bash", "#!/bin/sh\n# Print every argument on its own line.\n"),
    ("bash", "#!/bin/bash\nset -e\n\nif [ -z \"$1\" ]; then\n"),
]


# torch.compile spends about half a minute compiling on a laptop CPU and then trains about twice
# as fast (benchmarks/train_throughput.py), so it pays off from a few minutes of training up.
COMPILE_MIN_MINUTES = 3.0


def quickstart_overrides(run_dir: Path, arch: str, seed: int, train_minutes: float,
                         compile_model: bool) -> list[str]:
    """Return the config settings of the quickstart run, as `--set` overrides."""
    return [f"train.compile={str(compile_model).lower()}",
        "name=quickstart", f"run_dir={run_dir}", "stage=quickstart", f"model={arch}-tiny",
        f"data.sources=[{', '.join(SOURCES)}]", "tokenizer.vocab_size=4096",
        "tokenizer.max_bytes_per_source=3000000",
        "train.batch_size=16", "train.seq_len=256", "train.lr=0.003", "train.warmup_steps=30",
        "train.max_steps=1000000", f"train.max_minutes={train_minutes:.3f}",
        "train.eval_every=100", "train.eval_batches=8", "train.checkpoint_every=200",
        "train.log_every=20", f"train.seed={seed}",
    ]


def gzip_bits_per_byte(texts: list[str]) -> float:
    """Compress each text on its own with gzip -9 and return compressed bits per raw byte."""
    raw = compressed = 0
    for text in texts:
        data = text.encode("utf-8")
        raw += len(data)
        compressed += len(gzip.compress(data, compresslevel=9))
    return 8 * compressed / max(raw, 1)


def held_out_documents(data_dir: Path) -> list[str]:
    """Return the validation documents that `codeling data prepare` saved for a source."""
    lines = (data_dir / "val.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def write_samples(generator: Generator, path: Path, seed: int) -> list[tuple[str, str, str]]:
    """Generate a completion for each prompt, print it, and save all of them as markdown."""
    samples = []
    lines = ["# Quickstart samples", ""]
    for index, (language, prompt) in enumerate(PROMPTS):
        config = GenerationConfig(max_new_tokens=120, temperature=0.7, top_p=0.95,
                                  seed=seed + index)
        completion = generator.complete(prompt, config)
        samples.append((language, prompt, completion))
        print(f"--- sample {index + 1} ({language}) ---\n{prompt}{completion}\n")
        lines += [f"## Sample {index + 1} ({language})", "", f"```{language}",
                  prompt + completion, "```", ""]
    path.write_text("\n".join(lines))
    return samples


def run_quickstart(minutes: float = 5.0, run_dir: Path = Path("runs/quickstart"),
                   arch: str = "dense", seed: int = 1337, overrides: list[str] | None = None,
                   force: bool = False, compile_mode: str = "auto") -> dict:
    """Train a tokenizer and a tiny model on this machine's code within `minutes`; sample it.

    `compile_mode` is on, off, or auto: compile when the budget is at least
    COMPILE_MIN_MINUTES.
    """
    start = time.perf_counter()
    if minutes <= 0:
        raise CodelingError(f"--minutes must be positive, got {minutes}")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise CodelingError(f"{run_dir} already exists; pass --force to replace it, or "
                                "--run-dir for a new directory")
        shutil.rmtree(run_dir)
    reserve = max(20.0, 0.08 * minutes * 60)  # final evaluation and samples
    compile_model = compile_mode == "on" or (compile_mode == "auto"
                                             and minutes >= COMPILE_MIN_MINUTES)
    config = load_config(None, quickstart_overrides(run_dir, arch, seed, minutes, compile_model)
                         + list(overrides or []))
    pretrain.check_sources(config.data.sources)
    device = resolve_device(config.train.device)
    bf16 = use_bf16(config.train.precision, device)

    log.info("quickstart: %.1f minute budget, run directory %s", minutes, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = pretrain.ensure_tokenizer(config, run_dir)
    data = pretrain.ensure_data(config, run_dir, tokenizer)
    spent = time.perf_counter() - start
    train_seconds = minutes * 60 - spent - reserve
    if train_seconds < 10:
        raise CodelingError(f"tokenizer and data took {spent:.0f} s, leaving no time to train "
                            f"within --minutes {minutes}; raise --minutes")
    config.train.max_minutes = train_seconds / 60
    log.info("stage 0 and data took %.0f s; training for %.1f minutes", spent, train_seconds / 60)

    torch.manual_seed(config.train.seed)
    model = pretrain.build_model(config, tokenizer).to(device)
    loader, val_splits = pretrain.build_loaders(config, data)
    pretrain.describe_run(config, model, device, bf16)
    save_config(config, run_dir / "config.yaml")
    trainer = Trainer(model, config, loader, val_splits, run_dir / config.stage,
                      run_dir / "tokenizer", tokenizer.fingerprint, device, bf16)
    result = trainer.fit()
    return _report(config, run_dir, result, trainer, seed, start)


def _report(config, run_dir: Path, result, trainer: Trainer, seed: int, start: float) -> dict:
    """Evaluate the held-out split in full, compare with gzip, sample, and print the summary."""
    phase_start = time.perf_counter()
    trainer.train.eval_batches = 10**9  # the whole held-out split of each source
    val = trainer.evaluate()
    held_out_python = held_out_documents(run_dir / "data" / sources.source_name("python-stdlib"))
    gzip_bpb = gzip_bits_per_byte(held_out_python)
    log.info("full validation pass took %.0f s", time.perf_counter() - phase_start)
    phase_start = time.perf_counter()
    generator = Generator(trainer.model, Tokenizer.load(run_dir / "tokenizer"),
                          trainer.device, decode_in_bf16("auto", trainer.device))
    samples = write_samples(generator, run_dir / "samples.md", seed)
    log.info("sampling took %.0f s", time.perf_counter() - phase_start)
    summary = {
        "steps": result.step, "train_tokens": result.tokens,
        "train_minutes": result.elapsed / 60, "total_minutes": (time.perf_counter() - start) / 60,
        "val": val, "gzip_bits_per_byte_python": gzip_bpb,
        "checkpoint": str(result.checkpoint), "samples": str(run_dir / "samples.md"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("=== quickstart results ===")
    print(f"trained {result.step} steps, {result.tokens / 1e6:.2f}M tokens in "
          f"{result.elapsed / 60:.1f} min ({summary['total_minutes']:.1f} min in all)")
    for name, values in val.items():
        print(f"validation {name}: {values['loss']:.3f} nats/token, "
              f"{values['bits_per_byte']:.3f} bits/byte")
    print(f"gzip -9 on the same held-out Python files, one by one: {gzip_bpb:.3f} bits/byte")
    print(f"samples:    {run_dir / 'samples.md'} ({len(samples)} prompts)")
    print(f"checkpoint: {result.checkpoint}")
    print(f"loss plot:  {run_dir / config.stage / 'loss.png'}")
    print(f"next: codeling generate {run_dir} --prompt 'def add(a, b):'")
    if not all(math.isfinite(v["loss"]) for v in val.values()):
        raise CodelingError("validation loss is not finite; the run diverged")
    return summary
