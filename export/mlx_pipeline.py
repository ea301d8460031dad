"""`kvant export mlx`: MLX folders for Apple silicon (mlx-lm, LM Studio), 2-8 bit affine.

Through mlx-lm's own `convert` (its quantize and its save), never a hand-written writer, in a
child process: its peak memory is its own, and MLX's buffers go with it. The folder is what
`mlx_lm.convert` writes, with the source's own tokenizer files in place of mlx-lm's re-save
(kvant.model.TOKENIZER_FILES). Every number comes from that folder reloaded by mlx-lm
(kvant.runtimes.mlx) on the exact HF ids: drift against the source on held-out text, the
cached greedy decode against the full-sequence argmax, and whether mlx-lm's own tokenizer
gives the exact ids on every held-out paragraph.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

from mlx_lm.utils import load_tokenizer
from tokenizers import Tokenizer

from kvant.artifact import (
    ArtifactWriter,
    PipelineOutput,
    check_free_space,
    check_input,
    settings_dict,
)
from kvant.data import get_mix, paragraphs
from kvant.errors import KvantError
from kvant.export.gguf_mix import mix_verdict
from kvant.export.mlx import MLXSettings
from kvant.export.mlx_mix import CANDIDATE_BITS, choose_bits, fisher_bits_costs, quantizable
from kvant.machine import PEAK_REPORT, run_python
from kvant.model import (
    copy_tokenizer,
    read_config,
    read_safetensors_header,
    rope_theta,
    weight_files,
)
from kvant.plan.peaks import disk_need
from kvant.recorder import REHEARSAL_WARNING, language_tokens, step
from kvant.runtimes.mlx import MLXRuntime
from kvant.runtimes.reference import pipeline_reference, score_against
from kvant.runtimes.targets import Target
from kvant.scoring import drift_table, eval_windows, held_out
from kvant.tokenization import fidelity

_CONVERT = """
import json, sys
from mlx_lm import convert
model, out, bits, group, dtype, plan = sys.argv[1:7]
predicate = None
if plan != "-":  # a mix: {module path: bits}, stored per module in config.json
    chosen = json.loads(open(plan, encoding="utf-8").read())
    def predicate(path, module):
        b = chosen.get(path)
        return {"group_size": int(group), "bits": b, "mode": "affine"} if b else True
convert(model, out, quantize=True, q_bits=int(bits), q_group_size=int(group), dtype=dtype,
        quant_predicate=predicate)
""" + PEAK_REPORT
# mlx-lm's convert loads from the Hub when a path does not exist: never here
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


class MixWithheld(KvantError):
    """A mix that held-out text does not score better than its uniform twin: nothing is
    published. ``scores``: both files' held-out scores and bytes, for a study to report."""

    def __init__(self, message: str, scores: dict):
        super().__init__(message)
        self.scores = scores


def convert(model_dir: Path, out_dir: Path, settings: MLXSettings,
            bits_of: dict[str, int] | None = None) -> dict:
    """mlx-lm's convert of ``model_dir`` into ``out_dir`` (which must not exist), every
    module at ``settings.bits``, or a mix's ``bits_of`` {module path: bits}."""
    plan = out_dir.with_name(out_dir.name + ".bits.json")
    if bits_of:
        plan.write_text(json.dumps(bits_of), encoding="utf-8")
    text, seconds, peak = run_python(
        _CONVERT, [str(model_dir.resolve()), str(out_dir), str(settings.bits),
                   str(settings.group_size), settings.dtype, str(plan) if bits_of else "-"],
        "mlx-lm's convert", env={**os.environ, **_OFFLINE})
    bpw = re.findall(r"Quantized model with ([0-9.]+) bits per weight", text)
    return {"convert_seconds": round(seconds, 1), "convert_peak_rss_mib": peak,
            "bits_per_weight": float(bpw[-1]) if bpw else None}


def state_rope_theta(folder: Path, source_config: dict) -> bool:
    """Write the RoPE base at the top of ``folder``'s config.json, where mlx-lm reads it.

    mlx-lm 0.32 reads only a top-level `rope_theta` and otherwise silently runs 10,000;
    transformers 5 saves it inside `rope_parameters`. A NorMistral saved by transformers 5
    (1e6) would run as another model: on the stand-in the unquantized MLX conversion drifted
    by a mean KLD of 0.0142 from the source, and 8e-9 with the key stated. True when added."""
    config = read_config(folder)
    theta = rope_theta(source_config)
    if config.get("rope_theta") == theta:
        return False
    (folder / "config.json").write_text(json.dumps({**config, "rope_theta": theta}, indent=4),
                                        encoding="utf-8")
    return True


def _add_what_mlx_lm_lacks(folder: Path, model_dir: Path, config: dict) -> bool:
    """What mlx-lm's folder lacks: the source's own tokenizer files and the RoPE base where
    mlx-lm reads it (True when that was added)."""
    copy_tokenizer(model_dir, folder)
    return state_rope_theta(folder, config)


def _sensitivity(model_dir: Path, settings: MLXSettings, cache_dir: Path,
                 data_dir: Path | None, progress: bool, device: str) -> tuple[dict, dict]:
    """The mix's bits per module (kvant.export.mlx_mix) and what choosing them took."""
    calib = get_mix(settings.calib, cache_dir, data_dir, progress)
    wins = eval_windows(model_dir, {"calib": calib}, settings.mix_tokens, settings.eval_ctx)
    tensors = quantizable(model_dir, settings.group_size)
    with step(f"{settings.kind} mix sensitivity", kind="mix-fisher", ctx=settings.eval_ctx,
              tensors=len(tensors), tokens=sum(map(len, wins["calib"]))):
        costs, facts = fisher_bits_costs(model_dir, tensors, CANDIDATE_BITS,
                                         settings.group_size, settings.dtype, wins["calib"],
                                         device, progress=progress)
    bits_of = choose_bits(tensors, costs, settings.bits, settings.group_size)
    counts = Counter(bits_of.values())
    return bits_of, {**facts, "calib": calib.name, "bits_of_tensors": {
        str(b): counts[b] for b in sorted(counts)}, "bits_per_module": bits_of}


def _against_twin(model_dir: Path, settings: MLXSettings, config: dict, scored: dict, ref,
                  wins: dict, scratch: Path) -> dict:
    """The uniform file of the same bits scored beside the mix; refuse to publish a mix that
    held-out text does not score better (kvant.export.gguf_mix.mix_verdict)."""
    uniform = replace(settings, mix=False)
    twin = scratch / "uniform"
    with step(f"{uniform.kind} convert", kind=uniform.kind):
        convert(model_dir, twin, uniform)
    _add_what_mlx_lm_lacks(twin, model_dir, config)
    with step(f"{uniform.kind} score", kind=uniform.kind, ctx=settings.eval_ctx,
              tokens_per_language=language_tokens(wins)):
        twin_scored = score_against(Target(twin.name, twin, "mlx", "mlx", 0, uniform.kind),
                                    ref, wins)
    mix_size, twin_size = (sum(f.stat().st_size for f in weight_files(d))
                           for d in (scratch / "mlx", twin))
    verdict = mix_verdict(scored, twin_scored)
    if verdict is None and mix_size > twin_size:
        verdict = f"it is {mix_size:,} bytes, larger than the uniform file's {twin_size:,}"
    if verdict is not None:
        raise MixWithheld(f"the MLX {settings.bits}-bit mix is not published: {verdict}; "
                          f"drop --mix for the uniform {settings.bits}-bit file",
                          {"mix": {**scored, "size_bytes": mix_size},
                           "uniform": {**twin_scored, "size_bytes": twin_size}})
    return {"uniform_mean_kld": twin_scored["mean_kld"],
            "uniform_per_language": {lang: d["mean_kld"]
                                     for lang, d in twin_scored["per_language"].items()},
            "uniform_top1_agreement_pct": twin_scored["top1_agreement_pct"],
            "uniform_delta_ppl_pct": twin_scored["delta_ppl_pct"],
            "vs_uniform": round(scored["mean_kld"] / twin_scored["mean_kld"], 3),
            "size_bytes": mix_size, "uniform_size_bytes": twin_size}


def unquantized(folder: Path) -> list[str]:
    """The weight tensors mlx-lm left in float: those whose rows the group size does not
    divide (it skips them), read from the folder's safetensors headers."""
    names = set()
    for file in weight_files(folder):
        names.update(read_safetensors_header(file))
    return sorted(n for n in names if n.endswith(".weight") and "norm" not in n
                  and n.removesuffix(".weight") + ".scales" not in names)


def mlx_fidelity(theirs, exact: Tokenizer, units: list[str]) -> dict:
    """What mlx-lm's own tokenizer (``theirs``: `mlx_lm.utils.load_tokenizer` of the folder,
    what mlx_lm.generate and mlx_lm.server encode with) gives on raw text against the exact
    HF ids."""
    fid = fidelity([exact.encode(u).ids for u in units], [theirs.encode(u) for u in units])
    return {"units": fid.units, "identical_pct": fid.identical_pct,
            "aligned_pct": fid.aligned_pct}


def _card(name: str, settings: MLXSettings, validation: dict, kept: list[str]) -> str:
    fid_rows = ["| language | paragraphs | identical | aligned agreement |", "|---|---|---|---|"]
    for lang, f in validation["mlx_tokenizer"].items():
        fid_rows.append(f"| {lang} | {f['units']} | {f['identical_pct']:.1f}% | "
                        f"{f['aligned_pct']:.2f}% |")
    left = (f"\n{len(kept)} tensors whose rows {settings.group_size} does not divide stay "
            f"{settings.dtype}, as mlx-lm leaves them.\n" if kept else "")
    if mix := validation.get("mix"):
        widths = ", ".join(f"{n} at {b} bits" for b, n in mix["bits_of_tensors"].items())
        left += (f"\n**A mix**: bits per tensor ({widths}) chosen by Kvant's Fisher sensitivity "
                 f"on `{mix['calib']}` within the uniform {settings.bits}-bit file's bytes "
                 f"({mix['size_bytes']:,} against {mix['uniform_size_bytes']:,}); its held-out "
                 f"mean KLD is {mix['vs_uniform']:.2f}x the uniform file's "
                 f"({validation['mean_kld']:.5f} against {mix['uniform_mean_kld']:.5f}).\n")
    return f"""MLX model of `{name}` for Apple silicon: {settings.bits}-bit affine weights, a
{settings.dtype} scale and bias per {settings.group_size} weights
({validation['bits_per_weight']} bits per weight), made by mlx-lm's own convert.
{left}
## Run it

    pip install mlx-lm
    mlx_lm.generate --model . --prompt "Noreg er"
    mlx_lm.server --model .        # an OpenAI-compatible server on port 8080

LM Studio lists the folder as an MLX model. On a Mac it runs on the GPU (Metal); elsewhere
`pip install 'mlx[cpu]' mlx-lm` runs it on the CPU, slowly. Kvant's own
`kvant generate . --prompt "Noreg er"` and `kvant serve .` run it through mlx-lm too.

## Drift

Reloaded by mlx-lm on the exact HF token ids and scored against the source model (float32)
on the CPU, with float32 activations (kvant.runtimes.mlx): max |Δlogit|
{validation['max_abs_logit_diff']:.5f}; mlx-lm's cached greedy decode of
{validation['greedy_tokens']} tokens matched the full-sequence greedy choice on
{validation['greedy_match_pct']:.0f}% of tokens.

{drift_table(validation)}

## Tokenization

mlx-lm tokenizes with the folder's own `tokenizer.json` through transformers, so it runs
NorMistral's whole pipeline (prepended space, NFKC, newline rule, split, chunks). What it
gives on raw held-out text, against the exact HF ids:

{chr(10).join(fid_rows)}
"""


def run(model_dir: Path, out: Path, settings: MLXSettings, *, source: dict, cache_dir: Path,
        data_dir: Path | None = None, force: bool = False, progress: bool = False,
        device: str = "cpu", reference_dir: Path | None = None,
        rehearsal: bool = False) -> PipelineOutput:
    """`kvant export mlx`: convert, ship the exact tokenizer, validate, publish ``out``
    (``reference_dir`` and ``rehearsal``: see kvant.quantize.checkpoint)."""
    config = check_input(model_dir, out, force, allow_synthetic=rehearsal)
    check_free_space(out.parent, disk_need(config, [settings.kind]))
    texts, wins = held_out(model_dir, settings, cache_dir, data_dir, progress)
    exact = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    with ArtifactWriter(out, fmt="mlx", force=force, protect=(model_dir,)) as art:
        if rehearsal:
            art.warn(REHEARSAL_WARNING)
        ref = pipeline_reference(model_dir, wins, reference_dir, art.scratch,
                                 settings.eval_ctx, device)
        bits_of, mix = (_sensitivity(model_dir, settings, cache_dir, data_dir, progress,
                                     device) if settings.mix else (None, None))
        converted = art.scratch / "mlx"
        with step(f"{settings.kind} convert", kind=settings.kind):
            facts = convert(model_dir, converted, settings, bits_of)
        facts["rope_theta_stated"] = _add_what_mlx_lm_lacks(converted, model_dir, config)
        kept = unquantized(converted)
        with step(f"{settings.kind} score", kind=settings.kind, ctx=settings.eval_ctx,
                  tokens_per_language=language_tokens(wins)):
            scored = score_against(Target(out.name, converted, "mlx", "mlx", 0, settings.kind),
                                   ref, wins)
        if settings.mix:
            facts["mix"] = {**mix, **_against_twin(model_dir, settings, config, scored, ref,
                                                   wins, art.scratch)}
        for item in converted.iterdir():
            if item.name != "README.md":  # mlx-lm's one-line card: ours replaces it
                shutil.move(item, art.dir / item.name)
        prompt = wins[settings.eval_langs[0]][0][:32]
        with step(f"{settings.kind} greedy", kind=settings.kind, ctx=len(prompt) + 16):
            runtime = MLXRuntime(art.dir)
            greedy = [t for t, _ in zip(runtime.greedy(prompt), range(16), strict=False)]
            expected = runtime.logits(prompt + greedy[:-1])[len(prompt) - 1:].argmax(-1)
            runtime.close()
        same = sum(a == b for a, b in zip(greedy, expected.tolist(), strict=True))
        theirs = load_tokenizer(art.dir)  # once, for every language
        fid = {lang: mlx_fidelity(theirs, exact, paragraphs(t.read()))
               for lang, t in texts.items()}
        art.validation = {
            "reference": f"transformers, {ref.dtype} weights, float32 log-softmax",
            "runtime": "mlx-lm (CPU, float32 activations)", **facts,
            "unquantized_tensors": kept, "greedy_tokens": len(greedy),
            "greedy_match_pct": round(100 * same / max(len(greedy), 1), 1),
            **scored, "rehearsal": rehearsal, "mlx_tokenizer": fid}
        art.source, art.settings = source, settings_dict(settings)
        art.kinds = {out.name: settings.kind}
        art.data = [t.as_manifest() for t in texts.values()]
        art.tags = ["mlx", "mlx-lm", f"{settings.bits}-bit", *(["mixed-bits"] if settings.mix
                                                               else [])]
        name = Path(source.get("id", model_dir.name)).name
        art.title = (f"{name} MLX {settings.bits}-bit{' mix' if settings.mix else ''} (group "
                     f"size {settings.group_size})")
        art.card_body = _card(name, settings, art.validation, kept)
    return PipelineOutput(out, art.kinds)
