"""`kvant bench`: speed, memory and perplexity drift of every artifact against the reference.

Quality runs in this process: every backend scores the same HF token ids in the same windows
(non-overlapping, `quality_ctx` long). Reference distributions are recomputed each run with
transformers in float32 and held in memory one language at a time (51,200 x tokens floats on
the real model: 0.4 GB per 2,048 tokens), not stored. Speed and memory run in a fresh process
per (target, context length). results.json is rewritten after every measurement, and a rerun
skips what it already holds.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvant.bench.backends import Target, load, targets
from kvant.data import EVAL_SETS, get_text, paragraphs
from kvant.errors import SettingsError

logger = logging.getLogger(__name__)
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BenchSettings:
    """What `kvant bench` measures; stored in results.json."""

    langs: tuple[str, ...] = EVAL_SETS
    """Text set names or paths of UTF-8 files (scored under the file name)."""
    ctx: tuple[str, ...] = ("512", "2048", "8192")
    """Context lengths for prefill, decode depth and memory."""
    n_new: int = 32
    """Tokens generated per decode measurement."""
    repeats: int = 3
    quality_ctx: int = 512
    quality_tokens: int = 4096
    """Held-out tokens scored per language."""
    quality: bool = True
    """Score perplexity drift (off for synthetic checkpoints: speed and memory only)."""
    peer_checks: bool = True
    """GGUF: compare perplexity with llama-perplexity and speed with llama-bench."""
    device: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        try:
            ctxs = [int(c) for c in self.ctx]
        except ValueError:
            raise SettingsError(f"--ctx {','.join(self.ctx)}: give token counts") from None
        if min(ctxs) < 2 or min(self.n_new, self.repeats, self.quality_ctx,
                                 self.quality_tokens) < 1:
            raise SettingsError("context lengths and counts must be positive")
        if self.quality_tokens < self.quality_ctx:
            raise SettingsError("--quality-tokens must be at least --quality-ctx")


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or "?",
            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split()[1]
        info["ram_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def _texts(langs, cache_dir, data_dir):
    return {Path(lang).name if ("/" in lang or lang.endswith(".txt")) else lang:
            get_text(lang, cache_dir, data_dir) for lang in langs}


def _quality_ids(tokenizer, text: str, n_tokens: int) -> tuple[list[int], int]:
    """Whole paragraphs until n_tokens: (their ids concatenated, their UTF-8 bytes)."""
    ids, n_bytes = [], 0
    for unit in paragraphs(text):
        ids += tokenizer.encode(unit).ids
        n_bytes += len(unit.encode("utf-8")) + 1  # +1: the separator between paragraphs
        if len(ids) >= n_tokens:
            break
    return ids, n_bytes


def quality(target: Target, wins: dict, ref: dict, bytes_per_token: dict, device: str,
            threads: int, n_ctx: int) -> dict:
    """Per language: drift against the reference plus bits per byte."""
    import math

    from kvant.scoring import drift

    backend = load(target, device, threads, n_ctx=n_ctx + 8)
    out = {}
    for lang, lang_wins in wins.items():
        logits = [backend.logits(w) for w in lang_wins]
        d = drift(ref[lang], logits, lang_wins).as_dict()
        # bits/byte: mean bits per scored token x tokens per byte of the text they came from
        d["bits_per_byte"] = round(math.log2(d["ppl"]) / bytes_per_token[lang], 4)
        d["bits_per_byte_ref"] = round(math.log2(d["ppl_ref"]) / bytes_per_token[lang], 4)
        out[lang] = d
    if hasattr(backend, "close"):
        backend.close()
    return out


def speed(target: Target, ids: list[int], ctx: int, settings: BenchSettings,
          device: str) -> dict:
    """One fresh-process measurement (see kvant.bench.worker)."""
    spec = {"target": {**target.__dict__, "path": str(target.path)}, "ids": ids, "ctx": ctx,
            "n_new": settings.n_new, "repeats": settings.repeats, "device": device,
            "threads": settings.threads}
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, result_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "kvant.bench.worker", str(spec_file),
                               str(result_file)], capture_output=True, text=True)
        if proc.returncode:
            tail = " | ".join(proc.stderr.strip().splitlines()[-2:])
            return {"error": f"worker failed: {tail}"}
        return json.loads(result_file.read_text())


def _save(out: Path, results: dict) -> None:
    tmp = out / "results.json.part"
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / "results.json")


def run_bench(artifacts: list[Path], reference: Path, settings: BenchSettings, out: Path, *,
              cache_dir: Path, data_dir: Path | None = None, progress: bool = False) -> Path:
    """Measure everything, resuming from ``out/results.json``; write the report. Returns out."""
    from tokenizers import Tokenizer
    from tqdm.auto import tqdm

    from kvant.bench.report import write_report
    from kvant.model import model_info, pick_device
    from kvant.scoring import hf_logits, windows

    if settings.quality and model_info(reference).synthetic:
        raise SettingsError(f"'{reference}' has synthetic weights: perplexity and KLD would "
                            "mean nothing; bench speed with --no-quality, or use a real checkpoint")
    device = pick_device(settings.device)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.update({"schema_version": SCHEMA_VERSION, "machine": machine(), "device": device,
                    "reference": str(reference),
                    "settings": {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in settings.__dict__.items()}})
    results.setdefault("targets", {})

    all_targets = [Target("reference-bf16", reference, "torch", "bf16",
                          targets(reference)[0].size_bytes)]
    for artifact in artifacts:
        all_targets += targets(artifact)
    tokenizer = Tokenizer.from_file(str(reference / "tokenizer.json"))
    texts = _texts(settings.langs, cache_dir, data_dir)
    wins, bytes_per_token, ref = {}, {}, {}
    for lang, text in texts.items():
        ids, n_bytes = _quality_ids(tokenizer, text.read(), settings.quality_tokens)
        wins[lang] = windows(ids[: settings.quality_tokens], settings.quality_ctx)
        bytes_per_token[lang] = n_bytes / len(ids)
    speed_ids = [i for w in wins[next(iter(wins))] for i in w]
    max_ctx = max(int(c) for c in settings.ctx)
    speed_ids = (speed_ids * (max_ctx // max(len(speed_ids), 1) + 1))[:max_ctx]

    for target in tqdm(all_targets, desc="bench", disable=not progress):
        entry = results["targets"].setdefault(target.name, {})
        entry.update({"path": str(target.path), "backend": target.backend,
                      "format": target.fmt, "size_bytes": target.size_bytes})
        if settings.quality and "quality" not in entry:
            if not ref:
                ref = {lang: hf_logits(reference, w) for lang, w in wins.items()}
            entry["quality"] = quality(target, wins, ref, bytes_per_token, device,
                                       settings.threads, settings.quality_ctx)
            _save(out, results)
        entry.setdefault("speed", {})
        for ctx in settings.ctx:
            if ctx not in entry["speed"] or "error" in entry["speed"][ctx]:
                entry["speed"][ctx] = speed(target, speed_ids, int(ctx), settings, device)
                _save(out, results)
        if target.fmt == "gguf" and settings.quality:
            _gguf_extras(target, entry, texts, settings, out, results)
    write_report(results, out)
    return out


def _gguf_extras(target: Target, entry: dict, texts: dict, settings: BenchSettings, out: Path,
                 results: dict) -> None:
    """Tokenizer agreement from the GGUF manifest, and the llama.cpp peer checks."""
    from kvant.bench import peers

    manifest = target.path.parent / "manifest.json"
    if manifest.is_file() and "tokenizer_agreement" not in entry:
        tok = json.loads(manifest.read_text())["validation"].get("tokenizer", {})
        entry["tokenizer_agreement"] = tok.get("stock_llama_cpp", {})
    if not settings.peer_checks or "peers" in entry:
        return
    lang, text = next(iter(texts.items()))
    n_ctx = settings.quality_ctx
    chunks = 8
    tool_ppl, chunks = peers.llama_perplexity(target.path, text.path, n_ctx, chunks,
                                              settings.threads)
    kvant_ppl = peers.kvant_perplexity_llama_protocol(target.path, text.read(), n_ctx, chunks,
                                                      settings.threads)
    ctx0 = int(settings.ctx[0])
    entry["peers"] = {
        "perplexity": {"text": lang, "n_ctx": n_ctx, "chunks": chunks, "kvant": kvant_ppl,
                       "llama_perplexity": tool_ppl,
                       "relative_diff_pct": round(100 * abs(kvant_ppl / tool_ppl - 1), 4)},
        "llama_bench": {"n_prompt": ctx0, "n_gen": settings.n_new,
                        **peers.llama_bench(target.path, ctx0, settings.n_new,
                                            settings.threads, settings.repeats)},
    }
    _save(out, results)
