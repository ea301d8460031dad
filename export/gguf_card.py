"""The GGUF folder's model card: its files and their scores, the MIX files, the tokenizer
report and how to run it (kvant serve, Ollama, llama-server).
"""

from __future__ import annotations

from pathlib import Path

from kvant.engine import ASSISTANT, USER
from kvant.export.gguf_clients import fidelity_table


def run_it(files: dict, clients: dict, context: int) -> str:
    """The card's section on running the files: kvant serve, Ollama, llama-server."""
    pick = "q4_k_m" if "q4_k_m" in files else next(iter(files))
    gguf_file = files[pick]["file"]
    stem = Path(gguf_file).stem
    tag = stem.lower().replace("_", "-")
    table = (f"""
How close other clients come (share of units tokenized exactly as NorMistral does / aligned
token agreement; llama.cpp's tokenizer, standing in for Ollama's, which likewise skips the
normalizer):

{fidelity_table(clients)}
""" if clients else "")
    return f"""## Run it

Exact NorMistral tokens, in any OpenAI-compatible app (base URL `http://127.0.0.1:8080/v1`):

```sh
kvant serve {gguf_file}            # /v1/completions, /v1/chat/completions, /tokenize
```

Ollama (each file has a Modelfile beside it; `num_ctx` is what `kvant plan` fits in a 16 GB
laptop's 10 GiB, within the trained {context:,} tokens):

```sh
ollama create {tag} -f {stem}.Modelfile
ollama run {tag} $'Engelsk: Good morning.\\nBokmål:'
```

llama-server and LM Studio: the files carry a `tokenizer.chat_template` (`llama-server -m
{gguf_file} --jinja`). This is a base model: chat is a plain dialogue, one turn per line,
`{USER}: ...` and `{ASSISTANT}: ...`, after an optional system text and a blank line;
generation stops where the model starts the next turn. The template and the Modelfile write
their own text as NorMistral's normalizer would (a space at the start and after each
newline); the chat template also applies the newline rule to messages.
{table}"""


def _kld(value: float | None) -> str:
    return f"{value:.6f}" if value is not None else "-"


def mix_section(files: dict) -> str:
    """What MIX means, and each mix beside the uniform file it replaces."""
    mixes = {t: r for t, r in files.items() if "mix" in r}
    if not mixes:
        return ""
    rows = ["| file | budget (MiB) | size (MiB) | sensitivity | predicted calibration KLD "
            "(uniform) | held-out mean KLD (uniform) | ratio | uniform frontier (ratio) | "
            "tensor types |",
            "|---|---|---|---|---|---|---|---|---|"]
    for t, r in mixes.items():
        mix, uniform = r["mix"], r["mix"].get("uniform", {})
        base = files.get(t.removesuffix("-mix"), {}) if t.endswith("-mix") else {}
        predicted = (f"{_kld(mix['predicted_calib_kld'])} "
                     f"({_kld(uniform.get('predicted_calib_kld'))})")
        held = ratio = "-"
        if "mean_kld" in r:
            held = f"{r['mean_kld']:.6f}"
            if "mean_kld" in base:
                held += f" ({base['mean_kld']:.6f})"
                ratio = f"{r['mean_kld'] / base['mean_kld']:.2f}" if base["mean_kld"] else "-"
        types = ", ".join(f"{n} {ty.upper()}" for ty, n in mix["types"].items())
        frontier = (f"{r['uniform_frontier_kld']:.6f} ({r['vs_uniform_frontier']:.2f})"
                    if "uniform_frontier_kld" in r else "-")
        rows.append(f"| `{r['file']}` | {mix['budget_bytes'] / 2**20:.2f} | "
                    f"{mix['size_bytes'] / 2**20:.2f} | {mix['sensitivity']} | {predicted} | "
                    f"{held} | {ratio} | {frontier} | {types} |")
    return f"""
## MIX files: a type per tensor, chosen by measured sensitivity

A `-MIX` file is no larger than the uniform file of its type (a `MIX-SIZE` file than SIZE),
made by the same llama-quantize from the same bf16 file and importance matrix, but each
matrix (every layer's seven, token_embd, output) has the type that minimizes the predicted
KLD under that byte budget: the sensitivity of each tensor to each candidate type is measured
on the calibration text (never on the evaluation text), exact byte sizes per tensor and type
go into a knapsack, and `--tensor-type` overrides realize it; every tensor of the written
file is checked to have its planned type. The uniform frontier is the best held-out KLD the
uniform files of this folder reach at the mix's bytes, interpolated log-linearly between two
that bracket it: a fairer yardstick than the twin where the twin is itself dominated (shown
only where two uniform files bracket the mix). The files are plain GGUF: stock llama.cpp and
Ollama load them. Assignments per tensor are in `manifest.json`.

{chr(10).join(rows)}
"""


def withheld_section(withheld: dict) -> str:
    """The -MIX files asked for and not published, each with the reason and what ships."""
    if not withheld:
        return ""
    lines = [f"- `{spec.upper()}`: {w['reason']}; `{w['instead']}` is published instead."
             for spec, w in withheld.items()]
    return ("\n## MIX files not published\n\nA `-MIX` file is published only when, on "
            "held-out text, its mean KLD is below its uniform twin's and no language is worse "
            "by more than the noise (two standard errors):\n\n" + "\n".join(lines) + "\n")


def card(name: str, files: dict, tok_report: dict, imatrix: dict | None, calib,
         run_it: str = "", withheld: dict | None = None) -> str:
    rows = ["| file | type | size (MiB) | bits/weight | mean KLD | top-1 agreement | fallback "
            "tensors |", "|---|---|---|---|---|---|---|"]
    for gguf_type, res in files.items():
        kld = f"{res['mean_kld']:.5f}" if "mean_kld" in res else "-"
        top1 = f"{res['top1_agreement_pct']:.2f}%" if "mean_kld" in res else "-"
        rows.append(f"| `{res['file']}` | {gguf_type.upper()} | {res['size_bytes'] / 2**20:.1f} "
                    f"| {res['bits_per_weight']} | {kld} | {top1} | "
                    f"{res.get('fallback_tensors', 0)} |")
    tok_rows = ["| language | paragraphs | identical with stock llama.cpp | aligned agreement | "
                "bits/byte exact ids | bits/byte stock tokens |", "|---|---|---|---|---|---|"]
    for lang, r in tok_report.items():
        tok_rows.append(f"| {lang} | {r['paragraphs']} | {r['stock_identical_pct']:.1f}% | "
                        f"{r['stock_aligned_pct']:.2f}% | {r['bpb_exact_ids']:.4f} | "
                        f"{r['bpb_stock_llama_cpp']:.4f} |")
    imat = (f"Importance matrix: `{imatrix['file']}`, computed with llama-imatrix on "
            f"`{calib.name}` ({imatrix['chunks']} chunks of {imatrix['ctx']} tokens)."
            if imatrix and calib else f"Importance matrix: `{imatrix['file']}`." if imatrix
            else "No importance matrix was used.")
    return f"""GGUF files of `{name}` for llama.cpp and the apps built on it, made by Kvant.

KLD and top-1 agreement are measured against the transformers model on identical token ids
of held-out text (mean over languages; per language in `manifest.json`).

{chr(10).join(rows)}

{imat}
{mix_section(files)}{withheld_section(withheld or {})}
## Tokenization

NorMistral's tokenizer normalizes text (a prepended space, NFKC, a newline rule) and cuts
pre-tokens into 24-character chunks; stock llama.cpp does neither. These files carry the best
metadata llama.cpp reads (`gpt2` BPE, pre-tokenizer `ufakzeka`) and the exact Hugging Face
tokenizer under `tokenizer.huggingface.json`. Kvant (`kvant.tokenization.tokenize`)
uses it for exact ids; llama-cli, Ollama and LM Studio tokenize on their own, which gives:

{chr(10).join(tok_rows)}

{run_it}"""
