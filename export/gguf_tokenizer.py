"""NorMistral's tokenizer in GGUF: the best llama.cpp metadata, plus the exact HF tokenizer.

Stock llama.cpp cannot reproduce NorMistral's tokenizer: it ignores the normalizer (prepended
space, NFKC, newline rule) for BPE vocabularies, has no 24-character chunking and rewrites the
Tekken regex in ASCII. So a Kvant GGUF carries (1) the closest metadata llama.cpp understands
(``gpt2`` model, ``ufakzeka`` pre-tokenizer, merges, token types) for stock users, and (2) the
whole HF ``tokenizer.json`` under ``tokenizer.huggingface.json``, from which :func:`tokenize`
gives exactly the HF ids: every Kvant code path that feeds llama.cpp uses it.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# llama.cpp's pre-tokenizer names (src/llama-vocab.cpp). `ufakzeka` has no case split, so
# all-caps words with Æ Ø Å or Sámi letters survive (`EØS`); `tekken` is the fallback for
# older llama.cpp builds.
PRE_TOKENIZERS = ("ufakzeka", "tekken")


def add_tokenizer(writer, model_dir: Path, pre: str = PRE_TOKENIZERS[0]) -> dict:
    """Write tokenizer metadata into a GGUFWriter; return what was written (for the manifest)."""
    import gguf

    raw = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
    spec = json.loads(raw)
    if spec.get("model", {}).get("type") != "BPE":
        from kvant.errors import ModelError

        raise ModelError(f"'{model_dir}/tokenizer.json' is not a BPE tokenizer; Kvant's GGUF "
                         "export supports byte-level BPE (NorMistral's kind)")
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    added = spec.get("added_tokens", [])
    vocab.update({t["content"]: t["id"] for t in added})
    control_ids = {t["id"] for t in added if t.get("special")}
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    n_vocab = max(config.get("vocab_size", 0), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = gguf.TokenType.CONTROL if idx in control_ids else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special_vocab = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=n_vocab)
    special_vocab.add_to_gguf(writer, quiet=True)  # ids, and add_bos from "<s> $A"
    writer.add_string(gguf.Keys.Tokenizer.HF_JSON, raw)
    return {"model": "gpt2", "pre": pre, "n_vocab": n_vocab, "n_merges": len(merges),
            "embedded_hf_json": True}


@functools.lru_cache(maxsize=8)
def _hf_tokenizer_from_gguf(path: str, mtime_ns: int):
    import gguf
    from tokenizers import Tokenizer

    reader = gguf.GGUFReader(path)
    field = reader.get_field(gguf.Keys.Tokenizer.HF_JSON)
    if field is None:
        from kvant.errors import ModelError

        raise ModelError(f"'{path}' carries no {gguf.Keys.Tokenizer.HF_JSON}; re-export it with "
                         "`kvant export gguf` to get exact NorMistral tokenization")
    return Tokenizer.from_str(field.contents())


def tokenize(gguf_path: str | Path, text: str) -> list[int]:
    """Exactly the HF tokenizer's ids (with <s>) for ``text``, from the GGUF file alone.

    >>> tokenize("normistral-11b-long-Q4_K_M.gguf", "Hei, verden!")  # doctest: +SKIP
    [1, 12345, ...]
    """
    path = Path(gguf_path)
    return _hf_tokenizer_from_gguf(str(path), path.stat().st_mtime_ns).encode(text).ids


def aligned_matches(reference: list[int], other: list[int]) -> tuple[int, int]:
    """(tokens the other sequence reproduces in order, the longer length): an LCS-style count."""
    matcher = difflib.SequenceMatcher(None, reference, other, autojunk=False)
    matched = sum(block.size for block in matcher.get_matching_blocks())
    return matched, max(len(reference), len(other))


@dataclass(frozen=True)
class Fidelity:
    """What stock llama.cpp tokenization gives on one language, against the HF ids.

    identical_pct: units (paragraphs) tokenized exactly alike; aligned_pct: tokens matched in
    order over all units (token-weighted, so one-word headings do not dominate).
    """

    units: int
    identical_pct: float
    aligned_pct: float


def stock_fidelity(gguf_path: Path, units: list[str]) -> Fidelity:
    """Tokenize each unit with llama.cpp's own tokenizer and compare with the exact ids."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    identical = matched = total = 0
    try:
        for unit in units:
            exact = tokenize(gguf_path, unit)
            stock = llm.tokenize(unit.encode("utf-8"), add_bos=True, special=False)
            identical += stock == exact
            m, n = aligned_matches(exact, stock)
            matched, total = matched + m, total + n
    finally:
        llm.close()
    return Fidelity(len(units), round(100 * identical / max(len(units), 1), 2),
                    round(100 * matched / max(total, 1), 3))
