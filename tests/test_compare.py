"""`codeling compare` and the recall probes."""

from __future__ import annotations

import sysconfig

import pytest
import torch

from codeling.cli import main
from codeling.config import ModelConfig
from codeling.evaluation.recall import associative_recall, copy_recall
from codeling.models.decoder import CodeModel

STDLIB = sysconfig.get_paths()["stdlib"]


class CopyingModel(CodeModel):
    """A model whose logits point at the token seen one period earlier: perfect recall."""

    def __init__(self, period_of, vocab_size: int):
        super().__init__(ModelConfig(vocab_size=vocab_size, d_model=8, n_layers=1, n_heads=2,
                                     max_seq_len=256))
        self.period_of = period_of

    def forward(self, tokens, cache=None):
        logits = torch.zeros(*tokens.shape, self.config.vocab_size)
        for row in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                answer = self.period_of(tokens[row, : t + 1])
                if answer is not None:
                    logits[row, t, answer] = 1.0
        return logits


def copy_answer(prefix, length=12):
    """The token one copy length back, once the first copy is complete."""
    if len(prefix) < length:
        return None
    return int(prefix[len(prefix) - length])


def lookup_answer(prefix):
    key = int(prefix[-1])
    earlier = prefix[:-1].tolist()
    for i in range(0, len(earlier) - 1, 2):
        if earlier[i] == key:
            return earlier[i + 1]
    return None


def test_recall_probes_score_perfect_and_random_models():
    torch.manual_seed(0)
    random_model = CodeModel(ModelConfig(vocab_size=500, d_model=16, n_layers=1, n_heads=2,
                                         max_seq_len=128)).eval()
    assert copy_recall(random_model, trials=4) < 0.1
    assert associative_recall(random_model, trials=4) < 0.1
    assert copy_recall(CopyingModel(copy_answer, 500), length=12, trials=2) == pytest.approx(1.0)
    assert associative_recall(CopyingModel(lookup_answer, 500), pairs=6, trials=2) == 1.0


def test_compare_two_architectures(tmp_path, capsys):
    run_dir = tmp_path / "compare"
    code = main(["compare", "--archs", "dense,mamba", "--size", "tiny", "--tokens", "4096",
                 "--run-dir", str(run_dir), "--sources", f"files:{STDLIB}/json/*.py", f"files:{STDLIB}/email/*.py",
                 "--set", "tokenizer.vocab_size=512", "--set", "train.batch_size=4",
                 "--set", "train.seq_len=64", "--set", "model.n_layers=2",
                 "--set", "train.precision=fp32", "--set", "data.val_fraction=0.3"])
    assert code == 0
    table = (run_dir / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| dense")
            or line.startswith("| mamba")]
    assert len(rows) == 2
    assert "copy recall" in table
    assert "email" in table
    assert (run_dir / "compare.png").stat().st_size > 1000
    assert (run_dir / "dense" / "checkpoints" / "latest").is_file()
    assert (run_dir / "mamba" / "checkpoints" / "latest").is_file()


def test_compare_rejects_unknown_arch(capsys):
    assert main(["compare", "--archs", "dense,rnn", "--minutes", "1"]) == 2
    assert "rnn" in capsys.readouterr().err
