"""The copying probe: a fresh model does not copy, one trained on repeated sequences does."""

import pytest
import torch
import torch.nn.functional as F

from codeling.config import ModelConfig
from codeling.errors import CodelingError
from codeling.evaluation.copying import copying_score, report_table
from codeling.models.decoder import CodeModel
from codeling.tokenizer import SPECIAL_TOKENS

VOCAB = len(SPECIAL_TOKENS) + 32
EOS = 1


def small_model() -> CodeModel:
    torch.manual_seed(0)
    return CodeModel(ModelConfig(arch="dense", vocab_size=VOCAB, d_model=64, n_layers=2,
                                 n_heads=4, n_kv_heads=4, max_seq_len=64))


def train_to_copy(model: CodeModel, steps: int) -> None:
    """Train on rows laid out as the probe lays them out, with other random sequences."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        sequence = torch.randint(len(SPECIAL_TOKENS), VOCAB, (32, 16), generator=generator)
        rows = torch.cat([torch.full((32, 1), EOS), sequence, sequence], dim=1)
        loss = F.cross_entropy(model(rows[:, :-1]).transpose(1, 2), rows[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_fresh_model_does_not_copy():
    result = copying_score(small_model(), EOS, length=16)
    assert result["second_pass_accuracy"] < 0.2
    assert abs(result["copy_gain"]) < 0.3


def test_trained_model_copies():
    model = small_model()
    train_to_copy(model, steps=150)
    model.train()
    result = copying_score(model, EOS, length=16)
    assert result["second_pass_accuracy"] > 0.9
    assert result["first_pass_accuracy"] < 0.2
    assert result["copy_gain"] > 2.0
    assert model.training  # the probe puts the model back in the mode it found


def test_rows_longer_than_context_are_rejected():
    with pytest.raises(CodelingError, match="exceed the model's context 64"):
        copying_score(small_model(), EOS, length=40)


def test_report_table_has_a_column_per_stage():
    result = copying_score(small_model(), EOS, length=16)
    lines = report_table({"language": {"copying": result}, "code": {"bpb": {}},
                          "tools": {"copying": result}})
    assert "| measure | language | tools |" in lines
    assert any(line.startswith("| second-pass top-1 accuracy |") for line in lines)
