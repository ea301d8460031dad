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


def speed_cell(s: dict, phase: str) -> str:
    """``median (min-max)`` tokens/s of a speed row, with ⚠ when the row is noisy."""
    if f"{phase}_tok_s" not in s:
        return "-"
    cell = f"{s[f'{phase}_tok_s']:,.2f}"
    if f"{phase}_tok_s_min" in s and s[f"{phase}_tok_s_min"] != s[f"{phase}_tok_s_max"]:
        cell += f" ({s[f'{phase}_tok_s_min']:,.2f}-{s[f'{phase}_tok_s_max']:,.2f})"
    return cell + (" ⚠" if s.get("noisy") else "")


def _speed_table(results: dict) -> list[str]:
    lines = ["| target | backend | context | load (s) | prefill tok/s | decode tok/s | "
             "other CPU % | peak RSS (MiB) | peak VRAM (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    noisy = []
    for name, entry in results["targets"].items():
        for ctx, s in entry.get("speed", {}).items():
            if "error" in s:
                lines.append(f"| {name} | {entry['backend']} | {ctx} | failed: {s['error']} "
                             "| | | | | |")
                continue
            if s.get("noisy"):
                noisy.append(f"{name} at {ctx} ({'; '.join(s.get('noise', []))}, "
                             f"{s.get('attempts', 1)} attempts)")
            vram = s.get("peak_vram_mib", "-")  # NVML, the worker's process tree
            lines.append(f"| {name} | {entry['backend']} | {ctx} | {s['load_s']:.2f} | "
                         f"{speed_cell(s, 'prefill')} | {speed_cell(s, 'decode')} | "
                         f"{s.get('other_cpu_pct', 0):.0f} | {s['peak_rss_mib']:,.0f} | "
                         f"{vram} |")
    sources = {s["vram_source"] for e in results["targets"].values()
               for s in e.get("speed", {}).values() if s.get("vram_source")}
    if sources:
        lines += ["", "Peak VRAM: " + "; ".join(sorted(sources)) + "."]
    if noisy:
        lines += ["", "**⚠ noisy rows** (kept after repeated attempts; treat as lower bounds): "
                  + "; ".join(noisy) + "."]
    return lines


def _peer_table(results: dict) -> list[str]:
    rows = [(n, e["peers"]) for n, e in results["targets"].items() if "peers" in e]
    if not rows:
        return []
    lines = ["## Agreement with llama.cpp's own tools", "",
             "| file | Kvant PPL | llama-perplexity | diff | Kvant prefill tok/s | "
             "llama-bench pp | Kvant decode tok/s | llama-bench tg |",
             "|---|---|---|---|---|---|---|---|"]
    bench = rows[0][1]["llama_bench"]
    for name, p in rows:
        b = p["llama_bench"]
        speed = results["targets"][name]["speed"].get(str(b["n_prompt"]), {})
        ppl = p.get("perplexity")
        ppl_cells = (f"{ppl['kvant']:.4f} | {ppl['llama_perplexity']:.4f} | "
                     f"{ppl['relative_diff_pct']:.3f}%" if ppl else "- | - | -")
        lines.append(f"| {name} | {ppl_cells} | "
                     f"{speed_cell(speed, 'prefill')} | {_pm(b, 'prefill')} | "
                     f"{speed_cell(speed, 'decode')} | {_pm(b, 'decode')} |")
    tokens = {p["perplexity"]["tokens"] for _, p in rows if "tokens" in p.get("perplexity", {})}
    return [*lines, "", "Perplexity by llama-perplexity's protocol (the raw text through its "
            f"tokenizer: {', '.join(sorted(tokens)) or 'llama.cpp stock'}; n_ctx chunks, "
            "second half scored). Speed like with like: both on device "
            f"`{bench.get('device', 'cpu')}` with {bench.get('n_gpu_layers', 0)} GPU layers, "
            f"{bench.get('threads', '?')} threads, CPU weight repacking "
            f"{'on' if bench.get('repack') else 'off'}, flash attention "
            f"{'on' if bench.get('flash_attn') else 'off'}; prefill of {bench['n_prompt']} tokens "
            f"from an empty cache; decode of {bench['n_gen']} tokens at depth "
            f"{bench.get('decode_depth', 0)}. Kvant: median (min-max); llama-bench: mean ± "
            "standard deviation.", ""]


def _pm(b: dict, phase: str) -> str:
    if f"{phase}_tok_s" not in b:
        return "-"
    return f"{b[f'{phase}_tok_s']:,.2f} ± {b.get(f'{phase}_tok_s_stddev', 0):,.2f}"


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
             "Fresh process per row; median (min-max) of at least "
             f"{results['settings']['repeats']} runs after a warm-up (short runs are repeated "
             "until a phase lasts 0.5 s, so the CPU accounting that witnesses it is not "
             "rounding); decode is "
             f"{results['settings']['n_new']} greedy tokens at the given depth. `other CPU %`: "
             "the share of the machine other programs used meanwhile (a row over "
             f"{results['settings'].get('max_other_cpu_pct', 10):g}% or with repeats spread "
             f"over {results['settings'].get('max_spread_pct', 25):g}% is measured again, up "
             f"to {results['settings'].get('max_attempts', 1)} times, and flagged ⚠ if it "
             "stays so).", "",
             *_peer_table(results),
             "## Plots", "", *(f"![{p}]({p})" for p in PLOTS), ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    _plots(results, out)


MARKERS = {"bf16": "*", "gguf": "o", "gptq": "s", "bnb": "D", "onnx": "^"}


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both size and KLD, by increasing size."""
    front, best = [], float("inf")
    for x, y, name in sorted(points):
        if y < best:
            front.append((x, y, name))
            best = y
    return front


def _overlaps(a, b) -> bool:
    return not (a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0)


def place_labels(ax, points: list[tuple[float, float, str]], fontsize: int = 7) -> list:
    """Annotate each point at the first of several offsets where its label overlaps no
    label placed before it (nor a marker); returns the labels' display boxes."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    markers = [ax.transData.transform((x, y)) for x, y, _ in points]
    offsets = [(6, 4), (6, -11), (-6, 4), (-6, -11), (6, 14), (-6, 14), (6, -21), (-6, -21),
               (6, 24), (-6, 24), (6, -31), (-6, -31), (6, 34), (-6, 34), (6, -41), (-6, -41)]
    placed = []
    for x, y, name in sorted(points, key=lambda p: (p[0], p[1])):
        for k, (dx, dy) in enumerate(offsets):
            label = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points",
                                fontsize=fontsize, ha="left" if dx > 0 else "right")
            box = label.get_window_extent(renderer).expanded(1.05, 1.1)
            hits_marker = any(box.x0 <= mx <= box.x1 and box.y0 <= my <= box.y1
                              for mx, my in markers)
            if not any(_overlaps(box, other) for other in placed) and not hits_marker \
                    or k == len(offsets) - 1:
                placed.append(box)
                break
            label.remove()
    return placed


def frontier_figure(targets: dict, plt):
    """Quality against size: one marker per format, the Pareto frontier drawn, every point
    labelled without overlaps. Returns (figure, axes, label boxes)."""
    fig, ax = plt.subplots(figsize=(9, 5))
    points = []
    for fmt in dict.fromkeys(e["format"] for e in targets.values()):
        pts = []
        for name, e in targets.items():
            if e["format"] == fmt and e.get("quality"):
                mean = sum(d["mean_kld"] for d in e["quality"].values()) / len(e["quality"])
                pts.append((e["size_bytes"] / 2**20, max(mean, 1e-7), name))
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=36, label=fmt,
                       marker=MARKERS.get(fmt, "o"), zorder=3)
            points += pts
    front = pareto(points)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.5",
                linestyle="--", linewidth=1, label="Pareto frontier", zorder=2)
    ax.set(xlabel="size (MiB)", ylabel="mean KLD vs reference (log)", yscale="log",
           title="Quality / size: lower-left is better")
    ax.margins(x=0.15, y=0.25)
    if not points:  # a speed-only run: say so rather than draw empty axes
        ax.text(0.5, 0.5, "no quality measured (--no-quality)", ha="center",
                transform=ax.transAxes)
        fig.tight_layout()
        return fig, ax, []
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # off the points
    fig.tight_layout()
    boxes = place_labels(ax, points)
    return fig, ax, boxes


def _plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = results["targets"]
    fig, _, _ = frontier_figure(targets, plt)
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
    key = "peak_vram_mib" if results["device"].startswith("cuda") else "peak_rss_mib"
    for name, e in targets.items():
        pts = [(int(c), s.get(key))
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
