"""`kvant release RECIPE --rehearse LAYERS`: the release's steps measured at real width.

A rehearsal runs every step of a recipe (reference, each artifact's quantization or export
and its scoring, the bench, the cards) on a synthetic checkpoint with the real model's widths,
vocabulary and tokenizer but LAYERS layers. Each step's wall time and peak RAM (and VRAM on a
GPU) are recorded (kvant.recorder) and set beside `kvant plan`'s prediction for the same step at
LAYERS layers, then carried to the full depth: memory by the plan's own ratio of full depth
to LAYERS applied to the measurement, time by the ratio of parameters the step touches.
The quality numbers a rehearsal computes on random weights mean nothing; it records none.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from kvant.bench.tables import table_doc, write_table
from kvant.errors import SettingsError
from kvant.machine import machine
from kvant.memory import ram_bytes
from kvant.plan.kinds import kind, shape_of, weight_bytes
from kvant.plan.sizes import GIB, MIB
from kvant.plan.steps import (
    DEFAULT_FLOOR_MIB,
    mix_torch_seconds,
    step_mapped,
    step_peak,
    step_work,
)
from kvant.synth import Shape

REHEARSAL_JSON = "rehearsal.json"
REHEARSAL_TABLE = "rehearsal.md"
RESULTS_TABLE = "table.json"  # the docs' results table (kvant.bench.tables), from the run
NEEDS_TABLE = "needs.json"  # the README's short table of what each kind of step needs
TOLERANCE_PCT = 15.0  # the planner's goal: every step's prediction within this of measured

# the recipe counts a --work fraction scales (section, key, default when the recipe is silent)
_COUNTS = (("release", "eval_tokens", 2048), ("gguf", "imatrix_chunks", 64),
           ("gptq", "samples", 256), ("bench", "quality_tokens", 4096), ("bench", "repeats", 3))


def scale_work(recipe, work: float):
    """The recipe with its counts scaled by ``work`` (0 < work <= 1), for a quick rehearsal:
    memory does not depend on them (one window, chunk, sample or repeat at a time) except
    GPTQ's calibration cache, which the plan predicts from the count used."""
    if not 0 < work <= 1:
        raise SettingsError(f"--work {work}: use a fraction above 0, at most 1")
    sections = json.loads(json.dumps(recipe.sections))
    # never below what the settings accept: one window of scored text, GPTQModel's 11 samples
    floors = {"eval_tokens": sections["release"].get("eval_ctx", 256),
              "quality_tokens": sections.get("bench", {}).get("quality_ctx", 512),
              "samples": 11}
    for section, key, default in _COUNTS:
        if section in sections:
            scaled = round(sections[section].get(key, default) * work)
            sections[section][key] = max(floors.get(key, 1), scaled)
    return replace(recipe, sections=sections)


def rows(steps: list[dict], shape: Shape, full: Shape, ram: int) -> list[dict]:
    """Per step: measured, predicted at this depth, error, and both carried to full depth.

    The plan predicts what a step adds to what the process tree holds when the step starts
    (measured: the engines imported so far, 0.3-2.5 GB), at this depth and at full depth.
    """
    out = []
    for record in steps:
        row = {k: v for k, v in record.items() if k not in ("wall_s", "peak_rss_mib")}
        floor = record.get("start_rss_mib", DEFAULT_FLOOR_MIB)
        row.update(wall_s=record["wall_s"], peak_rss_mib=record["peak_rss_mib"],
                   floor_mib=floor)
        predicted = step_peak(record, shape, ram, floor)
        if predicted is not None:
            row["predicted_mib"] = round(predicted / MIB, 1)
            row["error_pct"] = round(100 * (predicted / (record["peak_rss_mib"] * MIB) - 1), 1)
            deep = _at_depth(record, shape, full)
            at_full = step_peak(deep, full, ram, floor)
            row["full_predicted_gib"] = round(at_full / GIB, 2)
            row["full_mapped_gib"] = round(step_mapped(deep, full, ram) / GIB, 2)
            if record.get("kind") == "reference" and not record.get("streamed"):
                # what the reference takes where it streams layer by layer (a small RAM)
                row["full_streamed_gib"] = round(step_peak(
                    {**deep, "streamed": True}, full, ram, floor) / GIB, 2)
            row["full_measured_gib"] = round(record["peak_rss_mib"] * MIB * at_full / predicted
                                             / GIB, 2)
            row["machines"] = {name: needs(row, m) for name, m in MACHINES.items()}
        row["full_wall_s"] = round(record["wall_s"] * step_work(record, full)
                                   / step_work(record, shape), 2)
        if record.get("estimate"):  # a timed sample of a longer step (the torch mix)
            row["full_wall_s"] = round(mix_torch_seconds(record["estimate"], shape, full), 2)
            budget = record.get("time_budget_s")
            # measured on this machine: said for the machine of its kind (GPU or CPU-only)
            here = "24 GB GPU + 32 GB RAM" if record.get("device", "cpu") != "cpu" \
                else "24 GB CPU-only"
            if budget is not None and row["full_wall_s"] > budget and "machines" in row:
                row["machines"][here] += (f"; {_hours(row['full_wall_s'])} here, over "
                                          "--mix-time-budget: auto ships the uniform file, no -MIX")
        out.append(row)
    return out


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.0f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


# The two machines docs/real-size.md plans the 40-layer release for: (RAM, VRAM) in bytes.
MACHINES = {"24 GB CPU-only": (24 * 10**9, 0), "24 GB GPU + 32 GB RAM": (32 * 10**9, 24 * 10**9)}
_ON_GPU = ("reference", "gptq", "bnb", "mix-torch")
_USABLE = 0.9  # of a machine's RAM, for one program  # steps a CUDA machine runs on the GPU


def needs(row: dict, machine: tuple[int, int]) -> str:
    """Whether a step's 40-layer prediction fits a machine, and on what. On a GPU machine
    the torch steps (reference, GPTQ, bitsandbytes, their scoring) put the model on the GPU,
    accelerate keeping in RAM what does not fit; GPTQModel holds a layer or two in RAM (the
    rest offloaded to disk) and quantizes one on the GPU (kvant.quantize.gptq_pipeline)."""
    ram, vram = machine[0] * _USABLE, machine[1]  # the system and page cache keep the rest
    need = row["full_predicted_gib"] * GIB
    floor = row["floor_mib"] * MIB
    on_gpu = vram and (row.get("kind") or "").startswith(_ON_GPU) and not row.get("worker")
    if not on_gpu:
        return _in_ram(row, need, ram)
    model = need - floor
    # GPTQModel and the bitsandbytes writer quantize on the CPU, layer or tensor at a time
    if row["step"].endswith(" quantize") and row["kind"].startswith(("gptq", "bnb")):
        return _in_ram(row, need, ram)
    if model <= 0.9 * vram:
        return "fits on the GPU"
    spill = model - 0.9 * vram
    return ("fits (accelerate keeps "f"{spill / 1e9:.0f} GB in RAM)" if floor + spill <= ram
            else f"needs {(floor + spill) / _USABLE / 1e9:.0f} GB RAM beside the GPU")


def _in_ram(row: dict, need: float, ram: float) -> str:
    """A CPU step's verdict: it fits; or it fits streamed (the reference, layer by layer); or
    its anonymous memory fits and the rest is mapped file pages, which the kernel re-reads
    from disk as RAM runs short (it completes, slower); or the RAM it needs."""
    if need <= ram:
        return "fits"
    streamed = row.get("full_streamed_gib")
    if streamed is not None and streamed * GIB <= ram:
        return f"fits, streamed layer by layer ({streamed:.1f} GiB)"
    mapped = row.get("full_mapped_gib", 0) * GIB
    if mapped and need - mapped <= ram:
        return (f"fits: {(need - mapped) / GIB:.1f} GiB anonymous + {mapped / GIB:.1f} GiB "
                "of mapped file, re-read as RAM runs short (slower)")
    return f"needs {need / _USABLE / 1e9:.0f} GB RAM"


def _at_depth(record: dict, shape: Shape, full: Shape) -> dict:
    """A step's facts at full depth: a file holds the full model's tensors at the bits per
    weight measured here (an fp32 embedding does not grow with depth; layers do), and the
    reference's dtype is chosen anew (float32 only where it fits)."""
    out = {k: v for k, v in record.items() if k != "dtype"}
    if record.get("weights") and record.get("kind"):
        k = kind(record["kind"], file_bpw=8 * record["weights"] / shape.n_params())
        if k is not None:
            out["weights"] = record["weights"] * weight_bytes(full, k) / weight_bytes(shape, k)
    return out


def write_rehearsal(root: Path, steps: list[dict], config: dict, full_layers: int,
                    work: float, finished: bool = True, ram: int | None = None) -> Path:
    """rehearsal.json and rehearsal.md in ``root`` for a run on the model of ``config``
    (``full_layers`` deep in reality); returns the JSON's path."""
    shape = shape_of(config)
    layers = shape.n_layers
    full = replace(shape, n_layers=full_layers)
    info = machine()
    ram = ram or ram_bytes()  # predictions depend on it (the reference's dtype)
    table = rows(steps, shape, full, ram)
    data = {"layers": layers, "full_layers": full.n_layers, "work": work, "finished": finished,
            "machine": info, "ram_bytes": ram, "config": config, "records": steps,
            "tolerance_pct": TOLERANCE_PCT, "steps": table,
            "within_tolerance": all(abs(r["error_pct"]) <= TOLERANCE_PCT
                                    for r in table if "error_pct" in r)}
    data["worst_error_pct"] = max((abs(r["error_pct"]) for r in table if "error_pct" in r),
                                  default=None)
    path = root / REHEARSAL_JSON
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (root / REHEARSAL_TABLE).write_text(markdown(data), encoding="utf-8")
    write_table(root / RESULTS_TABLE, results_table(data))
    write_table(root / NEEDS_TABLE, needs_table(data))
    return path


# The README's groups of steps: (label, does it want a GPU, step-name prefixes).
_GROUPS = (("GGUF convert and llama-quantize", "no", ("gguf convert", "gguf quantize",
                                                     "gguf mix q")),
           ("the bf16 reference", "no (faster with one)", ("reference",)),
           ("the importance matrix", "no", ("gguf imatrix",)),
           ("scoring the GGUF files", "no", ("gguf score", "gguf tokenizer report")),
           ("mixed precision, torch sensitivity", "yes, in practice (days on a CPU)",
            ("gguf mix sensitivity torch",)),
           ("GPTQ", "yes, in practice (hours on a CPU)", ("gptq-",)),
           ("bitsandbytes quantize", "no", ("bnb-nf4 quantize", "bnb-int8 quantize")),
           ("ONNX int4 build", "no", ("onnx-int4-b32 build", "onnx-int4-b128 build")),
           ("the bench", "no", ("bench ",)),
           ("task scores ([eval], lm-eval)", "no (faster with one)", ("eval ",)))


def _verdict(found: list[dict], largest: dict, machine: str) -> str:
    """A group's cell for one machine: the largest step's verdict, unless a step of the group
    does not fit there (a smaller plan can need more anonymous memory than a larger, mapped
    one): then the largest of those, named."""
    short = [r for r in found if r["machines"][machine].startswith("needs")]
    if not short or largest in short:
        return largest["machines"][machine]
    worst = max(short, key=lambda r: r["full_predicted_gib"])
    return f"{worst['step']}: {worst['machines'][machine]}"


def needs_table(data: dict) -> dict:
    """The README's table: per group of steps, the largest 40-layer plan and what it needs on
    each machine (the largest step's verdict, or the step that does not fit; _verdict),
    generated from the rehearsal."""
    full, cells = data["full_layers"], []
    for label, gpu, prefixes in _GROUPS:
        found = [r for r in data["steps"] if "full_predicted_gib" in r
                 and r["step"].startswith(prefixes)
                 and not (label == "the bench" and "quantize" in r["step"])]
        if not found:
            continue
        largest = max(found, key=lambda r: r["full_predicted_gib"])
        cells.append([label, gpu, f"{largest['full_predicted_gib']:.1f} GiB",
                      *(_verdict(found, largest, m) for m in MACHINES)])
    return table_doc(f"What each step needs at {full} layers: the largest plan of the group, "
                     f"from the {data['layers']}-layer rehearsal",
                     ["step", "GPU", f"memory at {full} layers (plan)", *MACHINES], cells,
                     results_table(data)["command"], machine_info=data.get("machine"))


def _minutes(seconds: float) -> str:
    return f"{seconds / 3600:,.0f} h" if seconds >= 10 * 3600 else f"{seconds / 60:,.0f} min"


def results_table(data: dict, command: str | None = None) -> dict:
    """The rehearsal as the docs' results table (docs/results/rehearsal-N.json, rendered by
    tools/render_docs.py): a row per step (the bench's speed rows at their largest context
    only; rehearsal.md has them all), generated from rehearsal.json, never edited by hand."""
    layers, full = data["layers"], data["full_layers"]
    unit = "layer" if layers == 1 else "layers"
    speed = [r for r in data["steps"] if r["step"].startswith("bench speed")]
    top = max((int(r["step"].rsplit("@", 1)[1]) for r in speed if "@" in r["step"]),
              default=None)
    cells = []
    for r in data["steps"]:
        if r in speed and top is not None and not r["step"].endswith(f"@{top}"):
            continue
        err = f"{r['error_pct']:+.1f}%" if "error_pct" in r else "no plan"
        cells.append([r["step"], f"{r['peak_rss_mib']:,.0f} MiB / {err}",
                      f"{r['wall_s']:,.0f} s",
                      f"{r['full_predicted_gib']:.1f} GiB" if "full_predicted_gib" in r
                      else "-", _minutes(r["full_wall_s"]),
                      *(r.get("machines", {}).get(m, "-") for m in MACHINES)])
    worst = data.get("worst_error_pct")
    notes = (f"Every prediction within {data['tolerance_pct']:g}% of its measurement"
             if data["within_tolerance"] else "NOT every prediction within "
             f"{data['tolerance_pct']:g}% of its measurement") + (
        f" (worst {worst:.1f}%)." if worst is not None else ".") + (
        f" Times at {full} layers are the {layers}-layer times carried by the parameters "
        "touched (the torch mix sensitivity's by its own estimate). The GPU column is the "
        "plan's placement rule, not measured.")
    counts = "the recipe's counts" if data["work"] == 1 else \
        f"the recipe's counts x{data['work']:g}"
    command = command or ("kvant release recipes/normistral-11b-long.toml --rehearse "
                          f"{layers}" + ("" if data["work"] == 1 else f" --work {data['work']:g}"))
    return table_doc(f"Rehearsal at NorMistral-11b-long's width, {layers} layer(s), {counts}: "
                     f"each step's peak beside the plan, and the {full}-layer plan on two "
                     "machines",
                     ["step", f"{layers} {unit}: peak / plan", f"wall at {layers} {unit}",
                      f"{full} layers: plan", f"wall at {full} (est.)", *MACHINES],
                     cells, command, notes=notes, machine_info=data.get("machine"))


def markdown(data: dict) -> str:
    full = data["full_layers"]
    machines = list(MACHINES)
    lines = [f"# Rehearsal at {data['layers']} layer(s) of {full}",
             "", *([] if data["finished"] else ["**Stopped early: the steps below are those "
                                                "that ran.**", ""]),
             f"Real widths, random weights; recipe counts x{data['work']:g}. Quality numbers "
             "from this run mean nothing and are not shown. Peak RAM is the step's whole "
             "process tree; the plan predicts what the step adds to what the tree held when it "
             "started. At {full} layers the measurement is carried by the plan's own ratio "
             "(memory) and by the parameters the step touches (time).".format(full=full),
             "",
             f"| step | wall (s) | peak RAM (MiB) | plan (MiB) | error | wall at {full} (s) | "
             f"peak at {full} (GiB) | plan at {full} (GiB) | " + " | ".join(machines) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(machines)]
    for r in data["steps"]:
        err = f"{r['error_pct']:+.1f}%" if "error_pct" in r else "-"
        verdicts = [r.get("machines", {}).get(m, "-") for m in machines]
        lines.append(f"| {r['step']} | {r['wall_s']:.1f} | {r['peak_rss_mib']:,.0f} | "
                     f"{r.get('predicted_mib', float('nan')):,.0f} | {err} | "
                     f"{r['full_wall_s']:,.0f} | {r.get('full_measured_gib', float('nan')):.2f} "
                     f"| {r.get('full_predicted_gib', float('nan')):.2f} | "
                     + " | ".join(verdicts) + " |")
    worst = data.get("worst_error_pct")
    verdict = "within" if data["within_tolerance"] else "NOT all within"
    lines += ["", f"Predictions {verdict} {data['tolerance_pct']:g}% of their measurements "
              f"(worst {worst:.1f}%)." if worst is not None else "", ""]
    return "\n".join(lines)


def recompute(root: Path) -> Path:
    """Rewrite a rehearsal's table from its recorded steps with today's planner."""
    data = json.loads((Path(root) / REHEARSAL_JSON).read_text(encoding="utf-8"))
    return write_rehearsal(Path(root), data["records"], data["config"], data["full_layers"],
                           data["work"], data["finished"], data["ram_bytes"])
