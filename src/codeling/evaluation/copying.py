"""In-context copying: can the model repeat a token sequence it has just seen?

Each probe row is a random sequence of ordinary tokens followed by the same sequence again,
after one eos as context:

    <eos> t1 t2 ... tL t1 t2 ... tL

Random tokens cannot be predicted on the first pass, so the loss there stays near ln(vocab size)
for any model. On the second pass, a model that has learned to copy can look up the token that
followed the current one in the first pass. Its loss then falls and its top-1 accuracy rises.
Transformers learn this with induction heads. The first token of the second pass follows tL,
which gives no clue to t1, so it is scored with the first pass.

Copying is what a tool call's arguments need: a city, a path or a code snippet from the user's
request must come out token for token. A model whose repeat accuracy is near zero cannot pass
the tools suite's exact-argument check however its tool-call training went, and needs more
pretraining first.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from codeling.errors import CodelingError
from codeling.tokenizer import SPECIAL_TOKENS
from codeling.training.device import autocast

log = logging.getLogger(__name__)

DEFAULT_ROWS = 16
DEFAULT_LENGTH = 64


@torch.no_grad()
def copying_score(model: nn.Module, eos_id: int | None, rows: int = DEFAULT_ROWS,
                  length: int = DEFAULT_LENGTH, seed: int = 0,
                  device: torch.device | str = "cpu", bf16: bool = False) -> dict[str, Any]:
    """Return the losses (nats per token) and top-1 accuracy on the first and second pass.

    `copy_gain` is the first-pass loss minus the second-pass loss: near 0 for a model that does
    not copy, up to the first-pass loss for one that copies perfectly. With `eos_id` None the
    rows start with the sequence itself, as `codeling.evaluation.recall.copy_recall` lays them.
    """
    vocab_size = model.config.vocab_size
    first_ordinary = len(SPECIAL_TOKENS)
    if vocab_size <= first_ordinary + 1:
        raise CodelingError(f"vocab_size {vocab_size} leaves no ordinary tokens to copy; the "
                            f"first {first_ordinary} ids are special tokens")
    if rows < 1 or length < 2:
        raise CodelingError(f"copying probe needs rows >= 1 and length >= 2, got rows {rows} "
                            f"and length {length}")
    prefix = 0 if eos_id is None else 1
    if 2 * length + prefix > model.config.max_seq_len:
        raise CodelingError(f"copying probe rows of 2 x {length} + {prefix} tokens exceed the "
                            f"model's context {model.config.max_seq_len}; pass a smaller length")
    generator = torch.Generator().manual_seed(seed)
    sequence = torch.randint(first_ordinary, vocab_size, (rows, length), generator=generator)
    eos = torch.full((rows, prefix), 0 if eos_id is None else eos_id, dtype=torch.long)
    tokens = torch.cat([eos, sequence, sequence], dim=1).to(device)  # (rows, 2L + prefix)

    was_training = model.training
    model.eval()
    try:
        with autocast(torch.device(device), bf16):
            logits = model(tokens[:, :-1])  # (rows, P, V) with P = 2L + prefix - 1
    finally:
        model.train(was_training)
    logits = logits.float()
    targets = tokens[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (rows, P)
    correct = (logits.argmax(dim=-1) == targets).float()
    # With the eos prefix, positions 0..L predict the first pass and t1 of the second, and
    # L+1..2L-1 can be copied. Without it, every position is one earlier and t1 is not predicted.
    first = slice(0, length + prefix)
    second = slice(length + prefix, 2 * length - 1 + prefix)
    first_loss = float(losses[:, first].mean())
    second_loss = float(losses[:, second].mean())
    return {
        "rows": rows,
        "length": length,
        "chance_loss": math.log(vocab_size - first_ordinary),
        "first_pass_loss": first_loss,
        "second_pass_loss": second_loss,
        "copy_gain": first_loss - second_loss,
        "first_pass_accuracy": float(correct[:, first].mean()),
        "second_pass_accuracy": float(correct[:, second].mean()),
    }


def report_table(results: dict[str, dict]) -> list[str]:
    """Return the report card's copying table: one column per stage that ran the suite."""
    stages = [stage for stage, result in results.items() if "copying" in result]
    if not stages:
        return []
    first = results[stages[0]]["copying"]
    rows = [("second-pass top-1 accuracy", "second_pass_accuracy", "{:.1%}"),
            ("second-pass loss (nats)", "second_pass_loss", "{:.2f}"),
            ("first-pass loss (nats)", "first_pass_loss", "{:.2f}"),
            ("copy gain (nats)", "copy_gain", "{:.2f}")]
    lines = ["## In-context copying", "",
             f"{first['rows']} random sequences of {first['length']} ordinary tokens, each "
             "repeated once. The first pass cannot be predicted (chance: "
             f"{first['chance_loss']:.2f} nats). A model that copies predicts the second pass: "
             "tool-call arguments need this. One column per stage's final checkpoint.", "",
             "| measure | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for label, key, form in rows:
        lines.append(f"| {label} | " + " | ".join(
            form.format(results[stage]["copying"][key]) for stage in stages) + " |")
    return lines + [""]


def warn_if_no_copying(model: nn.Module, eos_id: int, device: torch.device | str = "cpu",
                       bf16: bool = False, threshold: float = 0.05) -> dict[str, Any]:
    """Probe a model before tool-call training and warn when it cannot copy; return the result.

    Exact tool-call arguments need copying, so a starting checkpoint below `threshold`
    second-pass accuracy will mostly write memorized argument values.
    """
    result = copying_score(model, eos_id, device=device, bf16=bf16,
                           length=min(DEFAULT_LENGTH, (model.config.max_seq_len - 1) // 2))
    accuracy = result["second_pass_accuracy"]
    if accuracy < threshold:
        log.warning("the starting checkpoint does not copy from its context (second-pass top-1 "
                    "%.1f%% on repeated random tokens), so its tool-call arguments will be "
                    "memorized values rather than copies of the request; train the language and "
                    "code stages longer first (docs/reference/TROUBLESHOOTING.md)", 100 * accuracy)
    else:
        log.info("copying probe of the starting checkpoint: second-pass top-1 %.1f%%",
                 100 * accuracy)
    return result
