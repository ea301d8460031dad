"""What serving costs: decode tokens/s of one GGUF file three ways, on the same prompt.

    python -m kvant.bench.studies.serve_speed FILE.gguf [--tokens 128] [--repeats 5]

1. llama.cpp alone (the bench's decode loop: eval one token, argmax);
2. Kvant's generation core (`kvant generate`): exact incremental decoding and stop handling;
3. `kvant serve` over loopback, streamed through the official openai client.

Each row is the median (min-max) of ``repeats`` runs of greedy decoding after the prompt;
for the server the clock runs from the first streamed chunk to the last (prefill excluded).
Run it alone on the machine: threads spin-wait when cores are shared.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

from kvant.engine import Engine, Sampling

PROMPT = "Engelsk: The weather is nice today, and we are going for a walk in the forest.\nBokmål:"


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def measure(path: Path, tokens: int, repeats: int) -> dict:
    import openai
    import uvicorn

    from kvant.app.serve import create_app

    engine = Engine(path, n_ctx=512)
    engine.load()
    ids = engine.encode(PROMPT)
    rows: dict[str, list[float]] = {"llama.cpp alone": [], "generation core": [],
                                    "kvant serve (openai stream)": []}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-")
    produced = []
    try:
        for _ in range(repeats):
            with engine.lock:
                seconds = engine.runtime.decode(ids, tokens)
            rows["llama.cpp alone"].append(tokens / seconds)

            completion = engine.complete(ids, tokens, (), Sampling())
            pieces = iter(completion)
            next(pieces)  # the first piece: after prefill
            start = time.perf_counter()
            for _ in pieces:
                pass
            rows["generation core"].append((completion.n_new - 1)
                                           / (time.perf_counter() - start))

            stamps = []
            stream = client.completions.create(model=engine.name, prompt=PROMPT,
                                               max_tokens=tokens, temperature=0, stream=True)
            for chunk in stream:
                if chunk.choices[0].text:
                    stamps.append(time.perf_counter())
            produced.append(completion.n_new)
            # pieces are at most one per token; the core's count stands for the server's
            rows["kvant serve (openai stream)"].append((completion.n_new - 1)
                                                       / (stamps[-1] - stamps[0]))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
    return {"file": str(path), "tokens": tokens, "generated": produced,
            "rows": {name: _spread(values) for name, values in rows.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = measure(args.gguf, args.tokens, args.repeats)
    lines = [f"{result['file']}: greedy decode of {result['tokens']} tokens (generated: "
             f"{result['generated']}), tokens/s median (min-max)"]
    lines += [f"  {name:30s} {value}" for name, value in result["rows"].items()]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
