"""NorMistral's exact tokenizer, wherever an artifact keeps it, and how to compare tokenizations.

A Kvant GGUF embeds the HF ``tokenizer.json`` under ``tokenizer.huggingface.json``; an ONNX
folder ships it as ``tokenizer.normistral.json``; a checkpoint has ``tokenizer.json``.
:func:`exact_tokenizer` finds it, so every path that feeds a runtime uses the ids the model
was trained on.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from kvant.errors import ModelError

GGUF_HF_JSON = "tokenizer.huggingface.json"  # gguf.Keys.Tokenizer.HF_JSON
# The exact pre-tokenizer, for llama.cpp builds with Kvant's NorMistral tokenizer patch
# (patches/llama.cpp); stock builds never read it and keep `tokenizer.ggml.pre`.
GGUF_PRE_EXACT = "tokenizer.ggml.pre_exact"
PRE_EXACT_NORMISTRAL = "normistral"
ONNX_EXACT_TOKENIZER = "tokenizer.normistral.json"

# NorMistral's Tekken-style split regex, verbatim from stage_1_tokenizer_change.py.
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHUNK_REGEX = ".{1,24}"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<mask>", *(f"<special_{i}>" for i in range(11))]


@functools.lru_cache(maxsize=8)
def _from_gguf(path: str, mtime_ns: int):
    from tokenizers import Tokenizer

    from kvant.gguf_header import read_header  # gguf-py's constants: numpy

    spec = read_header(Path(path)).fields.get(GGUF_HF_JSON)
    if spec is None:
        raise ModelError(f"'{path}' carries no {GGUF_HF_JSON}; re-export it with "
                         "`kvant export gguf` to get exact NorMistral tokenization")
    return Tokenizer.from_str(spec)


def exact_tokenizer(path: Path):
    """The NorMistral `tokenizers.Tokenizer` that belongs to a .gguf file or a folder."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        return _from_gguf(str(path), path.stat().st_mtime_ns)
    for name in (ONNX_EXACT_TOKENIZER, "tokenizer.json"):
        if (path / name).is_file():
            return Tokenizer.from_file(str(path / name))
    raise ModelError(f"'{path}' has no tokenizer.json; pass a model or artifact folder")


def tokenize(path: str | Path, text: str) -> list[int]:
    """Exactly the HF tokenizer's ids (with <s>) for ``text``, from the artifact alone.

    >>> tokenize("normistral-11b-long-Q4_K_M.gguf", "Hei, verden!")  # doctest: +SKIP
    [1, 12345, ...]
    """
    return exact_tokenizer(Path(path)).encode(text).ids


def is_normistral_pipeline(spec: dict) -> bool:
    """Whether a tokenizer.json runs exactly NorMistral's pipeline (what the patched llama.cpp
    `normistral` pre-tokenizer implements): byte-level BPE with ignore_merges, its normalizer
    (Prepend " ", NFKC, the newline rule), the Tekken split, ByteLevel and 24-character
    chunks, and the decoder that undoes the space and the newline rule."""
    def kinds(part: dict | None, key: str) -> list:
        return [(s.get("type"), s.get("prepend") or (s.get("pattern") or {}).get("Regex")
                 or (s.get("pattern") or {}).get("String"), s.get("content"))
                for s in (part or {}).get(key, [])]

    model = spec.get("model", {})
    return (model.get("type") == "BPE" and bool(model.get("ignore_merges"))
            and kinds(spec.get("normalizer"), "normalizers") == [
                ("Prepend", " ", None), ("NFKC", None, None), ("Replace", "\n", "\n "),
                ("Replace", " *\n", "\n")]
            and kinds(spec.get("pre_tokenizer"), "pretokenizers") == [
                ("Split", TEKKEN_REGEX, None), ("ByteLevel", None, None),
                ("Split", CHUNK_REGEX, None)]
            and [k[0] for k in kinds(spec.get("decoder"), "decoders")] == [
                "ByteLevel", "Strip", "Replace"])


def newline_rule(text: str) -> str:
    """NorMistral's newline normalization: a space after every newline, none before one."""
    return re.sub(" *\n", "\n", text.replace("\n", "\n "))


# What a client without NorMistral's normalizer can be given, from least to most help:
# the raw text; a leading space (what a Modelfile TEMPLATE can add); a leading space and the
# newline rule (what a Jinja chat template can apply). NFKC and the 24-character chunks stay
# the client tokenizer's.
CLIENT_INPUTS = {"raw": lambda text: text, "space": lambda text: " " + text,
                 "space+newline": lambda text: newline_rule(" " + text)}


def aligned_matches(reference: list[int], other: list[int]) -> tuple[int, int]:
    """(tokens the other sequence reproduces in order, the longer length): an LCS-style count."""
    matcher = difflib.SequenceMatcher(None, reference, other, autojunk=False)
    matched = sum(block.size for block in matcher.get_matching_blocks())
    return matched, max(len(reference), len(other))


def build_tokenizer(texts: list[str], vocab_size: int):
    """Train a tokenizer with NorMistral's exact pipeline on ``texts``."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=False, fuse_unk=False,
                        ignore_merges=True))
    tok.normalizer = normalizers.Sequence([
        normalizers.Prepend(" "),
        normalizers.NFKC(),
        normalizers.Replace(Regex("\n"), "\n "),
        normalizers.Replace(Regex(" *\n"), "\n"),
    ])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TEKKEN_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=True),
        pre_tokenizers.Split(Regex(CHUNK_REGEX), behavior="isolated", invert=False),
    ])
    tok.decoder = decoders.Sequence([
        decoders.ByteLevel(add_prefix_space=False, use_regex=False),
        decoders.Strip(" ", 1, 0),
        decoders.Replace("\n ", "\n"),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok, folder: Path, max_length: int) -> None:
    """Save ``tok`` as a transformers fast tokenizer that transformers 4 and 5 both load.

    transformers 5 writes its own class name (TokenizersBackend), which 4.x cannot read, so
    tokenizer_config.json names the generic fast-tokenizer class; tokenizer.json itself
    carries the whole pipeline either way.
    """
    from transformers import PreTrainedTokenizerFast  # heavy: only when saving

    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                            model_max_length=max_length).save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Fidelity:
    """What another tokenizer gives on one language, against NorMistral's exact ids.

    identical_pct: units (paragraphs) tokenized exactly alike; aligned_pct: tokens matched in
    order over all units (token-weighted, so one-word headings do not dominate).
    """

    units: int
    identical_pct: float
    aligned_pct: float


def fidelity(exact: list[list[int]], other: list[list[int]]) -> Fidelity:
    """Compare two tokenizations of the same units, unit by unit."""
    identical = matched = total = 0
    for want, got in zip(exact, other, strict=True):
        same = want == got
        identical += same
        # an identical unit (most paragraphs once a leading space is added) needs no
        # alignment: difflib costs 0.6 ms a unit even on equal sequences
        m, n = (len(want), len(want)) if same else aligned_matches(want, got)
        matched, total = matched + m, total + n
    return Fidelity(len(exact), round(100 * identical / max(len(exact), 1), 2),
                    round(100 * matched / max(total, 1), 3))
