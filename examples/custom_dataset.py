"""Train a tiny model on your own files: a JSONL file of documents written by this script.

    python examples/custom_dataset.py runs/custom-example

Any source spec works the same way: `files:GLOB`, `jsonl:PATH[:FIELD]`, `hf:DATASET`.
"""

import json
import sys
import sysconfig
from pathlib import Path

from codeling.config import load_config
from codeling.stages.pretrain import run_training


def write_documents(path: Path) -> None:
    """Write the standard library's json and email modules as one JSON document per line."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with path.open("w") as handle:
        for file in sorted([*stdlib.glob("json/*.py"), *stdlib.glob("email/*.py")]):
            handle.write(json.dumps({"code": file.read_text()}) + "\n")


def main(run_dir: str) -> None:
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    documents = run / "documents.jsonl"
    write_documents(documents)
    config = load_config(None, [
        f"run_dir={run}", "stage=code", f"data.sources=[jsonl:{documents}:code]",
        "data.val_fraction=0.2", "tokenizer.vocab_size=512", "model.d_model=64",
        "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=128", "train.batch_size=4",
        "train.seq_len=64", "train.max_steps=20", "train.eval_every=10", "train.log_every=5",
    ])
    result = run_training(config)
    print(f"trained {result.step} steps; validation: {result.val}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/custom-example")
