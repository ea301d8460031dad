"""llama.cpp's own tokenizer with Kvant's NorMistral patch (patches/llama.cpp), as `make
setup` builds it: exact HF ids and text in llama.cpp itself, the upstream test pair, stock
behaviour kept for files and clients that do not ask for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvant.data import EVAL_SETS, get_text, paragraphs
from kvant.runtimes.llamacpp import StockTokenizer, native_exact
from kvant.tokenization import exact_tokenizer
from tests.conftest import UD_DIR, run_kvant

MODELS = Path(__file__).resolve().parents[2] / "patches" / "llama.cpp" / "models"
VOCAB = MODELS / "ggml-vocab-normistral.gguf"
SEPARATOR = "\n__ggml_vocab_test__\n"  # llama.cpp's tests/test-tokenizer-0.cpp


@pytest.fixture(scope="module")
def q4(gguf_artifact) -> Path:
    return gguf_artifact / "tiny-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def texts(cache_dir) -> dict[str, list[str]]:
    """Every held-out paragraph, per language, and multi-line documents made of them: groups
    of 12 paragraphs joined by newlines, blank lines, indents and trailing spaces."""
    out = {}
    for lang in EVAL_SETS:
        paras = paragraphs(get_text(lang, cache_dir, UD_DIR).read())
        joins = ["\n", "\n\n", "  \n", "\n    ", " \n\n\t"]
        docs = [joins[i % len(joins)].join(paras[i:i + 12]) for i in range(0, len(paras), 12)]
        out[lang] = paras + docs
    return out


def test_patched_llama_cpp_gives_the_hf_ids_and_text_everywhere(q4, texts):
    exact = exact_tokenizer(q4)
    native = StockTokenizer(q4, stock=False)
    try:
        for lang, units in texts.items():
            assert len(units) > 100, lang
            for text in units:
                ids = exact.encode(text).ids
                assert native.tokenize(text) == ids, (lang, text[:80])
                assert native.detokenize(ids) == exact.decode(ids, skip_special_tokens=True), \
                    (lang, text[:80])
    finally:
        native.close()


def test_stock_clients_are_still_measured_as_stock(q4, texts):
    # the export's client tables describe Ollama and stock llama.cpp: under the patched build
    # the file's tokenizer.ggml.pre_exact is overridden away and llama.cpp's old path runs
    exact = exact_tokenizer(q4)
    stock = StockTokenizer(q4)
    try:
        units = texts["nob"][:200]
        same = sum(stock.tokenize(t) == exact.encode(t).ids for t in units)
        assert same < len(units) / 2  # no leading space, no newline rule: mostly different
    finally:
        stock.close()
    assert native_exact(q4)


def test_upstream_vocab_and_test_pair_agree_with_hf_and_the_patch():
    inputs = (MODELS / f"{VOCAB.name}.inp").read_text(encoding="utf-8").split(SEPARATOR)
    outputs = (MODELS / f"{VOCAB.name}.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(inputs) == len(outputs) > 40
    hf = exact_tokenizer(VOCAB)  # the tokenizer.json embedded in the vocab-only file
    native = StockTokenizer(VOCAB, stock=False)
    try:
        for text, line in zip(inputs, outputs, strict=True):
            ids = [int(x) for x in line.split()]
            assert hf.encode(text, add_special_tokens=False).ids == ids, text
            assert native.tokenize(text, add_bos=False) == ids, text
    finally:
        native.close()
    assert "EØS-avtalen og NATO-medlemskapet" in inputs  # the Unicode-case split is covered


def test_info_says_which_tokenizer_feeds_llama_cpp(q4):
    result = run_kvant("info", str(q4), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["llama.cpp exact"] is True and "llama.cpp's own" in info["tokenizer"]


def test_llama_tokenize_tool_reads_raw_documents_exactly(q4, texts, tmp_path):
    from kvant.machine import child_limit
    from kvant.runtimes.llamacpp import llama_tool, run_tool

    exact = exact_tokenizer(q4)
    for lang, units in texts.items():
        doc = units[-1]  # a multi-line document of held-out paragraphs
        path = tmp_path / f"{lang}.txt"
        path.write_text(doc, encoding="utf-8")
        out = run_tool([llama_tool("llama-tokenize"), "-m", q4, "-f", path, "--ids",
                        "--log-disable"], child_limit())
        printed = [line for line in out.splitlines() if line.startswith("[")][-1]
        assert json.loads(printed) == exact.encode(doc).ids, lang
