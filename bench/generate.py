"""`kvant generate`: stream text from any artifact, tokenized exactly as NorMistral does.

GGUF files carry the exact HF tokenizer (tokenizer.huggingface.json) and ONNX artifacts ship
tokenizer.normistral.json, so every runtime gets the same ids the model was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kvant.errors import SettingsError
from kvant.runtimes import open_runtime, targets
from kvant.tokenization import exact_tokenizer

EOS_ID = 2  # </s> in NorMistral's vocabulary


def generate(artifact: Path, prompt: str, max_new_tokens: int, stop_at_newline: bool = False,
             device: str = "cpu") -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece, greedily.

    >>> "".join(generate(Path("q4"), "Engelsk: Good morning\\nBokmål:", 32, True))  # doctest: +SKIP
    ' God morgen'
    """
    found = targets(artifact)
    if len(found) != 1:
        raise SettingsError(f"'{artifact}' holds {len(found)} models; pass one .gguf file")
    target = found[0]
    tokenizer = exact_tokenizer(target.path)
    ids = tokenizer.encode(prompt).ids
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
