"""The training loop: micro-batches, accumulation, clipping, schedule, logging, eval, checkpoints.

`Trainer.fit` runs until the step, token, epoch or wall-clock budget runs out, whichever comes
first. It logs one line every `log_every` steps, appends every record to `metrics.jsonl`,
evaluates on each validation split, saves checkpoints atomically, and on Ctrl-C or SIGTERM
saves a last checkpoint before it stops, so `--resume` loses nothing.

Under torchrun each rank runs the same loop on its share of every global batch, with the
model wrapped in DistributedDataParallel. Only rank 0 logs, writes metrics and plots, and
saves checkpoints; the other ranks wait at a barrier after each save.
"""

from __future__ import annotations

import json
import logging
import math
import random
import contextlib
import functools
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from codeling.config import RunConfig
from codeling.data.chat_data import scored_positions
from codeling.errors import CodelingError, ConfigError
from codeling.models import lora
from codeling.training import checkpoint as ckpt
from codeling.training import distributed
from codeling.training import loggers
from codeling.training.distributed import DistInfo
from codeling.training.device import autocast, peak_flops
from codeling.training.optim import build_optimizer, lr_at

log = logging.getLogger(__name__)


@dataclass
class ValidationSplit:
    """Held-out tokens of one source, with the UTF-8 bytes they decode to (for bits per byte)."""

    name: str
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    bytes_per_token: float


@dataclass
class TrainResult:
    step: int
    tokens: int
    elapsed: float
    final_loss: float
    val: dict[str, dict[str, float]] = field(default_factory=dict)
    stop_reason: str = ""
    checkpoint: Path | None = None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class _StopRequest:
    """Turns SIGTERM into a flag the loop checks, so the run checkpoints before exiting."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_StopRequest":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """Owns the optimizer and the loop for one stage of a run.

    `dist` places this process in a data-parallel job (default: a single process). The
    loader must already be built for the same rank and world size.

    `loss_hook` replaces the next-token loss with another objective (DPO): it is called as
    `loss_hook(model, inputs, targets)` with the DDP-wrapped model and returns (objective to
    differentiate, loss to log), and `loss_hook.step_metrics()`, called on every rank after each
    optimizer step, returns extra metrics for the log line and metrics.jsonl.
    """

    def __init__(self, model: torch.nn.Module, config: RunConfig, train_loader, val_splits:
                 list[ValidationSplit], stage_dir: Path, tokenizer_dir: Path,
                 tokenizer_fingerprint: str, device: torch.device, bf16: bool,
                 dist: DistInfo | None = None, loss_hook=None):
        self.model = model  # unwrapped: checkpoints and model methods use it
        self.dist = dist or DistInfo(device=device)
        if (config.train.activation_checkpointing and config.train.compile
                and model.config.resolved_ffn() == "moe"):
            # torch.compile cannot trace the context that keeps a MoE layer's recomputation
            # from counting its routing twice.
            raise ConfigError(["train.activation_checkpointing=true with train.compile=true is "
                               "not supported for MoE models; set one of them to false"])
        model.activation_checkpointing = config.train.activation_checkpointing
        # Forward and backward; with FSDP, the model itself, sharded in place.
        self.ddp_model = distributed.wrap_model(model, self.dist, config.train.distributed)
        loggers.check_installed(config.train.log_to)
        self.trackers: loggers.Trackers | None = None
        self.config = config
        self.train = config.train
        self.loader = train_loader
        self.val_splits = val_splits
        self.stage_dir = Path(stage_dir)
        self.tokenizer_dir = Path(tokenizer_dir)
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.device = device
        self.bf16 = bf16
        self.optimizer = build_optimizer(model, self.train, device)
        self.step = 0
        self.tokens = 0
        self.last_step_tokens = 0
        self.last_step_flops = 0.0  # estimated, over all ranks, for MFU
        self.elapsed = 0.0
        self.tokens_per_step = (self.train.batch_size * self.train.seq_len
                                * self.train.grad_accum * self.dist.world_size)
        self.total_steps = self._total_steps()
        # Compiling forward and loss together lets the compiler fuse the cross-entropy too.
        self.loss_fn = torch.compile(self._train_loss) if self.train.compile else self._train_loss
        self.loss_hook = loss_hook
        if loss_hook is not None:
            self.loss_fn = functools.partial(loss_hook, self.ddp_model)  # runs eagerly
        self.step_metrics: dict[str, float] = {}
        self.has_moe = model.config.resolved_ffn() == "moe"
        self.metrics_path = self.stage_dir / "metrics.jsonl"

    def _total_steps(self) -> int:
        """Return the optimizer steps the step, token and epoch budgets allow, and remember
        which budget is the tightest, for the stop reason."""
        budgets = {"step budget": self.train.max_steps}
        if self.train.max_tokens:
            budgets["token budget"] = math.ceil(self.train.max_tokens / self.tokens_per_step)
        if self.train.max_epochs:
            per_epoch = getattr(self.loader, "batches_per_epoch", None)
            if per_epoch is None:
                raise CodelingError(f"train.max_epochs {self.train.max_epochs} needs a loader "
                                    f"that knows its epoch size, and {type(self.loader).__name__}"
                                    " does not; use train.max_steps or train.max_tokens")
            budgets["epoch budget"] = max(1, math.ceil(
                self.train.max_epochs * per_epoch / self.train.grad_accum))
        self.budget_name = min(budgets, key=budgets.get)
        return budgets[self.budget_name]

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Return the step counters, optimizer, global loader position and this rank's RNG."""
        return {
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
            "optimizer": distributed.full_optimizer_state(self.optimizer.state_dict()),
            "loader": self.loader.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate()},
            # Adapters, so a resumed LoRA run continues from them (the weights are merged).
            **({"lora": lora.adapter_state_dict(self.model)} if lora.has_lora(self.model) else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.optimizer.load_state_dict(
            distributed.shard_optimizer_state(state["optimizer"], self.optimizer))
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    def save(self) -> Path:
        """Write a checkpoint on rank 0, wait for it on every rank, and return its path.

        The weights, optimizer and loader state are the same on every rank, so rank 0's copy
        is the whole checkpoint. The RNG state saved is rank 0's. Under FSDP every rank first
        takes part in gathering the shards into full tensors.
        """
        path = self.stage_dir / "checkpoints" / ckpt.checkpoint_name(self.step)
        model, state = distributed.full_model(self.model), self.state_dict()
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.stage_dir, self.step, model, self.config,
                                        state, self.tokenizer_dir,
                                        self.tokenizer_fingerprint,
                                        keep=self.train.keep_checkpoints)
            log.info("saved checkpoint %s", path)
        distributed.barrier()
        return path

    # -- loop -----------------------------------------------------------------------------------

    def progress(self) -> float:
        """Fraction of the budget used: the furthest along of steps, tokens and time."""
        fraction = self.step / self.total_steps
        if self.train.max_minutes:
            fraction = max(fraction, self.elapsed / (60 * self.train.max_minutes))
        return fraction

    def _stop_reason(self) -> str:
        if self.step >= self.total_steps:
            return self.budget_name
        if self.train.max_minutes and self.elapsed >= 60 * self.train.max_minutes:
            return "time budget"
        return ""

    def _scored(self, targets: torch.Tensor) -> torch.Tensor | None:
        """Flat indices of the scored targets for objective sft, else None (every target).

        Taken outside the compiled loss: the count depends on the data, which the compiler
        cannot trace without a graph break.
        """
        if self.train.objective != "sft":
            return None
        return scored_positions(targets)

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor,
              model: torch.nn.Module | None = None,
              scored: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy in nats, with logits upcast to fp32.

        With `scored` (from `_scored`), logits are computed at those positions only; the loss is
        the same, since the other targets are ignored.
        """
        with autocast(self.device, self.bf16):
            if scored is None:
                logits = (model or self.model)(inputs).flatten(0, 1)  # (B * T, V)
            else:
                logits = (model or self.model)(inputs, positions=scored)  # (N, V)
        flat = targets.view(-1) if scored is None else targets.view(-1).index_select(0, scored)
        return torch.nn.functional.cross_entropy(logits.float(), flat)

    def _train_loss(self, inputs: torch.Tensor, targets: torch.Tensor,
                    scored: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (objective, language-model loss): the objective adds MoE balancing losses."""
        loss = self._loss(inputs, targets, self.ddp_model, scored)
        auxiliary = self.model.auxiliary_loss() if self.has_moe else torch.zeros_like(loss)
        return loss + auxiliary, loss

    def _sync_context(self, micro_step: int) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on every micro-batch but the last of a step."""
        if self.dist.enabled and micro_step < self.train.grad_accum - 1:
            return distributed.skip_gradient_sync(self.ddp_model)
        return contextlib.nullcontext()

    def train_step(self) -> tuple[float, float]:
        """Run one optimizer step over grad_accum micro-batches; return (loss, grad norm).

        Under DDP the loss is the mean over all ranks, and the grad norm is taken after DDP's
        all-reduce, so both describe the global batch. `self.tokens` grows by the input tokens
        the step processed on all ranks: batch x seq_len per row for language modeling, and
        each batch's padded length for SFT, whose rows are cut to the batch's longest
        conversation.
        """
        lr = lr_at(self.step, self.progress(), self.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total_loss, processed, flops = 0.0, 0, 0.0
        for micro_step in range(self.train.grad_accum):
            inputs, targets = next(self.loader)
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            processed += inputs.numel()
            with self._sync_context(micro_step):
                if self.loss_hook is not None:
                    # NOTE: a rough MFU input for DPO. It charges the head at every
                    # position and leaves out the reference model's forward passes.
                    flops += inputs.numel() * self.model.flops_per_token(inputs.shape[1])
                    objective, loss = self.loss_fn(inputs, targets)
                else:
                    scored = self._scored(targets)
                    flops += self._batch_flops(inputs, scored)
                    if scored is not None and self.train.compile:
                        # SFT batches vary in length and in scored count. Marked dynamic, the
                        # first compilation serves them all instead of recompiling on each
                        # new size until the compiler gives up on static shapes.
                        torch._dynamo.maybe_mark_dynamic(inputs, 1)
                        torch._dynamo.maybe_mark_dynamic(targets, 1)
                        torch._dynamo.maybe_mark_dynamic(scored, 0)
                    objective, loss = self.loss_fn(inputs, targets, scored)
                (objective / self.train.grad_accum).backward()
            total_loss += loss.item() / self.train.grad_accum
        total_loss, processed, flops = distributed.all_reduce([total_loss, float(processed),
                                                               flops])
        total_loss /= self.dist.world_size
        if self.loss_hook is not None:
            self.step_metrics = self.loss_hook.step_metrics()
        if self.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_optimizer_step()
        self.step += 1
        self.last_step_tokens = int(processed)
        self.last_step_flops = flops
        self.tokens += self.last_step_tokens
        return total_loss, float(norm)

    def _batch_flops(self, inputs: torch.Tensor, scored: torch.Tensor | None) -> float:
        """Estimate the training FLOPs of one micro-batch, for MFU.

        Each row costs its padded length's per-token FLOPs, and the output head counts only
        the positions whose logits are computed: all of them for language modeling, the
        scored ones for SFT.
        """
        body = inputs.numel() * self.model.flops_per_token(inputs.shape[1], head=False)
        head_positions = inputs.numel() if scored is None else scored.numel()
        return body + head_positions * self.model.head_flops_per_token()

    @torch.no_grad()
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Return mean validation loss (nats/token) and bits per byte for each split.

        The mean is over batches. Under DDP rank r evaluates batches r, r + world_size, ...
        and the sums are all-reduced, so every rank returns the same result. Call it on
        every rank. Under FSDP the ranks run the same number of forward passes.
        """
        self.model.eval()
        lockstep = distributed.is_sharded(self.model)
        results = {}
        for split in self.val_splits:
            loss_sum, batch_count = 0.0, 0
            for (inputs, targets), counted in distributed.batches_for_rank(
                    split.batches(), self.dist, lockstep):
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                loss = self._loss(inputs, targets, scored=self._scored(targets)).item()
                if counted:
                    loss_sum += loss
                    batch_count += 1
            loss_sum, batch_count = distributed.all_reduce([loss_sum, batch_count])
            if batch_count:
                mean = loss_sum / batch_count
                results[split.name] = {
                    "loss": mean, "bits_per_byte": mean / math.log(2) / split.bytes_per_token}
        self.model.train()
        return results

    def trim_metrics(self) -> None:
        """Drop metrics logged after the current step, left by a run killed before its checkpoint."""
        if not self.dist.is_main or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= self.step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _write_metrics(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.write(record)

    def fit(self, stop_at_step: int | None = None) -> TrainResult:
        """Train until a budget runs out; return the final metrics and checkpoint.

        `stop_at_step` ends the run early, as an interruption would, without changing the
        schedule, which still follows the full budget.
        """
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        peak, peak_source = peak_flops(self.device, self.bf16)
        if self.dist.is_main:
            log.info("MFU is measured against %.3g GFLOP/s per device (%s)", peak / 1e9,
                     peak_source)
        peak *= self.dist.world_size  # the token rate below counts the global batch
        if self.dist.is_main and self.train.log_to:
            self.trackers = loggers.open_trackers(self.train.log_to, self.stage_dir,
                                                  self.config, self.step)
        self.model.train()
        window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
        loss, stop_reason, val = float("nan"), "", {}
        bar = _progress_bar(self.total_steps, self.step) if self.dist.is_main else None
        with _StopRequest() as stop:
            try:
                while not (stop_reason := self._stop_reason()):
                    step_start = time.perf_counter()
                    loss, norm = self.train_step()
                    self.elapsed += time.perf_counter() - step_start
                    window_tokens += self.last_step_tokens
                    window_flops += self.last_step_flops
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3f}")
                    if not math.isfinite(loss):
                        raise FloatingPointError(
                            f"loss became {loss} at step {self.step}; lower train.lr or "
                            "set train.grad_clip, then resume from the last checkpoint")
                    if self.step % self.train.log_every == 0 or self.step == 1:
                        now = time.perf_counter()
                        seconds = max(now - window_start, 1e-9)
                        if self.dist.is_main:
                            self._log_step(loss, norm, window_tokens / seconds,
                                           window_flops / seconds / peak)
                        window_start, window_tokens, window_flops = now, 0, 0.0
                    if self.train.eval_every and self.step % self.train.eval_every == 0:
                        val = self._run_eval()
                    if self.train.checkpoint_every and self.step % self.train.checkpoint_every == 0:
                        self.save()
                    if self.dist.enabled:
                        self._sync_stop_state(stop)
                    if stop.requested:
                        stop_reason = "SIGTERM"
                        break
                    if stop_at_step is not None and self.step >= stop_at_step:
                        stop_reason = "stop_at_step"
                        break
            except KeyboardInterrupt:
                # NOTE: under DDP a Ctrl-C that reaches the ranks at different steps can leave
                # one rank waiting in a collective. SIGTERM is all-reduced at every step, so
                # all ranks stop at the same step.
                stop_reason = "interrupted"
            finally:
                if bar is not None:
                    bar.close()
        log.info("stopped at step %d (%s)", self.step, stop_reason)
        interrupted = stop_reason in ("interrupted", "SIGTERM", "stop_at_step")
        if not interrupted:
            val = self._run_eval()
        path = self.save() if self.step > 0 else None
        self._write_metrics({"step": self.step, "peak_memory_mb": peak_memory_mb(self.device),
                             "stop_reason": stop_reason})
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
        if interrupted:
            log.info("resume with the same command plus --resume")
        if self.dist.is_main:
            plot_losses(self.metrics_path, self.stage_dir / "loss.png")
        return TrainResult(self.step, self.tokens, self.elapsed, loss, val, stop_reason, path)

    def _sync_stop_state(self, stop: _StopRequest) -> None:
        """Make every rank take the same stop and schedule decisions.

        A SIGTERM seen by any rank stops all of them at the same step, and every rank uses the
        largest elapsed time, which the time budget and the learning-rate schedule depend on.
        """
        elapsed, requested = distributed.all_reduce([self.elapsed, float(stop.requested)], "max")
        self.elapsed = elapsed
        stop.requested = requested > 0

    def _run_eval(self) -> dict[str, dict[str, float]]:
        start = time.perf_counter()
        val = self.evaluate()
        for name, values in val.items():
            if not self.dist.is_main:
                break
            log.info("step %d | val %s | loss %.4f | %.3f bits/byte", self.step, name,
                     values["loss"], values["bits_per_byte"])
            self._write_metrics({"step": self.step, "split": name, "val_loss": values["loss"],
                                 "val_bits_per_byte": values["bits_per_byte"],
                                 "tokens": self.tokens, "elapsed": self.elapsed})
        self.elapsed += time.perf_counter() - start
        return val

    def _log_step(self, loss: float, norm: float, tokens_per_s: float, mfu: float) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        progress = max(self.progress(), 1e-9)
        eta = self.elapsed / progress - self.elapsed
        total = str(self.total_steps)
        if self.step / self.total_steps < progress:  # the time budget ends the run first
            total = f"~{round(self.step / progress)}"
        log.info("step %d/%s | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s | MFU %.1f%% | "
                 "elapsed %s | ETA %s", self.step, total, loss, lr, norm, tokens_per_s,
                 100 * mfu, format_duration(self.elapsed), format_duration(eta))
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                  "tokens": self.tokens, "tokens_per_s": tokens_per_s, "mfu": mfu,
                  "elapsed": self.elapsed, **self.step_metrics}
        if self.step_metrics:
            log.info("step %d | %s", self.step, " | ".join(
                f"{name} {value:.4g}" for name, value in self.step_metrics.items()))
        if self.has_moe:
            loads = self.model.expert_loads()
            record["moe_aux_loss"] = float(self.model.auxiliary_loss().detach())
            record["expert_load"] = loads
            busiest = max(max(layer) for layer in loads) * len(loads[0])
            log.info("MoE: balancing + z-loss %.4f | busiest expert at %.2fx its fair share",
                     record["moe_aux_loss"], busiest)
        self._write_metrics(record)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _progress_bar(total: int, initial: int):
    """Return a tqdm bar on an interactive terminal, else None (logs are enough)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)


def plot_losses(metrics_path: Path, out_path: Path) -> Path | None:
    """Plot training and validation loss from metrics.jsonl into a PNG; return its path."""
    if not metrics_path.is_file():
        return None
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(*zip(*train), label="train", linewidth=1)
    for split in sorted({r["split"] for r in records if "split" in r}):
        points = [(r["step"], r["val_loss"]) for r in records if r.get("split") == split]
        axis.plot(*zip(*points), marker="o", markersize=3, label=f"val {split}")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (nats/token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return out_path
