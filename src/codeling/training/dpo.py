"""Direct preference optimization against a frozen reference model (`train.objective: dpo`).

For a prompt x with a chosen completion y_w and a rejected one y_l, let

    log π(y | x) = the sum of the policy's log-probabilities of the completion tokens only
                   (the assistant turn and its closing <|end_turn|>, never the prompt)
    h = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)]

where π_ref is the frozen reference model: the `init_from` checkpoint. The losses per pair are

    sigmoid (DPO, Rafailov et al. 2023):   -(1 - ε) log σ(β h) - ε log σ(-β h)
    ipo     (IPO, Azar et al. 2023):       (h - 1 / (2 β))²

with β = `train.beta` and ε = `train.label_smoothing`. ε > 0 is conservative DPO: it treats each
label as flipped with probability ε, so the loss stops pushing once β h is large.

DPO only widens the gap between the two responses, so it can lower both. On pairs that differ
in one argument of a tool call, it lowers the whole call. With α = `train.dpo_nll_weight` > 0,
the objective adds α times the chosen responses' mean next-token loss per token, which keeps
their likelihood up.
The implicit rewards are r_w = β [log π(y_w|x) - log π_ref(y_w|x)] and r_l likewise. Logged per
step: the loss, reward accuracy (share of pairs with r_w > r_l), the mean chosen and rejected
rewards, the margin r_w - r_l, and `kl_chosen`, the mean per-token log π - log π_ref on the
chosen completions. `kl_chosen` estimates KL(π || π_ref) only roughly, because the chosen
completions are data, not samples of π.

`run_training` in `codeling.stages.pretrain` runs the loop: `build_preference_loaders` gives it
the batches and a validation split, and `build_dpo_loss` the `DPOLoss` hook that `Trainer` calls
in place of its next-token loss, so checkpoints, resume, LoRA, logging and DDP work as for the
other objectives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from codeling.config import RunConfig
from codeling.data import preferences
from codeling.data.chat_data import IGNORE_INDEX, scored_positions
from codeling.data.preference_builder import build_settings_of
from codeling.errors import CodelingError, ConfigError
from codeling.models.decoder import CodeModel
from codeling.tokenizer import Tokenizer
from codeling.training import checkpoint as ckpt
from codeling.training import distributed
from codeling.training.device import autocast
from codeling.training.trainer import ValidationSplit

log = logging.getLogger(__name__)

DPO_LOSSES = ("sigmoid", "ipo")
METRICS = ("reward_accuracy", "chosen_reward", "rejected_reward", "margin", "kl_chosen",
           "nll_chosen")


# -- the loss, as plain functions ---------------------------------------------------------------


def sequence_log_probs(logits: torch.Tensor, targets: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sum of target log-probabilities, number of targets) per row.

    logits (N, L, V), targets (N, L) holding IGNORE_INDEX where a position is not scored.
    Both results have shape (N,). The log-probabilities are computed in fp32.
    """
    token_log_probs = -F.cross_entropy(logits.float().transpose(1, 2), targets,
                                       ignore_index=IGNORE_INDEX, reduction="none")  # (N, L)
    scored = targets != IGNORE_INDEX  # (N, L)
    return (token_log_probs * scored).sum(dim=1), scored.sum(dim=1)


@dataclass
class PreferenceLoss:
    """Per-pair losses and implicit rewards, each of shape (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    reference_chosen: torch.Tensor, reference_rejected: torch.Tensor,
                    beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0) -> PreferenceLoss:
    """Compute the DPO (sigmoid) or IPO loss from sequence log-probabilities, each (B,)."""
    if loss_type not in DPO_LOSSES:
        raise ConfigError([f"train.dpo_loss: {loss_type!r} is not one of: "
                           f"{', '.join(DPO_LOSSES)}"])
    chosen_ratio = policy_chosen - reference_chosen  # (B,)
    rejected_ratio = policy_rejected - reference_rejected  # (B,)
    h = chosen_ratio - rejected_ratio  # (B,)
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


# -- the hook the trainer calls -----------------------------------------------------------------


class DPOLoss:
    """The training loss of one micro-batch of pairs, plus running metrics for the log.

    A batch contains B pairs as 2B rows: chosen completions in rows 0..B-1 and the rejected ones
    in rows B..2B-1, in the same order (see `codeling.data.preferences.pairs_to_batch`).
    """

    def __init__(self, policy: CodeModel, reference: CodeModel, beta: float, loss_type: str,
                 label_smoothing: float, device: torch.device, bf16: bool,
                 nll_weight: float = 0.0):
        self.policy = policy  # unwrapped, for the MoE balancing losses
        self.reference = reference
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.nll_weight = nll_weight
        self.device = device
        self.bf16 = bf16
        self.has_moe = policy.config.resolved_ffn() == "moe"
        self._sums = [0.0] * len(METRICS)
        self._batches = 0

    def log_probs(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (summed completion log-probabilities, completion token counts), each (2B,).

        The model projects onto the vocabulary only at the scored positions. The result is the
        same as `sequence_log_probs` over logits at every position.
        """
        rows, length = targets.shape
        scored = scored_positions(targets)  # (N,)
        with autocast(self.device, self.bf16):
            logits = model(inputs, positions=scored)  # (N, V)
        token_log_probs = -F.cross_entropy(logits.float(), targets.reshape(-1)[scored],
                                           reduction="none")  # (N,)
        row = torch.div(scored, length, rounding_mode="floor")
        sums = token_log_probs.new_zeros(rows).index_add(0, row, token_log_probs)
        return sums, torch.bincount(row, minlength=rows)

    def pair_loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[PreferenceLoss, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the pair losses, the policy-minus-reference log-ratio of each chosen
        completion (B,), its completion token count (B,), and the policy's summed
        log-probability of each chosen completion (B,), with gradient."""
        if inputs.shape[0] % 2:
            raise CodelingError(f"a preference batch needs an even number of rows (chosen, then "
                                f"rejected), got {inputs.shape[0]}")
        pairs = inputs.shape[0] // 2
        policy, counts = self.log_probs(model, inputs, targets)
        with torch.no_grad():
            reference, _ = self.log_probs(self.reference, inputs, targets)
        result = preference_loss(policy[:pairs], policy[pairs:], reference[:pairs],
                                 reference[pairs:], self.beta, self.loss_type,
                                 self.label_smoothing)
        return (result, (policy[:pairs] - reference[:pairs]).detach(), counts[:pairs],
                policy[:pairs])

    def __call__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (objective to differentiate, mean DPO loss) and record the batch's metrics.

        The objective is the mean DPO loss, plus `nll_weight` times the chosen responses'
        next-token loss per token, plus the MoE balancing losses.
        """
        result, chosen_ratio, counts, chosen_log_probs = self.pair_loss(model, inputs, targets)
        loss = result.losses.mean()
        nll = -chosen_log_probs.sum() / counts.sum().clamp(min=1)
        self._record({**batch_metrics(result, chosen_ratio, counts), "nll_chosen": float(nll.detach())})
        objective = loss + self.nll_weight * nll if self.nll_weight else loss
        if self.has_moe:
            objective = objective + self.policy.auxiliary_loss()
        return objective, loss

    def _record(self, values: dict[str, float]) -> None:
        self._sums = [total + values[name] for total, name in zip(self._sums, METRICS)]
        self._batches += 1

    def step_metrics(self) -> dict[str, float]:
        """Return the metrics averaged over the micro-batches since the last call and over
        all ranks, then reset them. Call it on every rank once per optimizer step."""
        totals = distributed.all_reduce(self._sums + [float(self._batches)])
        self._sums, self._batches = [0.0] * len(METRICS), 0
        batches = max(totals[-1], 1.0)
        return {name: total / batches for name, total in zip(METRICS, totals[:-1])}


def batch_metrics(result: PreferenceLoss, chosen_ratio: torch.Tensor,
                  counts: torch.Tensor) -> dict[str, float]:
    """Return the logged metrics of one batch as floats (means over its pairs)."""
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    return {
        "reward_accuracy": float((chosen > rejected).float().mean()),
        "chosen_reward": float(chosen.mean()),
        "rejected_reward": float(rejected.mean()),
        "margin": float((chosen - rejected).mean()),
        "kl_chosen": float((chosen_ratio.sum() / counts.sum().clamp(min=1))),
    }


# -- building the stage -------------------------------------------------------------------------


def check_config(config: RunConfig) -> None:
    """Raise ConfigError when a dpo config misses what it needs."""
    problems = []
    if not config.init_from:
        problems.append("train.objective is dpo but init_from is empty; DPO starts from and "
                        "compares against a trained model, so set init_from to the tools stage "
                        "or a checkpoint")
    specs = [spec for spec in config.data.sources if not preferences.is_preference_source(spec)]
    if specs or not config.data.sources:
        problems.append(f"train.objective is dpo, so data.sources must be preference sources "
                        f"({preferences.PREFERENCES}[:KEY=VALUE,...] or prefs:PATH.jsonl), got "
                        f"{config.data.sources}")
    if config.data.replay_sources or config.data.replay_fraction:
        problems.append("data.replay_sources and data.replay_fraction do not apply to dpo; "
                        "remove them")
    if config.data.weights:
        problems.append("data.weights does not apply to preference sources; remove it")
    if config.train.dpo_loss == "ipo" and config.train.label_smoothing:
        problems.append("train.label_smoothing applies to the sigmoid loss only; set it to 0 "
                        "with train.dpo_loss: ipo")
    for spec in config.data.sources:
        if spec.split(":")[0] == preferences.PREFERENCES:
            try:
                build_settings_of(spec)
            except CodelingError as error:
                problems.append(f"data.sources: {error}")
    if problems:
        raise ConfigError(problems)


def load_reference(checkpoint: Path, model: CodeModel, device: torch.device) -> CodeModel:
    """Load the frozen reference model from `checkpoint`, with the policy's architecture."""
    reference = CodeModel(model.config)
    ckpt.load_weights(reference, checkpoint)
    reference.requires_grad_(False)
    return reference.to(device).eval()


def build_preference_loaders(config: RunConfig, run_dir: Path, tokenizer: Tokenizer,
                             checkpoint: Path, rank: int = 0, world_size: int = 1
                             ) -> tuple[preferences.PreferenceLoader, list[ValidationSplit]]:
    """Build the preference loader and the validation split of a dpo stage.

    The `preferences` source is built from `checkpoint` (the reference) on first use. The
    validation split scores the next-token loss on the chosen responses of the validation pairs,
    so its bits per byte show whether DPO keeps the chosen responses likely. Held-out reward
    accuracy is measured by the `preferences` eval suite.
    """
    train = config.train
    max_len = train.seq_len + 1
    train_pairs, val_pairs = [], []
    for spec in config.data.sources:
        train_records, val_records = preferences.load_preference_splits(
            spec, run_dir, checkpoint, config.data.val_fraction, seed=train.seed)
        name = preferences.source_name(spec)
        train_pairs += preferences.tokenize_pairs(train_records, tokenizer, max_len,
                                                  f"{name} train")
        if val_records:
            val_pairs += preferences.tokenize_pairs(val_records, tokenizer, max_len,
                                                    f"{name} val", allow_empty=True)
    log.info("preference pairs: %d for training, %d for validation; %.1f response tokens per "
             "chosen and %.1f per rejected response on average", len(train_pairs),
             len(val_pairs), sum(int(p.chosen_mask.sum()) for p in train_pairs) / len(train_pairs),
             sum(int(p.rejected_mask.sum()) for p in train_pairs) / len(train_pairs))
    loader = preferences.PreferenceLoader(train_pairs, train.batch_size, train.seq_len,
                                          tokenizer.pad_id, seed=train.seed, rank=rank,
                                          world_size=world_size)
    splits = []
    if val_pairs:
        ratio = preferences.chosen_bytes_per_token(val_pairs, tokenizer)
        batches = (lambda: preferences.iter_chosen_eval_batches(
            val_pairs, train.batch_size, train.seq_len, tokenizer.pad_id, train.eval_batches))
        splits.append(ValidationSplit("chosen responses", batches, ratio))
    return loader, splits


def build_dpo_loss(config: RunConfig, model: CodeModel, checkpoint: Path, device: torch.device,
                   bf16: bool) -> DPOLoss:
    """Load the frozen reference from `checkpoint` and return the loss hook for the Trainer."""
    train = config.train
    reference = load_reference(checkpoint, model, device)
    log.info("DPO: %s loss, beta %g, label smoothing %g, chosen NLL weight %g, reference %s",
             train.dpo_loss, train.beta, train.label_smoothing, train.dpo_nll_weight, checkpoint)
    if train.compile:
        log.info("train.compile does not apply to the dpo objective; it runs eagerly")
    return DPOLoss(model, reference, train.beta, train.dpo_loss, train.label_smoothing, device,
                   bf16, train.dpo_nll_weight)
