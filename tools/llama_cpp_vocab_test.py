"""Writes the upstream test material of Kvant's llama.cpp tokenizer patch (patches/llama.cpp):
a vocab-only GGUF made from the NorMistral stand-in's tokenizer, and an inputs/outputs pair in
the format of llama.cpp's tokenizer tests (models/ggml-vocab-*.gguf.inp/.out, read by
tests/test-tokenizer-0.cpp), the outputs produced by the HF tokenizer.

    .venv/bin/python tools/llama_cpp_vocab_test.py --model "$(kvant tiny)" \
        [--out patches/llama.cpp/models]

The inputs are llama.cpp's usual edge cases and sentences written for this file (never the
held-out or calibration texts, which may not be republished).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer

from kvant.export.gguf_convert import write_vocab_only

SEPARATOR = "\n__ggml_vocab_test__\n"  # tests/test-tokenizer-0.cpp
INPUTS = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", "\t\n", "Hello world", " Hello world",
    "Hello World", " Hello World", " Hello World!", "Hello, world!", " Hello, world!",
    " this is 🦙.cpp", "w048 7tuijk dsdfhu", "нещо на Български", "ied 4 ½ months", "Äpfel",
    "3", "33", "333", "3333", "33333", "333333", "3333333",
    "Hei på deg!", " Hei på deg!", "Ho budde i ei lita bygd ved fjorden.",
    "EØS-avtalen og NATO-medlemskapet", "Sámediggi lea Sámi álbmoga parlameanta.",
    "Mun in leat goassige čállán dákkár reivve.", "Han sagde, at det var for sent.",
    "Vi ses i morgon på stationen.", "Det er ﬁre år siden… og ½ time",
    "Ｆｕｌｌｗｉｄｔｈ og\u00a0hardt mellomrom", "linje én\nlinje to\n\nny avsnitt",
    "innrykk:\n    fire mellomrom\n\ttabulator", "mellomrom før linjeskift   \nneste",
    "Donaudampfschifffahrtsgesellschaftskapitänsmütze",
    "Høyesterettsjustitiarius-stillingen-og-mer-enn-tjuefire-tegn",
    "e\u0301 og o\u0308 kombinert, å og å", "Ǆ ǅ ǆ ﬀ ㎏ ① ²",
    "URL: https://www.nb.no/sprakbanken/ og e-post: post@example.no",
    "Tall: 1 234 567,89 kr (2024/25)", "   innledende mellomrom", "slutt med mellomrom   ",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True,
                        help="the stand-in's folder (`kvant tiny` prints it)")
    parser.add_argument("--out", type=Path, default=Path("patches/llama.cpp/models"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gguf_file = args.out / "ggml-vocab-normistral.gguf"
    write_vocab_only(args.model, gguf_file)
    spec = (args.model / "tokenizer.json").read_text(encoding="utf-8")
    tokenizer = Tokenizer.from_str(spec)
    (args.out / f"{gguf_file.name}.inp").write_text(SEPARATOR.join(INPUTS), encoding="utf-8")
    lines = ["".join(f" {i}" for i in tokenizer.encode(text, add_special_tokens=False).ids)
             for text in INPUTS]
    (args.out / f"{gguf_file.name}.out").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sys.stdout.write(json.dumps({"gguf": str(gguf_file), "inputs": len(INPUTS)}) + "\n")


if __name__ == "__main__":
    main()
