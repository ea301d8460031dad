"""results.json -> report.md and PNG plots (rendered from the JSON, never measured here)."""

from __future__ import annotations

from pathlib import Path

PLOTS = ("frontier.png", "decode.png", "memory.png")


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _quality_tables(results: dict) -> list[str]:
    lines = []
    langs = []
    for entry in results["targets"].values():
        langs += [lang for lang in entry.get("quality", {}) if lang not in langs]
    for lang in langs:
        lines += [f"### {lang}", "",
                  "| target | format | size (MiB) | PPL | ΔPPL | mean KLD | p99 KLD | top-1 | "
                  "bits/byte |", "|---|---|---|---|---|---|---|---|---|"]
        for name, entry in results["targets"].items():
            d = entry.get("quality", {}).get(lang)
            if d:
                lines.append(f"| {name} | {entry['format']} | {_mib(entry['size_bytes'])} | "
                             f"{d['ppl']:.3f} | {d['delta_ppl_pct']:+.3f}% | "
                             f"{d['mean_kld']:.6f} | {d['p99_kld']:.6f} | "
                             f"{d['top1_agreement_pct']:.2f}% | {d['bits_per_byte']:.4f} |")
        lines.append("")
    return lines


def _speed_table(results: dict) -> list[str]:
    lines = ["| target | backend | context | load (s) | prefill tok/s | decode tok/s | "
             "peak RSS (MiB) | peak VRAM (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for name, entry in results["targets"].items():
        for ctx, s in entry.get("speed", {}).items():
            if "error" in s:
                lines.append(f"| {name} | {entry['backend']} | {ctx} | failed: {s['error']} "
                             "| | | | |")
                continue
            vram = s.get("process_vram_mib", s.get("peak_vram_reserved_mib", "-"))
            lines.append(f"| {name} | {entry['backend']} | {ctx} | {s['load_s']:.2f} | "
                         f"{s['prefill_tok_s']:,.1f} | {s['decode_tok_s']:,.2f} | "
                         f"{s['peak_rss_mib']:,.0f} | {vram} |")
    return lines


def _peer_table(results: dict) -> list[str]:
    rows = [(n, e["peers"]) for n, e in results["targets"].items() if "peers" in e]
    if not rows:
        return []
    lines = ["## Agreement with llama.cpp's own tools", "",
             "| file | Kvant PPL | llama-perplexity | diff | Kvant prefill tok/s | "
             "llama-bench pp | Kvant decode tok/s | llama-bench tg |",
             "|---|---|---|---|---|---|---|---|"]
    for name, p in rows:
        speed = results["targets"][name]["speed"].get(str(p["llama_bench"]["n_prompt"]), {})
        lines.append(f"| {name} | {p['perplexity']['kvant']:.4f} | "
                     f"{p['perplexity']['llama_perplexity']:.4f} | "
                     f"{p['perplexity']['relative_diff_pct']:.3f}% | "
                     f"{speed.get('prefill_tok_s', '-')} | "
                     f"{p['llama_bench'].get('prefill_tok_s', '-')} | "
                     f"{speed.get('decode_tok_s', '-')} | "
                     f"{p['llama_bench'].get('decode_tok_s', '-')} |")
    return [*lines, "", "Perplexity by llama-perplexity's protocol (its tokenizer, n_ctx chunks, "
            "second half scored); speed at llama-bench's prompt size and generation length.", ""]


def write_report(results: dict, out: Path) -> None:
    m = results["machine"]
    lines = ["# Kvant benchmark", "",
             f"Machine: {m.get('cpu', m['processor'])}, {m['cpu_count']} cores, "
             f"{m.get('ram_gib', '?')} GiB RAM" + (f", {m['gpu']}" if "gpu" in m else "")
             + f"; device `{results['device']}`; {m['platform']}.", "",
             f"Reference: `{results['reference']}` (transformers, float32 compute). Every "
             "target scores the same HF token ids in the same "
             f"{results['settings']['quality_ctx']}-token windows.", "",
             "## Quality per language", "", *_quality_tables(results),
             "## Speed and memory", "", *_speed_table(results), "",
             "Fresh process per row; median of "
             f"{results['settings']['repeats']} after a warm-up; decode is "
             f"{results['settings']['n_new']} greedy tokens at the given depth.", "",
             *_peer_table(results),
             "## Plots", "", *(f"![{p}]({p})" for p in PLOTS), ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    _plots(results, out)


def _plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = results["targets"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    langs = sorted({lang for e in targets.values() for lang in e.get("quality", {})})
    for lang in langs:
        pts = sorted((e["size_bytes"] / 2**20, e["quality"][lang]["mean_kld"], n)
                     for n, e in targets.items() if lang in e.get("quality", {}))
        ax.plot([p[0] for p in pts], [max(p[1], 1e-7) for p in pts], "o-", label=lang)
    for name, e in targets.items():
        if e.get("quality"):
            mean = sum(d["mean_kld"] for d in e["quality"].values()) / len(e["quality"])
            ax.annotate(name, (e["size_bytes"] / 2**20, max(mean, 1e-7)), fontsize=7)
    ax.set(xlabel="size (MiB)", ylabel="mean KLD vs reference", yscale="log",
           title="Quality / size frontier")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)

    ctxs = results["settings"]["ctx"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(targets)
    width = 0.8 / max(len(ctxs), 1)
    for i, ctx in enumerate(ctxs):
        vals = [targets[n].get("speed", {}).get(ctx, {}).get("decode_tok_s", 0) for n in names]
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=f"depth {ctx}")
    ax.set_xticks([j + width * (len(ctxs) - 1) / 2 for j in range(len(names))], names,
                  rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="decode tokens/s", title="Decode speed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "decode.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    key = "process_vram_mib" if results["device"].startswith("cuda") else "peak_rss_mib"
    for name, e in targets.items():
        pts = [(int(c), s.get(key, s.get("peak_vram_reserved_mib")))
               for c, s in e.get("speed", {}).items() if "error" not in s]
        pts = sorted(p for p in pts if p[1] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set(xlabel="context length (tokens)", ylabel="peak memory (MiB)", xscale="log",
           title="Peak memory vs context")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)
