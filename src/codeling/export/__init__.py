"""Export checkpoints to other formats: a transformers directory or a llama.cpp GGUF file.

The exporters are imported on first use, so that `codeling.export.command` (imported by the
command line at startup) does not load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_gguf", "export_hf"]


def __getattr__(name: str) -> Any:
    """Import `export_hf` or `export_gguf` from its module when first requested."""
    if name == "export_hf":
        from codeling.export.hf import export_hf

        return export_hf
    if name == "export_gguf":
        from codeling.export.gguf import export_gguf

        return export_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
