"""`kvant generate`: stream text from any artifact, tokenized exactly as NorMistral does.

GGUF files carry the exact HF tokenizer (tokenizer.huggingface.json) and ONNX artifacts ship
tokenizer.normistral.json, so every backend gets the same ids the model was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kvant.bench.backends import load, targets
from kvant.errors import SettingsError


def exact_tokenizer(path: Path):
    """The NorMistral tokenizer that belongs to an artifact (file or folder)."""
    from tokenizers import Tokenizer

    if path.suffix == ".gguf":
        from kvant.export.gguf_tokenizer import _hf_tokenizer_from_gguf

        return _hf_tokenizer_from_gguf(str(path), path.stat().st_mtime_ns)
    for name in ("tokenizer.normistral.json", "tokenizer.json"):
        if (path / name).is_file():
            return Tokenizer.from_file(str(path / name))
    raise SettingsError(f"'{path}' has no tokenizer.json; pass a model or artifact folder")


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
    backend = load(target, device, 0, n_ctx=len(ids) + max_new_tokens + 8)
    prefix = tokenizer.decode(ids, skip_special_tokens=True)
    new: list[int] = []
    shown = ""
    try:
        for token in backend.greedy(ids):
            if token == 2 or len(new) >= max_new_tokens:  # </s>
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
        if hasattr(backend, "close"):
            backend.close()
