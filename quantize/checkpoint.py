"""The one quantize-then-verify path that every transformers-checkpoint method shares.

A method (GPTQ, bitsandbytes) only quantizes into a folder and says what it did; this module
checks the input, computes the reference distributions first (so a bad eval setting fails
before hours of work), copies the original tokenizer, reloads the saved checkpoint from disk,
scores it against the reference on identical ids and publishes the artifact atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvant.artifact import (
    ArtifactWriter,
    PipelineOutput,
    check_free_space,
    check_input,
    settings_dict,
)
from kvant.data import EvalSettings, TextFile
from kvant.model import copy_tokenizer
from kvant.plan.peaks import disk_need
from kvant.recorder import REHEARSAL_WARNING, language_tokens, step
from kvant.runtimes.reference import pipeline_reference, score_against
from kvant.runtimes.targets import Target
from kvant.scoring import drift_table, held_out


@dataclass
class Quantized:
    """What a method reports about the checkpoint it wrote."""

    facts: dict
    """Into the manifest's validation (time, device, peak memory, ...)."""
    description: str
    """The model card's first paragraphs: what it is and how to load it."""
    title: str
    tags: list[str]
    data: list[TextFile] = field(default_factory=list)
    """Calibration texts used."""
    warnings: list[str] = field(default_factory=list)


def quantize_checkpoint(model_dir: Path, out: Path, settings: EvalSettings, *, fmt: str,
                        kind: str, source: dict, cache_dir: Path, data_dir: Path | None,
                        force: bool, quantize: Callable[[Path, Path], Quantized],
                        device: str = "cpu", reference_dir: Path | None = None,
                        rehearsal: bool = False) -> PipelineOutput:
    """Run ``quantize(folder, scratch)`` into a staging folder and publish ``out`` once
    verified (``scratch``: work space inside the staging folder, removed before publishing).

    ``reference_dir``: a reference folder shared with the rest of a release (else one in
    scratch); ``rehearsal``: synthetic weights are scored for time and memory only."""
    config = check_input(model_dir, out, force, allow_synthetic=rehearsal)
    check_free_space(out.parent, disk_need(config, [kind]))
    texts, wins = held_out(model_dir, settings, cache_dir, data_dir)
    with ArtifactWriter(out, fmt=fmt, force=force, protect=(model_dir,)) as art:
        ref = pipeline_reference(model_dir, wins, reference_dir, art.scratch,
                                 settings.eval_ctx, device)
        with step(f"{kind} quantize", kind=kind) as record:
            done = quantize(art.dir, art.scratch)
            record.update(samples=done.facts.get("calibration_samples"),
                          seqlen=getattr(settings, "seqlen", None))
        if rehearsal:
            art.warn(REHEARSAL_WARNING)
        for message in done.warnings:
            art.warn(message)
        copy_tokenizer(model_dir, art.dir)
        # Every number comes from the checkpoint as saved: reloaded from disk, never the
        # in-memory model (GPTQModel's is invalid after quantize(); bnb's must not run first).
        target = Target(out.name, art.dir, "torch", fmt, 0, kind)
        with step(f"{kind} score", kind=kind, ctx=settings.eval_ctx,
                  tokens_per_language=language_tokens(wins)):
            scored = score_against(target, ref, wins)
        art.validation = {"reference": f"source model, {ref.dtype} weights, float32 "
                                       "log-softmax", "reloaded_from_disk": True,
                          **done.facts, **scored, "rehearsal": rehearsal}
        art.source, art.settings = source, settings_dict(settings)
        art.kinds = {out.name: kind}
        art.data = [t.as_manifest() for t in [*done.data, *texts.values()]]
        art.tags, art.title = done.tags, done.title
        art.card_body = (done.description.strip() + "\n\nDrift against the source model on "
                         "identical held-out token ids:\n\n" + drift_table(art.validation))
    return PipelineOutput(out, art.kinds)
