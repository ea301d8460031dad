"""`kvant bench`: speed, memory and perplexity drift of every artifact against the reference.

Quality runs in this process: every runtime scores the same HF token ids in the same windows
(non-overlapping, `quality_ctx` long). Reference distributions are computed once per run
(kvant.runtimes.reference_logits) into scratch space inside --out, and each target is
compared with them one language at a time. Speed and memory run in a fresh process per
(target, context length), each with the CPU time other programs took meanwhile: a row
measured on a busy machine, or whose repeats spread widely, is measured again and, if it
stays so, kept with `noisy: true`.

results.json is rewritten after every measurement. Quality and speed have keys of their own,
each naming everything its numbers depend on and nothing else (`quality_key`, `speed_key`):
the artifact's sha256 (never its path), the engine that ran it (llama.cpp's build, torch,
ONNX Runtime and GenAI versions), the machine (CPU, cores, GPU) and the device; quality also
the reference's sha256 and the digest of every held-out text, speed its own settings. A rerun
skips what it already holds under the same key: changing --repeats re-times, never re-scores,
and no row measured on another machine or build is reused under this one's description.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from kvant.artifact import installed_versions
from kvant.bench.report import write_report
from kvant.bench.settings import BenchSettings
from kvant.data import get_text
from kvant.engine import stated_context
from kvant.errors import SettingsError
from kvant.files import sha256_text, write_json
from kvant.machine import child_limit, die_with_parent, machine, over_limit, weights_flops
from kvant.model import model_info, pick_device, read_config
from kvant.plan.kv import kv_types_for
from kvant.recorder import language_tokens, step
from kvant.runtimes.reference import pipeline_reference, score_against
from kvant.runtimes.targets import Target, targets, verify
from kvant.scoring import text_windows

logger = logging.getLogger(__name__)
SCHEMA_VERSION = 3
REFERENCE = "reference-bf16"


def _texts(langs, cache_dir, data_dir):
    return {Path(lang).name if ("/" in lang or lang.endswith(".txt")) else lang:
            get_text(lang, cache_dir, data_dir) for lang in langs}


def quality_windows(reference: Path | None, texts: dict, settings: BenchSettings
                    ) -> tuple[dict[str, list[list[int]]], dict[str, float]]:
    """The bench's quality windows per language, and each text's bytes per token."""
    if not texts:  # a speed-only run may have no reference
        return {}, {}
    return text_windows(reference, texts, settings.quality_tokens, settings.quality_ctx)


def texts_for(settings: BenchSettings, cache_dir: Path, data_dir: Path | None) -> dict:
    """The held-out texts a quality run scores (none for a speed-only run)."""
    return _texts(settings.langs, cache_dir, data_dir) if settings.quality else {}


def quality(target: Target, wins: dict, ref, bytes_per_token: dict, device: str,
            threads: int) -> dict:
    """Per language: drift against the reference plus bits per byte."""

    def bits_per_byte(lang: str, d: dict) -> dict:
        # mean bits per scored token x tokens per byte of the text they came from
        return {"bits_per_byte": round(math.log2(d["ppl"]) / bytes_per_token[lang], 4),
                "bits_per_byte_ref": round(math.log2(d["ppl_ref"]) / bytes_per_token[lang], 4)}

    return score_against(target, ref, wins, device, threads,
                         extra=bits_per_byte)["per_language"]


def noise(row: dict, settings: BenchSettings) -> list[str]:
    """Why a speed row cannot be trusted (empty when it can)."""
    reasons = []
    if row["other_cpu_pct"] > settings.max_other_cpu_pct:
        reasons.append(f"other programs used {row['other_cpu_pct']:.0f}% of the CPU")
    for phase in ("prefill", "decode"):
        if row[f"{phase}_spread_pct"] > settings.max_spread_pct:
            reasons.append(f"{phase} repeats spread {row[f'{phase}_spread_pct']:.0f}%")
    return reasons


def measure_once(target: Target, ids: list[int], ctx: int, settings: BenchSettings,
                 device: str) -> dict:
    """One fresh-process measurement (see kvant.bench.worker)."""
    spec = {"target": {**target.__dict__, "path": str(target.path),
                       "files": list(target.files)}, "ids": ids, "ctx": ctx,
            "n_new": settings.n_new, "repeats": settings.repeats, "device": device,
            "threads": settings.threads, "repack": settings.repack,
            "kv_type": (settings.kv_type if settings.kv_type in kv_types_for(target.backend)
                        else "f16")}
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, result_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps(spec))
        # its work: the warm-up and at least `repeats` prefills of ctx and decodes of n_new at
        # that depth, and loading the weights (short phases repeating up to half a second
        # more are within the limit's floor)
        runs = settings.repeats + 2
        limit = child_limit(flops=weights_flops(target.size_bytes,
                                                runs * (2 * ctx + settings.n_new)),
                            nbytes=target.size_bytes)
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "kvant.bench.worker", str(spec_file),
                                   str(result_file)], capture_output=True, text=True,
                                  preexec_fn=die_with_parent, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"error": over_limit(f"the bench worker for {target.name} at {ctx}", limit)}
        wall = time.perf_counter() - started
        if proc.returncode:
            tail = " | ".join(proc.stderr.strip().splitlines()[-2:])
            return {"error": f"worker failed: {tail}"}
        # the worker's whole life, clocked from outside: every timed run happened inside it
        return {**json.loads(result_file.read_text()), "worker_wall_s": round(wall, 3)}


def speed(target: Target, ids: list[int], ctx: int, settings: BenchSettings,
          device: str) -> dict:
    """Measure until a row is clean or ``max_attempts`` are spent; keep the quietest one."""
    attempts = []
    for _ in range(settings.max_attempts):
        row = measure_once(target, ids, ctx, settings, device)
        if "error" in row:
            return row
        row["noise"] = noise(row, settings)
        attempts.append(row)
        if not row["noise"]:
            break
        last = len(attempts) == settings.max_attempts
        logger.warning("%s at %d: %s; %s", target.name, ctx, "; ".join(row["noise"]),
                       "kept as noisy" if last else "measuring again")
    best = min(attempts, key=lambda r: (len(r["noise"]), r["other_cpu_pct"]))
    return {**best, "noisy": bool(best["noise"]), "attempts": len(attempts)}


def _save(out: Path, results: dict) -> None:
    write_json(out / "results.json", results)


# What else, beside the artifact, decides each backend's numbers.
_ENGINE_LIBRARIES = {
    "torch": ("torch", "transformers", "gptqmodel", "bitsandbytes", "optimum"),
    "onnxruntime-genai": ("onnxruntime", "onnxruntime-genai"),
    "onnxruntime": ("onnxruntime",),
    "mlx": ("mlx", "mlx-lm"),
}


def engine(backend: str) -> dict:
    """The build that runs ``backend``: llama.cpp's version, compiled CPU features and build
    flags (kvant.runtimes.llamacpp.build_info), or the versions of the libraries that run a
    torch or ONNX target."""
    if backend == "llama.cpp":
        from kvant.runtimes.llamacpp import build_info  # llama-cpp-python: GGUF targets only

        info = build_info()
        return {k: info.get(k) for k in ("llama_cpp_python", "features", "variant", "cflags",
                                         "cmake_args", "wheel")}
    return installed_versions(_ENGINE_LIBRARIES.get(backend, ()))


def machine_identity(info: dict, device: str) -> dict:
    """What of the machine a number depends on (not its kernel's patch level or Python)."""
    return {"cpu": info.get("cpu"), "cpu_count": info.get("cpu_count"),
            "gpu": info.get("gpu"), "device": device}


def _digest(parts: dict) -> str:
    return sha256_text(json.dumps(parts, sort_keys=True))[:16]


def quality_key(artifact_digest: str, reference_digest: str | None, texts: dict,
                settings: BenchSettings, engine_id: dict, where: dict) -> str:
    """Everything a target's quality numbers depend on: change any of it and they are
    scored anew."""
    return _digest({"artifact": artifact_digest, "reference": reference_digest,
                    "texts": {lang: text.sha256 for lang, text in texts.items()},
                    "settings": settings.measurement_key()["quality"], "engine": engine_id,
                    "machine": where})


def speed_key(artifact_digest: str, settings: BenchSettings, engine_id: dict,
              where: dict) -> str:
    """Everything a target's speed rows depend on (no text: the ids are the same for every
    target and only their count matters)."""
    return _digest({"artifact": artifact_digest, "settings": settings.measurement_key()["speed"],
                    "engine": engine_id, "machine": where})


def unique_names(found: list[Target]) -> list[Target]:
    """Targets renamed where two share a name (two model.gguf from different folders):
    each then keeps its own results as `name (folder)`."""
    seen = Counter(target.name for target in found)
    out = []
    for target in found:
        if seen[target.name] > 1:
            folder = target.path.parent if target.path.is_file() else target.path
            target = dataclasses.replace(target, name=f"{target.name} ({folder})")
        out.append(target)
    return out


def shown_path(path: Path, out: Path) -> str:
    """Where a benched model is, as results.json records it: from the bench folder where it
    lies beside it (a release's artifacts), else by its name alone; never the machine's own
    folders."""
    rel = os.path.relpath(Path(path).resolve(), Path(out).resolve().parent)
    return os.path.join("..", rel) if not rel.startswith("..") else Path(path).name


def _targets(artifacts: list[Path], reference: Path | None, settings: BenchSettings,
             rehearsal: bool) -> list[Target]:
    """What a bench measures, the reference first, each checked before any work: a quality
    run has a real reference, nothing is corrupt, no context is past a model's training."""
    if settings.quality and reference is None:
        raise SettingsError("quality needs --reference (the bf16 model); pass one, or bench "
                            "speed alone with --no-quality")
    if settings.quality and model_info(reference).synthetic and not rehearsal:
        raise SettingsError(f"'{reference}' has synthetic weights: perplexity and KLD would "
                            "mean nothing; bench speed with --no-quality, or use a real checkpoint")
    found: list[Target] = []
    if reference is not None:
        ref = targets(reference)[0]
        found.append(Target(REFERENCE, ref.path, "torch", "bf16", ref.size_bytes, "bf16",
                            ref.files))
    for artifact in artifacts:
        found += targets(artifact)
    found = unique_names(found)
    for target in found:  # nothing corrupt is measured
        verify(target, settings.verify)
    longest = max(int(c) for c in settings.ctx)
    for target in found:  # and no context past what a model was trained for
        trained = stated_context(target)
        if longest > trained:
            raise SettingsError(f"--ctx {longest:,} is past the {trained:,} tokens "
                                f"'{target.name}' was trained for; pass a smaller --ctx")
    return found


def _entry(results: dict, target: Target, keys: dict, engine_facts: dict, out: Path) -> dict:
    """``target``'s row of results.json, with the parts measured under other keys (another
    engine, machine, text or setting) dropped so that they are measured anew."""
    entry = results["targets"].get(target.name, {})
    for part in ("quality", "speed"):
        if entry.get(f"{part}_key") != keys[f"{part}_key"] and part in entry:
            logger.info("%s: what its %s depends on changed; measuring it anew",
                        target.name, part)
            del entry[part]
            # the llama.cpp peer checks time and score too
            entry.pop("peers", None)
            entry.pop("tokenizer_agreement", None)
    results["targets"][target.name] = entry
    entry.update({**keys, "path": shown_path(target.path, out), "backend": target.backend,
                  "format": target.fmt, "kind": target.kind, "size_bytes": target.size_bytes,
                  "engine": engine_facts})
    return entry


def run_bench(artifacts: list[Path], reference: Path | None, settings: BenchSettings,
              out: Path, *, cache_dir: Path, data_dir: Path | None = None,
              progress: bool = False, reference_dir: Path | None = None,
              rehearsal: bool = False) -> Path:
    """Measure everything, resuming from ``out/results.json``; write the report. Returns out.

    ``reference`` (the bf16 checkpoint) is needed for quality only: a speed-only run
    (``settings.quality`` False) may pass None. ``reference_dir``: reference distributions
    shared with a release (else computed into scratch space); ``rehearsal``: a synthetic
    reference is scored anyway, for time and memory only.
    """
    all_targets = _targets(artifacts, reference, settings, rehearsal)
    ref_target = all_targets[0] if reference is not None else None
    device = pick_device(settings.device)
    texts = texts_for(settings, cache_dir, data_dir)
    wins, bytes_per_token = quality_windows(reference, texts, settings)
    out.mkdir(parents=True, exist_ok=True)  # only now: an up-front error leaves nothing
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results.get("schema_version") != SCHEMA_VERSION:
        results = {}
    results.update({"schema_version": SCHEMA_VERSION, "machine": machine(), "device": device,
                    "reference": Path(reference).name if reference else None,
                    # the plan's shape (kvant plan --bench), without the reference's folder
                    "reference_config": read_config(reference) if reference else None,
                    "settings": {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in settings.__dict__.items()}})
    results.setdefault("targets", {})

    speed_ids = ([i for w in wins[next(iter(wins))] for i in w] if wins
                 else list(range(16, 16 + settings.quality_ctx)))
    max_ctx = max(int(c) for c in settings.ctx)
    speed_ids = (speed_ids * (max_ctx // max(len(speed_ids), 1) + 1))[:max_ctx]

    # the reference's identity, once: without a manifest it means hashing the checkpoint
    ref_digest = ref_target.digest() if ref_target else None
    where = machine_identity(results["machine"], device)
    engines: dict[str, dict] = {}
    scratch = tempfile.TemporaryDirectory(prefix=".reference-", dir=out)
    ref = None  # computed on first need, into scratch (removed when the run ends)
    try:
        for target in tqdm(all_targets, desc="bench", disable=not progress):
            digest = ref_digest if target is ref_target else target.digest()
            if target.backend not in engines:
                engines[target.backend] = engine(target.backend)
            keys = {"quality_key": quality_key(digest, ref_digest, texts, settings,
                                               engines[target.backend], where),
                    "speed_key": speed_key(digest, settings, engines[target.backend], where)}
            entry = _entry(results, target, keys, engines[target.backend], out)
            if settings.quality and "quality" not in entry:
                if ref is None:
                    ref = pipeline_reference(reference, wins, reference_dir,
                                             Path(scratch.name), settings.quality_ctx, device)
                with step(f"bench quality {target.name}", kind=target.kind,
                          ctx=settings.quality_ctx, weights=target.size_bytes,
                          tokens_per_language=language_tokens(wins)):
                    entry["quality"] = quality(target, wins, ref, bytes_per_token,
                                               pick_device(settings.device, target.backend),
                                               settings.threads)
                _save(out, results)
            entry.setdefault("speed", {})
            for ctx in settings.ctx:
                if ctx not in entry["speed"] or "error" in entry["speed"][ctx]:
                    with step(f"bench speed {target.name} @{ctx}", kind=target.kind,
                              ctx=int(ctx), weights=target.size_bytes, worker=True):
                        entry["speed"][ctx] = speed(target, speed_ids, int(ctx), settings,
                                                    pick_device(settings.device,
                                                                target.backend))
                    _save(out, results)
            if target.fmt == "gguf":
                _gguf_extras(target, entry, texts, settings, device, out, results)
    finally:
        scratch.cleanup()
    benched = {t.name for t in all_targets}
    stale = [n for n in results["targets"] if n not in benched]
    if stale:  # the report, the plan's fit and a release's upload read every row
        logger.info("results.json: dropping %d row(s) of models not benched now (%s)",
                    len(stale), ", ".join(stale))
        for name in stale:
            del results["targets"][name]
        _save(out, results)
    write_report(results, out)
    return out


def _gguf_extras(target: Target, entry: dict, texts: dict, settings: BenchSettings,
                 device: str, out: Path, results: dict) -> None:
    """Tokenizer agreement from the GGUF manifest, and the llama.cpp peer checks."""
    manifest = target.path.parent / "manifest.json"
    if manifest.is_file() and "tokenizer_agreement" not in entry:
        tok = json.loads(manifest.read_text())["validation"].get("tokenizer", {})
        entry["tokenizer_agreement"] = tok.get("stock_llama_cpp", {})
    if not settings.peer_checks or "peers" in entry:
        return
    from kvant.bench import peers  # llama.cpp's tools: only for GGUF (an optional extra)
    from kvant.runtimes.llamacpp import native_exact

    ctx0 = int(settings.ctx[0])
    entry["peers"] = {"llama_bench": peers.llama_bench(target.path, ctx0, settings.n_new,
                                                       device, settings.threads,
                                                       settings.repeats, settings.repack)}
    if texts:  # perplexity needs text (not in a speed-only run)
        lang, text = next(iter(texts.items()))
        n_ctx = settings.quality_ctx
        tool_ppl, chunks = peers.llama_perplexity(target.path, text.path, n_ctx, 8,
                                                  settings.threads, settings.repack)
        # with the patch, llama-perplexity reads the raw text with NorMistral's own tokenizer:
        # Kvant's side then scores the HF ids, and the two agree only if the tokens do
        exact = native_exact(target.path)
        kvant_ppl = peers.kvant_perplexity_llama_protocol(target.path, text.read(), n_ctx,
                                                          chunks, settings.threads, exact,
                                                          settings.repack)
        entry["peers"]["perplexity"] = {
            "text": lang, "n_ctx": n_ctx, "chunks": chunks, "repack": settings.repack,
            "kvant": kvant_ppl,
            "tokens": "exact (llama.cpp with Kvant's patch)" if exact else "llama.cpp's stock",
            "llama_perplexity": tool_ppl,
            "relative_diff_pct": round(100 * abs(kvant_ppl / tool_ppl - 1), 4)}
    _save(out, results)
