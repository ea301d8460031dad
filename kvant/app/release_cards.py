"""Release cards: per-artifact benchmark sections, the index card, and the upload plan."""

from __future__ import annotations

from pathlib import Path

from kvant.artifact import CHECKSUMS, MANIFEST, card_metadata, read_manifest, verify_artifact
from kvant.bench.report import PLOTS, speed_cell
from kvant.errors import ArtifactError
from kvant.files import sha256_file

BUDGETS_GB = (8, 12, 16, 24)
# Never published: the evaluation and calibration texts may not be republished stand-alone.
FORBIDDEN_SUFFIXES = (".conllu", ".ud-test.txt", ".calib-1000.txt", ".narc-train.txt")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def artifact_section(targets: dict, names: list[str], ctx: str) -> str:
    """The bench rows of one artifact's targets (a GGUF folder has several)."""
    rows = ["| file | size (MiB) | mean KLD | top-1 | ΔPPL | prefill tok/s | decode tok/s | "
            "peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        e = targets[name]
        q = e.get("quality", {})
        s = e.get("speed", {}).get(ctx, {})
        rows.append(f"| {name} | {e['size_bytes'] / 2**20:,.1f} | "
                    f"{_mean(d['mean_kld'] for d in q.values()):.5f} | "
                    f"{_mean(d['top1_agreement_pct'] for d in q.values()):.2f}% | "
                    f"{_mean(d['delta_ppl_pct'] for d in q.values()):+.3f}% | "
                    f"{speed_cell(s, 'prefill')} | {speed_cell(s, 'decode')} | "
                    f"{s.get('peak_rss_mib', '-')} |")
    noisy = [n for n in names if targets[n].get("speed", {}).get(ctx, {}).get("noisy")]
    warning = ("\n\n**⚠ noisy**: the speed of " + ", ".join(noisy) + " was measured while "
               "other programs used the CPU or its repeats spread widely, even after "
               "repeated attempts; treat it as a lower bound." if noisy else "")
    return ("Measured by `kvant bench` against the bf16 model (means over languages; per "
            f"language in the release's `bench/report.md`), speed at context {ctx} as median "
            "(min-max over repeats):\n\n"
            + "\n".join(rows) + warning + "\n\n" + "\n".join(f"![{p}]({p})" for p in PLOTS))


def task_drift(drift: dict) -> dict:
    """One model's task drift (kvant eval's results["drift"][name]) in a line's worth: the
    mean relative drift of each task's first metric, and the tasks where it is worse than
    bf16 by more than twice the stderr of the difference."""
    firsts = [(task, next(iter(metrics.items()))) for task, metrics in drift.items() if metrics]
    relative = [d["relative"] for _, (_, d) in firsts if d["relative"] is not None]
    worse = [f"{task} {metric}" for task, (metric, d) in firsts
             if d["delta_stderr"] is not None and d["delta"] < -2 * d["delta_stderr"]]
    return {"relative": _mean(relative) if relative else None, "tasks": len(firsts),
            "worse": worse}


def task_cell(summary: dict | None) -> str:
    if not summary or summary["relative"] is None:
        return "-"
    worse = f", worse on {len(summary['worse'])}" if summary["worse"] else ""
    return f"{100 * summary['relative']:+.1f}% ({summary['tasks']} tasks{worse})"


# What runs where: MLX is Apple silicon's (on other machines MLX's CPU backend is a
# correctness path, seconds per token at 11.4B); a Mac also runs llama.cpp (Metal)
MAC_BACKENDS = frozenset({"mlx", "llama.cpp"})


def recommendations(targets: dict, predicted: dict[str, float],
                    tasks: dict[str, dict] | None = None, mac: bool = False
                    ) -> list[tuple[int, str]]:
    """For each memory budget, the most faithful target whose predicted peak fits.

    ``predicted`` holds only what the release ships (the reference model is not a pick).
    ``tasks`` ({target: task_drift summary}, when the release ran [eval]): a target worse
    than bf16 on some task beyond its noise is passed over where another fits. ``mac``: the
    picks of an Apple-silicon Mac (MAC_BACKENDS), else of every other machine (no MLX).
    """
    tasks = tasks or {}
    picks = []
    for gb in BUDGETS_GB:
        fitting = [(bool(tasks.get(n, {}).get("worse")),
                    _mean(d["mean_kld"] for d in targets[n]["quality"].values()), n)
                   for n, peak in predicted.items()
                   if peak <= gb * 1e9 and targets[n].get("quality")
                   and (targets[n].get("backend") in MAC_BACKENDS if mac
                        else targets[n].get("backend") != "mlx")]
        picks.append((gb, min(fitting)[2] if fitting else "none fits"))
    return picks


def long_context_picks(targets: dict, predicted: dict[str, dict[str, float]]
                       ) -> list[tuple[int, str | None, str | None]]:
    """For each memory budget at the long context: (budget, the most faithful target that
    fits with some KV cache type, the most precise cache type that makes it fit), with None
    twice where nothing fits.

    ``predicted``: {target: {cache type: peak bytes}}, cache types in order of precision.
    """
    picks = []
    for gb in BUDGETS_GB:
        fitting = []
        for n, by_kv in predicted.items():
            kv = next((kv for kv, peak in by_kv.items() if peak <= gb * 1e9), None)
            if kv is not None and targets[n].get("quality") and targets[n].get(
                    "backend") != "mlx":  # (recommendations: MLX is a Mac's)
                fitting.append((_mean(d["mean_kld"] for d in targets[n]["quality"].values()),
                                n, kv))
        picks.append((gb, *min(fitting)[1:]) if fitting else (gb, None, None))
    return picks


def depth_cost(depth: dict, name: str, kv: str) -> str:
    """What a pick measured at depth (kvant.bench.depth results): its mean KLD and perplexity
    drift over the documents, its last filled bucket, and the same with an f16 cache."""
    by_kv = depth.get(name, {})
    if kv not in by_kv:
        return ""

    def summary(rows: dict) -> tuple[float, float, str, float]:
        last = max((b for r in rows.values() for b, v in r["buckets"].items() if v),
                   key=lambda b: int(b.split("-")[0]))
        lo, hi = (int(x) for x in last.split("-"))
        span = f"{lo:,} to {min(hi, max(r['tokens'] for r in rows.values())):,}"
        return (_mean(r["mean_kld"] for r in rows.values()),
                _mean(r["ppl_drift_pct"] for r in rows.values()), span,
                _mean(r["buckets"][last]["kld"] for r in rows.values() if r["buckets"][last]))

    kld, ppl, span, late = summary(by_kv[kv])
    text = (f"; at depth: mean KLD {kld:.6f}, perplexity drift {ppl:+.2f}%, positions "
            f"{span} KLD {late:.6f}")
    if kv != "f16" and "f16" in by_kv:
        kld0, ppl0, _, late0 = summary(by_kv["f16"])
        text += f" (with an f16 cache: {kld0:.6f}, {ppl0:+.2f}%, {late0:.6f})"
    return text


def index_card(name: str, model_id: str, recipe_text: str, targets: dict,
               folders: dict[str, list[str]], predicted: dict[str, float], ctx: str,
               plan_ctx: int, long_predicted: dict[str, dict[str, float]] | None = None,
               long_ctx: int = 0, depth: dict | None = None, depth_tokens: int = 0,
               evaluated: dict | None = None) -> str:
    """The release's README. ``evaluated``: kvant eval's results of the recipe's [eval]
    (a task drift column, the task table, and "Which to pick" passes over a file worse on
    a task beyond its noise), or None."""
    summaries = {n: task_drift(d) for n, d in (evaluated or {}).get("drift", {}).items()}
    task_col = ("task drift vs bf16 | ", "---|") if evaluated else ("", "")
    rows = ["| artifact | target | format | size (MiB) | mean KLD | " + task_col[0]
            + f"decode tok/s | predicted peak @ {plan_ctx:,} ctx (GB) |",
            "|---|---|---|---|---|" + task_col[1] + "---|---|"]
    for folder, names in folders.items():
        for n in names:
            e = targets[n]
            kld = _mean(d["mean_kld"] for d in e.get("quality", {}).values())
            peak = f"{predicted[n] / 1e9:.2f}" if n in predicted else "-"
            drift = f"{task_cell(summaries.get(n))} | " if evaluated else ""
            rows.append(f"| {folder} | {n} | {e['format']} | {e['size_bytes'] / 2**20:,.1f} | "
                        f"{kld:.5f} | {drift}"
                        f"{speed_cell(e.get('speed', {}).get(ctx, {}), 'decode')} | {peak} |")
    picks = "\n".join(f"- **{gb} GB**: {pick}" + (f" (tasks {task_cell(summaries.get(pick))})"
                                                  if pick in summaries else "")
                      for gb, pick in recommendations(targets, predicted, summaries))
    if any(targets[n].get("backend") == "mlx" for n in predicted):
        picks += ("\n\nOn an Apple-silicon Mac, whose GPU shares that memory, the MLX files "
                  "join the GGUF ones (mlx-lm, LM Studio):\n\n" + "\n".join(
                      f"- **{gb} GB**: {pick}" for gb, pick in
                      recommendations(targets, predicted, summaries, mac=True)))
    passed_over = (" A file worse than bf16 on a task (by more than twice the stderr of the "
                   "difference, `eval/report.md`) is passed over where another fits."
                   if evaluated else "")
    return f"""{card_metadata(model_id, ["release"])}
# {name}: every format, measured

Quantized and exported files of `{model_id}`, each in its own folder with a model card,
`manifest.json` and `SHA256SUMS`. All were scored against the bf16 model on the same
held-out Norwegian, Sámi, Danish and Swedish token ids (`bench/report.md`).

{chr(10).join(rows)}

## Which to pick

The most faithful artifact (lowest mean KLD) whose predicted peak memory at a {plan_ctx:,}-token
context fits (`kvant plan`, fitted to this release's measurements).{passed_over}

{picks}
{_long_section(targets, long_predicted, long_ctx, depth, depth_tokens)}
![frontier](bench/frontier.png)
{_task_section(evaluated)}
## Recipe

```toml
{recipe_text.strip()}
```
"""


def _long_section(targets: dict, predicted: dict | None, ctx: int, depth: dict | None,
                  depth_tokens: int) -> str:
    if not predicted:
        return ""
    picks = "\n".join(f"- **{gb} GB**: " + (f"{name}, {kv} KV cache" + depth_cost(depth or {},
                                                                                 name, kv)
                                            if name else "none fits")
                      for gb, name, kv in long_context_picks(targets, predicted))
    measured = (f"Each pick's cost at depth was measured on held-out documents of up to "
                f"{depth_tokens:,} tokens per language (`bench/depth.md`: KLD and perplexity "
                "drift by position, against the bf16 model with an f16 cache)."
                if depth else "The KLD ranks the weights alone (no depth study was run).")
    return f"""
At {ctx:,} tokens (the trained context) the KV cache decides: llama.cpp can keep it in q8_0
(about half of f16) or q4_0 (about a quarter), transformers in fp8 or int4, `--kv-type` in
`kvant generate`/`serve`/`bench` and llama.cpp's `-ctk`/`-ctv`. The most faithful file that
fits, with the most precise cache that makes it fit. {measured}

{picks}
"""


def _task_section(evaluated: dict | None) -> str:
    if not evaluated:
        return ""
    from kvant.app.lmeval import eval_report  # lm-eval: installed, as [eval] ran

    table = eval_report(evaluated).split("\n", 2)[2]  # below its title
    return f"""
## Task scores

lm-evaluation-harness on NorMistral's exact tokens (`kvant eval`), every file and the bf16
model on identical requests; the drift's stderr treats the two runs as independent, so it
overstates the paired noise (`eval/report.md`, `eval/results.json`).

{table.strip()}

![task drift](eval/drift.png)
"""


INDEX_FILES = ("README.md", "eval/results.json", "eval/report.md", "eval/drift.png",
               "recipe.toml", "release.json", "SHA256SUMS", "bench/report.md",
               "bench/results.json", "bench/depth.md", "bench/depth.json",
               *(f"bench/{p}" for p in PLOTS))


def upload_plan(root: Path, org: str, name: str, folders: list[str]) -> tuple[list[dict],
                                                                             list[str]]:
    """What --push uploads, and what it leaves out, as an allow-list.

    One hub repo per artifact folder with exactly what the artifact is made of (the files
    its manifest lists, the manifest, SHA256SUMS), and the index repo with the release's
    own files (card, recipe, checksums, bench report). Anything else in those folders
    (scratch, a user's notes, an .env) is left out and named. The held-out and calibration
    texts may never be republished: one of them among the listed files is an error.
    """
    plan, left_out = [], []
    repos = {f"{org}/{folder}": (root / folder, _artifact_files(root / folder))
             for folder in folders}
    repos[f"{org}/{name}-kvant"] = (root, set(INDEX_FILES))
    for repo, (path, allowed) in repos.items():
        for file in sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink()):
            rel = file.relative_to(path).as_posix()
            if path == root and rel.split("/")[0] in folders:
                continue  # artifact folders go to their own repos
            if rel not in allowed or file.is_symlink():
                left_out.append(f"{path.name}/{rel}" if path != root else rel)
                continue
            if file.name.endswith(FORBIDDEN_SUFFIXES):
                raise ArtifactError(f"refusing to publish '{file}': the UD/NDT texts may not "
                                    "be republished as stand-alone texts; remove it from the "
                                    "artifact")
            plan.append({"repo": repo, "path": rel, "local": str(file),
                         "size_bytes": file.stat().st_size})
    return plan, left_out


def _artifact_files(folder: Path) -> set[str]:
    manifest = read_manifest(folder)
    return {f["path"] for f in manifest["files"]} | {MANIFEST, CHECKSUMS}


def verify_release(root: Path, folders: list[str]) -> list[str]:
    """Every checksum of every artifact and of the index, checked (problems, or empty)."""
    problems = [f"{folder}: {p}" for folder in folders for p in verify_artifact(root / folder)]
    sums = root / CHECKSUMS
    if not sums.is_file():
        return [*problems, f"{sums} is missing"]
    listed = {}
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, rel = line.split("  ", 1)
        listed[rel] = digest
    for rel in INDEX_FILES:
        if rel == CHECKSUMS or not (root / rel).is_file():
            continue
        if rel not in listed:
            problems.append(f"{rel} is not in {CHECKSUMS}")
        elif sha256_file(root / rel) != listed[rel]:
            problems.append(f"checksum mismatch {rel}")
    return problems
