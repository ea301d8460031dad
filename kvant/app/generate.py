"""`kvant generate`: stream text from any artifact, tokenized exactly as NorMistral does.

GGUF files carry the exact HF tokenizer (tokenizer.huggingface.json) and ONNX artifacts ship
tokenizer.normistral.json, so every runtime gets the same ids the model was trained on. The
generation itself is kvant.engine's, the same core `kvant serve` answers requests with.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from kvant.engine import Engine, Sampling

logger = logging.getLogger(__name__)


def generate(artifact: Path, prompt: str, max_new_tokens: int, stop_at_newline: bool = False,
             device: str = "cpu", check: bool = True, sampling: Sampling = Sampling(),
             stop: tuple[str, ...] = (), kv_type: str = "f16") -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece (greedy unless ``sampling`` says).

    >>> "".join(generate(Path("q4"), "Engelsk: Good morning\\nBokmål:", 32, True))  # doctest: +SKIP
    ' God morgen'
    """
    engine = Engine(artifact, device, check=check, kv_type=kv_type)
    try:
        ids = engine.encode(prompt)
        # a context just large enough: the KV cache is allocated for all of it
        engine.n_ctx = min(engine.trained_context, len(ids) + max_new_tokens + 8)
        room = engine.trained_context - len(ids)
        if 0 < room < max_new_tokens:
            logger.warning("generating %d tokens, not %d: the prompt (%d) and the continuation "
                           "must fit the trained context of %d", room, max_new_tokens,
                           len(ids), engine.trained_context)
        completion = engine.complete(ids, max_new_tokens,
                                     (*stop, "\n") if stop_at_newline else stop, sampling)
        yield from completion
    finally:
        engine.close()
