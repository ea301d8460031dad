"""What people get when they run a Kvant GGUF outside Kvant: an Ollama Modelfile per file, and
how close stock tokenizers come to NorMistral's ids with the help a template can give.

Ollama and llama.cpp tokenize without NorMistral's normalizer. What a client-side template
can restore is measured here with llama.cpp's own tokenizer (`StockTokenizer`), standing in
for Ollama's: its Go tokenizer likewise applies the GGUF's split regex with no normalizer,
no space prefix and no NFKC.
"""

from __future__ import annotations

from pathlib import Path

from kvant.data import TextFile, paragraphs
from kvant.engine import ASSISTANT, USER
from kvant.runtimes.llamacpp import StockTokenizer
from kvant.tokenization import CLIENT_INPUTS, exact_tokenizer, fidelity

DOC_PARAGRAPHS = 5  # a multi-line document: this many consecutive paragraphs, as in the text

# Ollama's Go template. One user message and no system prompt is a plain prompt (`ollama run
# MODEL $'Engelsk: ...\nBokmål:'`, /api/generate): the text itself with the leading space the
# model was trained with, continued. Anything else is Kvant's dialogue format (see
# kvant.engine), written as NorMistral's normalizer would leave it: a space at the start
# and after each newline of the template's own text. Go templates have no string
# replacement, so newlines inside a message stay without their space.
OLLAMA_TEMPLATE = (
    '{{- if and (eq (len .Messages) 1) (eq (index .Messages 0).Role "user") }} '
    "{{ (index .Messages 0).Content }}\n"
    "{{- else }}\n"
    "{{- range $i, $m := .Messages }}{{ if $i }}\n{{ end }} "
    f'{{{{ if eq $m.Role "user" }}}}{USER}: {{{{ $m.Content }}}}'
    f'{{{{ else if eq $m.Role "assistant" }}}}{ASSISTANT}: {{{{ $m.Content }}}}'
    "{{ else }}{{ $m.Content }}\n{{ end }}{{ end }}\n"
    f" {ASSISTANT}:{{{{ end }}}}"
)


def modelfile(gguf_name: str, num_ctx: int, fits: bool, budget_gib: float) -> str:
    """The Modelfile for ``gguf_name`` (beside it in the artifact folder)."""
    stem = Path(gguf_name).stem
    tag = stem.lower().replace("_", "-")
    room = (f"num_ctx: the largest context kvant plan fits in {budget_gib:.0f} GiB (a 16 GB "
            "laptop)" if fits else f"num_ctx: this file does not fit {budget_gib:.0f} GiB even "
            "at this context; it is for larger machines")
    return f'''# Ollama Modelfile for {gguf_name}, written by Kvant.
#   ollama create {tag} -f {stem}.Modelfile
#   ollama run {tag} $'Engelsk: Good morning.\\nBokmål:'
# One prompt is continued as written (a base model); a conversation uses Kvant's plain
# dialogue format ("{USER}: ..." / "{ASSISTANT}: ..."). The template restores the leading
# space NorMistral was trained with; Ollama's tokenizer skips the rest of its normalizer
# (see the card's tokenization table for what that costs). For exact tokens: kvant serve.
# {room}.
FROM ./{gguf_name}
TEMPLATE """{OLLAMA_TEMPLATE}"""
PARAMETER num_ctx {num_ctx}
PARAMETER stop "{USER}:"
PARAMETER stop "{ASSISTANT}:"
'''


def client_fidelity(base: Path, texts: dict[str, TextFile]) -> dict:
    """Per language, for paragraphs and multi-line documents: the share of units that a stock
    tokenizer gives exactly NorMistral's ids for, and the aligned token agreement, for each of
    CLIENT_INPUTS (raw text, + leading space, + the newline rule)."""
    exact_tok = exact_tokenizer(base)
    stock = StockTokenizer(base)
    report: dict = {}
    try:
        for lang, text in texts.items():
            units = paragraphs(text.read())
            docs = ["\n\n".join(units[i:i + DOC_PARAGRAPHS])
                    for i in range(0, len(units), DOC_PARAGRAPHS)]
            report[lang] = {}
            for unit, items in (("paragraphs", units), ("documents", docs)):
                exact = [e.ids for e in exact_tok.encode_batch(items)]
                row: dict = {"count": len(items)}
                for variant, make in CLIENT_INPUTS.items():
                    fid = fidelity(exact, [stock.tokenize(make(x)) for x in items])
                    row[variant] = {"identical_pct": fid.identical_pct,
                                    "aligned_pct": fid.aligned_pct}
                report[lang][unit] = row
    finally:
        stock.close()
    return report


def fidelity_table(report: dict) -> str:
    """The card's table: identical share / aligned agreement per language and unit."""
    lines = ["| language | unit | raw text (llama-server /completion) | + leading space "
             "(Modelfile) | + space and newline rule (chat template) |",
             "|---|---|---|---|---|"]
    for lang, units in report.items():
        for unit, row in units.items():
            cells = [f"{row[v]['identical_pct']:.1f}% / {row[v]['aligned_pct']:.2f}%"
                     for v in CLIENT_INPUTS]
            lines.append(f"| {lang} | {row['count']} {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
