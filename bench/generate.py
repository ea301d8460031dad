"""`kvant generate`: stream text from any artifact, tokenized exactly as NorMistral does.

GGUF files carry the exact HF tokenizer (tokenizer.huggingface.json) and ONNX artifacts ship
tokenizer.normistral.json, so every runtime gets the same ids the model was trained on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from kvant.errors import SettingsError
from kvant.runtimes import Target, open_runtime, targets, verify
from kvant.tokenization import exact_tokenizer

logger = logging.getLogger(__name__)

EOS_ID = 2  # </s> in NorMistral's vocabulary


def stated_context(target: Target) -> int:
    """The context an artifact states it was made for (what its export wrote)."""
    if target.backend == "llama.cpp":
        import gguf  # reads the metadata only

        reader = gguf.GGUFReader(str(target.path))
        for field in reader.fields.values():
            if field.name.endswith(".context_length"):
                return int(field.contents())
    for name in ("config.json", "genai_config.json"):
        path = target.path / name
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            found = config.get("max_position_embeddings") or config.get("model", {}).get(
                "context_length")
            if found:
                return int(found)
    raise SettingsError(f"'{target.path}' does not state its context length")


def generate(artifact: Path, prompt: str, max_new_tokens: int, stop_at_newline: bool = False,
             device: str = "cpu", check: bool = True) -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece, greedily.

    >>> "".join(generate(Path("q4"), "Engelsk: Good morning\\nBokmål:", 32, True))  # doctest: +SKIP
    ' God morgen'
    """
    found = targets(artifact)
    if len(found) != 1:
        raise SettingsError(f"'{artifact}' holds {len(found)} models; pass one .gguf file")
    target = found[0]
    verify(target, check)
    if max_new_tokens < 1:
        raise SettingsError(f"--max-new-tokens {max_new_tokens}: ask for at least 1")
    tokenizer = exact_tokenizer(target.path)
    ids = tokenizer.encode(prompt).ids
    context = stated_context(target)
    if len(ids) >= context:
        raise SettingsError(f"the prompt is {len(ids):,} tokens, and the model was trained "
                            f"for {context:,}; shorten the prompt")
    if len(ids) + max_new_tokens > context:
        logger.warning("generating %d tokens, not %d: the prompt (%d) and the continuation "
                       "must fit the trained context of %d", context - len(ids),
                       max_new_tokens, len(ids), context)
        max_new_tokens = context - len(ids)
    runtime = open_runtime(target, device, 0, n_ctx=len(ids) + max_new_tokens + 8)
    prefix = tokenizer.decode(ids, skip_special_tokens=True)
    new: list[int] = []
    shown = ""
    try:
        for token in runtime.greedy(ids):
            if token == EOS_ID or len(new) >= max_new_tokens:
                break
            new.append(token)
            # decode prompt + continuation together: NorMistral's decoder strips the
            # prepended space of the whole text, not of each piece
            text = tokenizer.decode(ids + new, skip_special_tokens=True)[len(prefix):]
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            if stop_at_newline and "\n" in text:
                text = text[: text.index("\n")]
                if text[len(shown):]:
                    yield text[len(shown):]
                break
            if text[len(shown):]:
                yield text[len(shown):]
            shown = text
    finally:
        runtime.close()
