"""Load a trained run and complete a prompt with the library API.

    python examples/generate.py runs/quickstart "def fibonacci(n):"
"""

import sys

from codeling.inference.generate import GenerationConfig, Generator


def main(run_dir: str, prompt: str) -> str:
    generator = Generator.from_checkpoint(run_dir)  # newest checkpoint of the run
    config = GenerationConfig(max_new_tokens=64, temperature=0.7, top_p=0.95, seed=0,
                              stop=("\n\n\n",))
    completion = generator.complete(prompt, config)
    print(prompt + completion)
    print(f"[{generator.last_usage['completion_tokens']} new tokens]")
    return completion


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "def main():\n")
