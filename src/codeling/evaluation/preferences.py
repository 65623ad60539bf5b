"""The `preferences` suite: does a checkpoint prefer the chosen responses of held-out pairs?

For each held-out pair the suite scores both responses with the checkpoint (log-probabilities
summed over the response's tokens, as DPO does) and reports:

- logp_accuracy: share of pairs where log π(chosen) > log π(rejected);
- mean_logp_accuracy: the same with log-probabilities averaged per token, which does not favor
  the shorter response;
- reward_accuracy and mean reward margin, when the checkpoint was tuned by DPO: the implicit
  reward β [log π(y) - log π_ref(y)] of the chosen response is higher than the rejected one's,
  with π_ref the checkpoint the DPO stage started from (its `init_from`) and β its `train.beta`.

Each metric is also split by the pair's kind (for example code/wrong_result or
tool/wrong_tool), so a report shows which mistakes the model learned to avoid.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from codeling.data import preferences
from codeling.errors import CodelingError
from codeling.inference.generate import Generator
from codeling.training import checkpoint as ckpt
from codeling.training.dpo import load_reference, sequence_log_probs
from codeling.training.device import autocast

log = logging.getLogger(__name__)


def dpo_reference(checkpoint: Path) -> tuple[Path, float] | None:
    """Return (reference checkpoint, beta) of a checkpoint trained with DPO, else None."""
    loaded = ckpt.read_checkpoint_config(checkpoint)
    config = loaded.config
    if config.train.objective != "dpo" or not config.init_from:
        return None
    run_dir = checkpoint.absolute().parents[2]
    stage_dir = run_dir / config.init_from
    if "/" not in config.init_from and stage_dir.is_dir():
        return ckpt.resolve_checkpoint(stage_dir), config.train.beta
    return ckpt.resolve_checkpoint(config.init_from), config.train.beta


@torch.no_grad()
def score_pairs(model: torch.nn.Module, examples: list[preferences.PairExample], pad_id: int,
                device: torch.device, bf16: bool, batch_size: int = 8
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return summed log-probabilities and token counts of the chosen and rejected responses."""
    sums, counts = [], []
    seq_len = max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples)
    for inputs, targets in preferences.iter_pair_batches(examples, batch_size, seq_len, pad_id):
        with autocast(device, bf16):
            logits = model(inputs.to(device))  # (2B, L, V)
        total, count = sequence_log_probs(logits, targets.to(device))
        pairs = inputs.shape[0] // 2
        sums.append(torch.stack([total[:pairs], total[pairs:]], dim=1).cpu())  # (B, 2)
        counts.append(torch.stack([count[:pairs], count[pairs:]], dim=1).cpu())
    summed, counted = torch.cat(sums), torch.cat(counts).float()
    return summed[:, 0], summed[:, 1], counted[:, 0], counted[:, 1]


def _metrics(mask: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
             chosen_mean: torch.Tensor, rejected_mean: torch.Tensor,
             margin: torch.Tensor | None) -> dict[str, Any]:
    count = int(mask.sum())
    result: dict[str, Any] = {
        "pairs": count,
        "logp_accuracy": float((chosen[mask] > rejected[mask]).float().mean()),
        "mean_logp_accuracy": float((chosen_mean[mask] > rejected_mean[mask]).float().mean()),
    }
    if margin is not None:
        result["reward_accuracy"] = float((margin[mask] > 0).float().mean())
        result["reward_margin"] = float(margin[mask].mean())
    return result


def evaluate_preferences(generator: Generator, data_file: Path, checkpoint: Path | None = None,
                         limit: int = 0) -> dict[str, Any]:
    """Score the held-out pairs in `data_file` with the generator's model.

    With `checkpoint` (the evaluated one) trained by DPO, the rewards against its reference
    model are scored too.
    """
    if not data_file.is_file():
        raise CodelingError(f"held-out preference pairs not found at {data_file}; build them "
                            "with `codeling data preferences --run RUN --out DIR` or run the "
                            "rlhf stage, or pass another file")
    pairs = preferences.read_preferences(data_file)[:limit or None]
    context = generator.model.config.max_seq_len
    # Pairs longer than the model's context are left out and counted.
    examples = preferences.tokenize_pairs(
        pairs, generator.tokenizer, context, str(data_file),
        fix="they are not scored, because they do not fit the model's context")
    device, bf16 = generator.device, generator.bf16
    model = generator.model
    chosen, rejected, chosen_count, rejected_count = score_pairs(
        model, examples, generator.tokenizer.pad_id, device, bf16)
    margin = None
    result: dict[str, Any] = {"data": str(data_file), "reference": None,
                              "skipped_too_long": len(pairs) - len(examples)}
    found = dpo_reference(checkpoint) if checkpoint is not None else None
    if found is not None:
        reference_path, beta = found
        reference = load_reference(reference_path, model, device)
        ref_chosen, ref_rejected, _, _ = score_pairs(
            reference, examples, generator.tokenizer.pad_id, device, bf16)
        margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        result["reference"] = str(reference_path)
        result["beta"] = beta
    chosen_mean = chosen / chosen_count.clamp(min=1)
    rejected_mean = rejected / rejected_count.clamp(min=1)
    everything = torch.ones(len(examples), dtype=torch.bool)
    result["all"] = _metrics(everything, chosen, rejected, chosen_mean, rejected_mean, margin)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        groups[example.kind or "unlabeled"].append(index)
    result["kinds"] = {}
    for kind in sorted(groups):
        mask = torch.zeros(len(examples), dtype=torch.bool)
        mask[groups[kind]] = True
        result["kinds"][kind] = _metrics(mask, chosen, rejected, chosen_mean, rejected_mean,
                                         margin)
    summary = result["all"]
    log.info("preferences: %d held-out pairs, log-prob accuracy %.1f%% (per token %.1f%%)%s",
             summary["pairs"], 100 * summary["logp_accuracy"],
             100 * summary["mean_logp_accuracy"],
             f", reward accuracy {100 * summary['reward_accuracy']:.1f}%" if margin is not None
             else "")
    return result


def report_section(stage: str, result: dict[str, Any]) -> list[str]:
    """Lines of the report card for one stage's preference results."""
    with_reward = result.get("reference") is not None
    lines = [f"## Held-out preference pairs ({stage})", "",
             "Share of pairs where the model gives the chosen response a higher log-probability "
             "than the rejected one (summed over the response's tokens, and averaged per token)"
             + (f"; reward accuracy compares the DPO rewards against the reference "
                f"`{result['reference']}` (beta {result['beta']:g})" if with_reward else "")
             + ".", "",
             "| kind | pairs | log-prob accuracy | per-token accuracy |"
             + (" reward accuracy | reward margin |" if with_reward else ""),
             "|---|---|---|---|" + ("---|---|" if with_reward else "")]
    rows = [("all", result["all"])] + list(result["kinds"].items())
    for kind, metrics in rows:
        line = (f"| {kind} | {metrics['pairs']} | {100 * metrics['logp_accuracy']:.1f}% | "
                f"{100 * metrics['mean_logp_accuracy']:.1f}% |")
        if with_reward:
            line += f" {100 * metrics['reward_accuracy']:.1f}% | {metrics['reward_margin']:.3f} |"
        lines.append(line)
    return lines + [""]
