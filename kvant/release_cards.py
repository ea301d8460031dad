"""Release cards: per-artifact benchmark sections, the index card, and the upload plan."""

from __future__ import annotations

import json
from pathlib import Path

from kvant.artifact import card_metadata
from kvant.bench.report import PLOTS, speed_cell

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


def recommendations(targets: dict, predicted: dict[str, float]) -> list[tuple[int, str]]:
    """For each memory budget, the most faithful target whose predicted peak fits.

    ``predicted`` holds only what the release ships (the reference model is not a pick).
    """
    picks = []
    for gb in BUDGETS_GB:
        fitting = [(_mean(d["mean_kld"] for d in targets[n]["quality"].values()), n)
                   for n, peak in predicted.items()
                   if peak <= gb * 1e9 and targets[n].get("quality")]
        picks.append((gb, min(fitting)[1] if fitting else "none fits"))
    return picks


def index_card(name: str, model_id: str, recipe_text: str, targets: dict,
               folders: dict[str, list[str]], predicted: dict[str, float], ctx: str,
               plan_ctx: int) -> str:
    rows = ["| artifact | target | format | size (MiB) | mean KLD | decode tok/s | "
            f"predicted peak @ {plan_ctx:,} ctx (GB) |", "|---|---|---|---|---|---|---|"]
    for folder, names in folders.items():
        for n in names:
            e = targets[n]
            kld = _mean(d["mean_kld"] for d in e.get("quality", {}).values())
            peak = f"{predicted[n] / 1e9:.2f}" if n in predicted else "-"
            rows.append(f"| {folder} | {n} | {e['format']} | {e['size_bytes'] / 2**20:,.1f} | "
                        f"{kld:.5f} | {speed_cell(e.get('speed', {}).get(ctx, {}), 'decode')}"
                        f" | {peak} |")
    picks = "\n".join(f"- **{gb} GB**: {pick}" for gb, pick in recommendations(targets,
                                                                                predicted))
    return f"""{card_metadata(model_id, ["release"])}
# {name}: every format, measured

Quantized and exported files of `{model_id}`, each in its own folder with a model card,
`manifest.json` and `SHA256SUMS`. All were scored against the bf16 model on the same
held-out Norwegian, Sámi, Danish and Swedish token ids (`bench/report.md`).

{chr(10).join(rows)}

## Which to pick

The most faithful artifact (lowest mean KLD) whose predicted peak memory at a {plan_ctx:,}-token
context fits (`kvant plan`, fitted to this release's measurements):

{picks}

![frontier](bench/frontier.png)

## Recipe

```toml
{recipe_text.strip()}
```
"""


def upload_plan(root: Path, org: str, name: str, folders: list[str]) -> list[dict]:
    """What --push uploads: one hub repo per artifact folder, plus the index repo."""
    plan = []
    repos = {f"{org}/{folder}": root / folder for folder in folders}
    repos[f"{org}/{name}-kvant"] = root
    for repo, path in repos.items():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = file.relative_to(path).as_posix()
            if path == root and rel.split("/")[0] in folders:
                continue  # artifact folders go to their own repos
            if file.name.endswith(FORBIDDEN_SUFFIXES):
                raise ValueError(f"refusing to publish '{file}': the UD/NDT texts may not be "
                                 "republished as stand-alone texts")
            plan.append({"repo": repo, "path": rel, "local": str(file),
                         "size_bytes": file.stat().st_size})
    return plan


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
