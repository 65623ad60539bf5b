"""Decode speed and bits per byte of codeling fp32, codeling int8 and transformers `generate`.

Batch 1, greedy, a fixed number of new tokens (128 by default), all on the CPU in one process.
The contenders run one after another within each round, for several rounds, and the table
reports the median tokens per second, so load from other processes hits them alike:

- codeling fp32: `CodeModel` with its decoding cache, one forward call per token.
- codeling int8 (int8pack): `quantize_model`, `_weight_int8pack_mm` with bf16 activations.
- codeling int8 (reference): the same int8 weights dequantized to fp32 on every call.
- transformers: `generate(do_sample=False)` on the `export_hf` copy of the same weights.

Bits per byte compares fp32 with int8 on held-out text. That is the val split of a prepared
source when one is available (`--data`, or `<checkpoint>/data/python-stdlib` of a run
directory). Otherwise it is a few standard library files that the benchmark's own tokenizer
was not trained on.

    python benchmarks/decode_speed.py                                      # random weights
    python benchmarks/decode_speed.py --checkpoint runs/quickstart         # trained weights

Without `--checkpoint` the model is the dense-tiny preset with random weights and a 4096-token
tokenizer trained on part of the standard library. Its bits per byte only shows how much int8
moves the loss, not how good the model is.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from codeling.config import config_from_dict
from codeling.evaluation.bits_per_byte import bits_per_byte, evaluate_prepared_source
from codeling.export.hf import export_hf
from codeling.models.decoder import CodeModel
from codeling.quantize import (load_model_from_checkpoint, quantize_checkpoint, quantize_model,
                               set_kernel)
from codeling.tokenizer import Tokenizer, train_tokenizer
from codeling.training import checkpoint as ckpt

PROMPT = "import os\n\n\ndef read_lines(path):\n    \"\"\"Return the lines of a text file.\"\"\"\n"
# Standard library modules scored for bits per byte when no prepared val split is available.
# The random-weight setup trains its tokenizer on other modules (TOKENIZER_MODULES).
HELD_OUT_MODULES = ("heapq.py", "fractions.py", "colorsys.py", "shlex.py")
TOKENIZER_MODULES = ("textwrap.py", "string.py", "bisect.py", "argparse.py", "dataclasses.py",
                     "functools.py", "pathlib/__init__.py", "typing.py", "json/decoder.py",
                     "csv.py", "calendar.py", "configparser.py")


def make_random_checkpoint(directory: Path) -> Path:
    """Write a dense-tiny checkpoint with random weights and a freshly trained tokenizer."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in TOKENIZER_MODULES
             if (stdlib / name).is_file()]
    tokenizer_dir = directory / "tokenizer"
    tokenizer = train_tokenizer(texts, 4096)
    tokenizer.save(tokenizer_dir)
    tokenizer = Tokenizer.load(tokenizer_dir)
    run_config = config_from_dict({"model": {"preset": "dense-tiny",
                                             "vocab_size": tokenizer.vocab_size}})
    torch.manual_seed(0)
    model = CodeModel(run_config.model)
    return ckpt.save_checkpoint(directory / "run" / "train", 0, model, run_config, {},
                                tokenizer_dir, tokenizer.fingerprint)


@torch.inference_mode()
def codeling_greedy(model: CodeModel, prompt: list[int], new_tokens: int) -> list[int]:
    """Decode greedily with codeling's cache for exactly `new_tokens` tokens."""
    cache = model.new_cache(1, len(prompt) + new_tokens)
    tokens = torch.tensor([prompt])
    generated = []
    for _ in range(new_tokens):
        next_id = int(model(tokens, cache)[0, -1].argmax())
        generated.append(next_id)
        tokens = torch.tensor([[next_id]])
    return generated


@torch.inference_mode()
def transformers_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Decode greedily with transformers `generate`; min_new_tokens keeps eos from ending early."""
    tokens = torch.tensor([prompt])
    output = model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return output[0, len(prompt):].tolist()


def held_out_bits_per_byte(models: dict[str, torch.nn.Module], tokenizer: Tokenizer,
                           data_dir: Path | None, max_tokens: int) -> tuple[dict, str]:
    """Return bits per byte of each model on the same held-out tokens, and their source."""
    results = {}
    if data_dir is not None:
        for name, model in models.items():
            results[name] = evaluate_prepared_source(
                model, data_dir, max_tokens=max_tokens,
                tokenizer_fingerprint=tokenizer.fingerprint)
        return results, f"val split of {data_dir}"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tokens: list[int] = []
    utf8_bytes = 0
    for name in HELD_OUT_MODULES:
        text = (stdlib / name).read_text()
        tokens += tokenizer.encode(text) + [tokenizer.eos_id]
        utf8_bytes += len(text.encode("utf-8"))
    for name, model in models.items():
        results[name] = bits_per_byte(model, tokens, utf8_bytes, max_tokens=max_tokens,
                                      eos_id=tokenizer.eos_id)
    return results, "standard library modules " + ", ".join(HELD_OUT_MODULES)


def find_data_dir(args: argparse.Namespace) -> Path | None:
    if args.data:
        return Path(args.data)
    if args.checkpoint:
        candidate = Path(args.checkpoint) / "data" / "python-stdlib"
        if (candidate / "val.bin").is_file():
            return candidate
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None,
                        help="run or checkpoint directory of a dense model (default: dense-tiny "
                        "with random weights)")
    parser.add_argument("--data", default=None,
                        help="prepared source directory whose val split is scored for bits "
                        "per byte (default: <checkpoint>/data/python-stdlib if present, else "
                        "standard library files)")
    parser.add_argument("--new-tokens", type=int, default=128,
                        help="tokens decoded per round and contender (default: 128)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved timing rounds; the table shows the median (default: 5)")
    parser.add_argument("--bpb-tokens", type=int, default=16384,
                        help="held-out tokens scored for bits per byte (default: 16384)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="decode-speed-") as temp_name:
        temp = Path(temp_name)
        if args.checkpoint:
            source = ckpt.resolve_checkpoint(args.checkpoint)
            weights = f"trained checkpoint {source}"
        else:
            source = make_random_checkpoint(temp)
            weights = "dense-tiny preset, random weights (bits per byte only compares fp32 " \
                      "with int8)"
        loaded = ckpt.read_checkpoint_config(source)
        tokenizer = Tokenizer.load(loaded.tokenizer_path)

        fp32 = load_model_from_checkpoint(loaded)
        int8 = quantize_model(copy.deepcopy(fp32), kernel="auto")
        int8_reference = copy.deepcopy(int8)
        set_kernel(int8_reference, "reference")
        int8_dir = quantize_checkpoint(source, temp / "int8")

        import transformers

        hf_dir = export_hf(source, temp / "hf")
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()

        prompt = tokenizer.encode(PROMPT)
        contenders = {
            "codeling fp32 (cache)": lambda: codeling_greedy(fp32, prompt, args.new_tokens),
            "codeling int8 (int8pack, bf16 activations)":
                lambda: codeling_greedy(int8, prompt, args.new_tokens),
            "codeling int8 (reference, dequantize per call)":
                lambda: codeling_greedy(int8_reference, prompt, args.new_tokens),
            f"transformers {transformers.__version__} generate":
                lambda: transformers_greedy(hf_model, prompt, args.new_tokens),
        }
        outputs = {name: run() for name, run in contenders.items()}  # warm-up round
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, run in contenders.items():
                start = time.perf_counter()
                run()
                rates[name].append(args.new_tokens / (time.perf_counter() - start))

        data_dir = find_data_dir(args)
        bpb, bpb_source = held_out_bits_per_byte(
            {"fp32": fp32, "int8 (int8pack)": int8, "int8 (reference)": int8_reference},
            tokenizer, data_dir, args.bpb_tokens)
        size_fp32 = (source / "model.safetensors").stat().st_size
        size_int8 = (int8_dir / "model.safetensors").stat().st_size

    baseline_name = next(iter(contenders))
    baseline = statistics.median(rates[baseline_name])
    reference_tokens = outputs[baseline_name]
    print(f"Weights: {weights}")
    print(f"Model: {loaded.config.model.arch}, d_model {loaded.config.model.d_model}, "
          f"{loaded.config.model.n_layers} layers, vocab {loaded.config.model.vocab_size}, "
          f"{fp32.num_parameters() / 1e6:.2f}M parameters")
    print(f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"Decode: batch 1, greedy, prompt {len(prompt)} tokens, {args.new_tokens} new "
          f"tokens, {args.rounds} interleaved rounds after one warm-up, median\n")
    print("| decoder | tokens/s | vs codeling fp32 | greedy tokens equal to fp32's, by position |")
    print("|---|---:|---:|---:|")
    for name in contenders:
        median = statistics.median(rates[name])
        same = sum(a == b for a, b in zip(outputs[name], reference_tokens))
        print(f"| {name} | {median:.1f} | {median / baseline:.2f}x | "
              f"{same}/{len(reference_tokens)} |")
    print(f"\nBits per byte on {bpb_source} "
          f"({bpb['fp32']['tokens']} tokens, seq_len {bpb['fp32']['seq_len']}):\n")
    print("| weights | bits per byte | vs fp32 | model.safetensors |")
    print("|---|---:|---:|---:|")
    for name, result in bpb.items():
        size = size_fp32 if name == "fp32" else size_int8
        ratio = result["bits_per_byte"] / bpb["fp32"]["bits_per_byte"]
        print(f"| {name} | {result['bits_per_byte']:.4f} | {ratio:.4f}x | "
              f"{size / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
