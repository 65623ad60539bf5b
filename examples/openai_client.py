"""Call a running `codeling serve` with the official openai client, streaming the reply.

    codeling serve runs/quickstart --port 8000 &
    python examples/openai_client.py http://127.0.0.1:8000/v1
"""

import sys

from openai import OpenAI


def main(base_url: str) -> str:
    client = OpenAI(base_url=base_url, api_key="unused")  # pass the server's key if it has one
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, stream=True, max_tokens=48, temperature=0.7, seed=0,
        messages=[{"role": "user", "content": "Write a Python function that reverses a list."}])
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            print(pieces[-1], end="", flush=True)
    print()
    return "".join(pieces)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1")
