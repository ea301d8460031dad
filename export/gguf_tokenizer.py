"""NorMistral's tokenizer in GGUF: the best llama.cpp metadata, plus the exact HF tokenizer.

Stock llama.cpp cannot reproduce NorMistral's tokenizer: it ignores the normalizer (prepended
space, NFKC, newline rule) for BPE vocabularies, has no 24-character chunking and rewrites the
Tekken regex in ASCII. So a Kvant GGUF carries (1) the closest metadata llama.cpp understands
(``gpt2`` model, ``ufakzeka`` pre-tokenizer, merges, token types) for stock users, and (2) the
whole HF ``tokenizer.json`` under ``tokenizer.huggingface.json``, from which
:func:`kvant.tokenization.tokenize` gives exactly the HF ids, and (3) for NorMistral's exact
pipeline ``tokenizer.ggml.pre_exact = "normistral"``, which llama.cpp built with Kvant's patch
(patches/llama.cpp) reads to tokenize exactly itself; stock builds ignore it.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from kvant.engine import CHAT_TEMPLATE
from kvant.errors import ModelError
from kvant.export.gguf import PRE_TOKENIZERS
from kvant.tokenization import GGUF_PRE_EXACT, PRE_EXACT_NORMISTRAL, is_normistral_pipeline


def add_tokenizer(writer, model_dir: Path, pre: str = PRE_TOKENIZERS[0]) -> dict:
    """Write tokenizer metadata into a GGUFWriter; return what was written (for the manifest)."""
    raw = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
    spec = json.loads(raw)
    if spec.get("model", {}).get("type") != "BPE":
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
    exact = is_normistral_pipeline(spec)
    if exact:  # llama.cpp with Kvant's patch tokenizes exactly; stock builds ignore the key
        writer.add_string(GGUF_PRE_EXACT, PRE_EXACT_NORMISTRAL)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special_vocab = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=n_vocab)
    # a model with its own chat template (an instruction-tuned NorMistral) keeps it; the base
    # model gets Kvant's plain dialogue, pre-normalized for tokenizers without NorMistral's
    # normalizer (kvant.engine.CHAT_TEMPLATE)
    template = "model's own" if special_vocab.chat_template else "kvant dialogue"
    special_vocab.chat_template = special_vocab.chat_template or CHAT_TEMPLATE
    special_vocab.add_to_gguf(writer, quiet=True)  # ids, and add_bos from "<s> $A"
    writer.add_string(gguf.Keys.Tokenizer.HF_JSON, raw)
    return {"model": "gpt2", "pre": pre, "pre_exact": PRE_EXACT_NORMISTRAL if exact else None,
            "n_vocab": n_vocab, "n_merges": len(merges),
            "embedded_hf_json": True, "chat_template": template}
