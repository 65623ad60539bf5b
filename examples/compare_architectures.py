"""Build the four tiny architectures and compare their sizes and a forward pass.

    python examples/compare_architectures.py

For a training comparison on real data, run `codeling compare --size tiny --minutes 3`.
"""

import torch

from codeling.config import load_config
from codeling.models.decoder import CodeModel


def main() -> dict[str, dict[str, float]]:
    tokens = torch.randint(16, 4096, (1, 64))
    summary = {}
    for arch in ("dense", "mamba", "moe", "hybrid"):
        config = load_config(None, [f"model={arch}-tiny", "model.vocab_size=4096"]).model
        torch.manual_seed(0)
        model = CodeModel(config).eval()
        with torch.no_grad():
            loss = model.loss(tokens[:, :-1], tokens[:, 1:]).item()
        summary[arch] = {
            "parameters": model.num_parameters(),
            "active": model.num_parameters(active=True),
            "flops_per_token": model.flops_per_token(256),
            "initial_loss": loss,
        }
        print(f"{arch:7s} layers {config.resolved_layer_pattern():8s} "
              f"{model.num_parameters() / 1e6:5.2f}M total, "
              f"{model.num_parameters(active=True) / 1e6:5.2f}M active, "
              f"{model.flops_per_token(256) / 1e6:5.1f} MFLOP/token, initial loss {loss:.2f}")
    return summary


if __name__ == "__main__":
    main()
