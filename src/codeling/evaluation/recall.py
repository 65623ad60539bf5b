"""In-context recall probes on synthetic token sequences.

Recall is where attention and state-space models differ most: attention can look a token up
anywhere in its context, while a state-space model must have kept it in a fixed-size state.
Two probes, both scored on a trained language model without any fine-tuning:

- copy recall: a random token sequence is followed by itself, and the score is the accuracy of
  the greedy next-token prediction over the second copy. Induction heads learn this.
- associative recall (multi-query): random key-value pairs, then the keys again in another
  order; the score is the accuracy of predicting each key's value right after the key.

Random tokens are drawn from the ordinary (non-special) part of the vocabulary, so the
sequences carry no meaning a model could have memorized; a higher score means better recall.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from codeling.evaluation.copying import copying_score
from codeling.models.decoder import CodeModel
from codeling.tokenizer import SPECIAL_TOKENS


@dataclass
class RecallScores:
    copy_accuracy: float
    associative_accuracy: float
    chance: float


def _random_tokens(generator: torch.Generator, vocab_size: int, shape: tuple[int, ...]) -> torch.Tensor:
    low = len(SPECIAL_TOKENS)
    return torch.randint(low, vocab_size, shape, generator=generator)


def copy_recall(model: CodeModel, length: int = 32, trials: int = 16, seed: int = 0) -> float:
    """Return the greedy accuracy over the second half of random sequences repeated twice."""
    result = copying_score(model, None, rows=trials, length=length, seed=seed,
                           device=model.embed_tokens.weight.device)
    return result["second_pass_accuracy"]


@torch.no_grad()
def associative_recall(model: CodeModel, pairs: int = 16, trials: int = 16, seed: int = 0) -> float:
    """Return the accuracy of recalling each key's value when the keys are repeated in a new order."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    device = model.embed_tokens.weight.device
    hits = total = 0
    for _ in range(trials):
        # Distinct keys, so each query has exactly one correct value.
        keys = (torch.randperm(vocab - len(SPECIAL_TOKENS), generator=generator)[:pairs]
                + len(SPECIAL_TOKENS))
        values = _random_tokens(generator, vocab, (pairs,))
        context = torch.stack([keys, values], dim=1).reshape(-1)  # k1 v1 k2 v2 ...
        order = torch.randperm(pairs, generator=generator)
        queries = torch.stack([keys[order], values[order]], dim=1).reshape(-1)
        tokens = torch.cat([context, queries])[None].to(device)  # (1, 4 * pairs)
        predictions = model(tokens[:, :-1]).argmax(-1)[0]
        # The value of query j follows its key at position 2 * pairs + 2 * j.
        key_positions = 2 * pairs + 2 * torch.arange(pairs)
        hits += (predictions[key_positions].cpu() == values[order]).sum().item()
        total += pairs
    return hits / total


def recall_scores(model: CodeModel, seed: int = 0) -> RecallScores:
    """Run both probes with their default sizes; chance is 1 / ordinary vocabulary size."""
    was_training = model.training
    model.eval()
    try:
        scores = RecallScores(copy_recall(model, seed=seed), associative_recall(model, seed=seed),
                              1.0 / (model.config.vocab_size - len(SPECIAL_TOKENS)))
    finally:
        model.train(was_training)
    return scores
