"""Real size without the download: synthetic NorMistral-11b-long checkpoints through the GGUF
pipeline, each step in a fresh process with its wall time and peak RSS, side by side with
llama.cpp's own converter.

    python -m kvant.bench.studies.real_size --layers 4 --work /big/tmp --out res/  # CI-sized
    python -m kvant.bench.studies.real_size --layers 40 --work /big/tmp --out res/  # full
    python -m kvant.bench.studies.real_size --layers 4,8 --llama-cpp-src vendor/llama.cpp ...  # vs

llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist, run, never copied) rejects
NorMistral-style tokenizers by hash; the harness tells it the pre-tokenizer is `tekken` so
that its tensor path, the part being timed, runs unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kvant.bench.peers import llama_bench
from kvant.bench.run import speed
from kvant.bench.settings import BenchSettings
from kvant.machine import machine
from kvant.runtimes.llamacpp import llama_tool
from kvant.runtimes.targets import targets

_LLAMA_CONVERT = """
import sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "tekken"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", sys.argv[2], "--outtype", "bf16", "--outfile", sys.argv[3]]
convert_hf_to_gguf.main()
"""
_KVANT_CONVERT = """
import sys
from pathlib import Path
from kvant.export.gguf_convert import convert
convert(Path(sys.argv[1]), Path(sys.argv[2]), "bf16")
"""


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` in a fresh process: wall seconds and that process tree's peak RSS."""
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                                text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status):
            log.seek(0)
            raise RuntimeError(f"{cmd[:3]} failed: {log.read()[-1500:]}")
    return {"wall_s": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def copy_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best of ``repeats`` copies of an ``n_bytes`` array, in GB/s moved (read + write)."""
    src = np.ones(n_bytes // 8)
    dst = np.empty_like(src)
    best = min(_timed_copy(src, dst) for _ in range(repeats))
    return 2 * n_bytes / best / 1e9


def _timed_copy(src, dst) -> float:
    started = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - started


def side_by_side(gguf: Path, ctx: int = 512, n_new: int = 32, repeats: int = 3) -> dict:
    """`kvant bench`'s speed row and llama-bench on the same file, threads and depth, with
    llama.cpp's CPU weight repacking off and on, and the bandwidth roofline for decode."""
    target = targets(gguf)[0]
    ids = list(range(16, 16 + ctx))
    bandwidth = copy_bandwidth()
    out = {"copy_bandwidth_gb_s": round(bandwidth, 1),
           "roofline_decode_tok_s": round(bandwidth * 1e9 / target.size_bytes, 2)}
    for repack in (False, True):
        settings = BenchSettings(ctx=(str(ctx),), n_new=n_new, repeats=repeats, repack=repack)
        row = speed(target, ids, ctx, settings, "cpu")
        peer = llama_bench(gguf, ctx, n_new, "cpu", settings.threads, repeats, repack)
        out["repack" if repack else "no_repack"] = {
            "kvant": row, "llama_bench": peer,
            "prefill_ratio": round(row["prefill_tok_s"] / peer["prefill_tok_s"], 3),
            "decode_ratio": round(row["decode_tok_s"] / peer["decode_tok_s"], 3),
            "decode_share_of_roofline": round(row["decode_tok_s"]
                                              / out["roofline_decode_tok_s"], 3)}
    return out


def run(layers: int, work: Path, train_text: str, llama_src: Path | None, decode: bool) -> dict:
    kvant = [sys.executable, "-m", "kvant.app.cli", "--no-progress"]
    synth = work / f"synth-{layers}"
    result = {"layers": layers}
    if not synth.exists():
        result["synth"] = timed([*kvant, "synth", "--layers", layers, "--out", synth,
                                 "--train-text", train_text])
    bf16 = work / f"kvant-{layers}-BF16.gguf"
    result["kvant_convert_bf16"] = timed([sys.executable, "-c", _KVANT_CONVERT, synth, bf16])
    result["bf16_gib"] = round(bf16.stat().st_size / 2**30, 3)
    if llama_src is not None:
        other = work / f"llamacpp-{layers}-BF16.gguf"
        result["llama_cpp_convert_bf16"] = timed([sys.executable, "-c", _LLAMA_CONVERT,
                                                  llama_src, synth, other])
        other.unlink()
        result["kvant_convert_bf16_again"] = timed([sys.executable, "-c", _KVANT_CONVERT,
                                                    synth, bf16])
        result["time_ratio_kvant_over_llama_cpp"] = round(
            result["kvant_convert_bf16_again"]["wall_s"]
            / result["llama_cpp_convert_bf16"]["wall_s"], 3)
    q4 = work / f"kvant-{layers}-Q4_K_M.gguf"
    result["llama_quantize_q4_k_m"] = timed([llama_tool("llama-quantize"), bf16, q4, "Q4_K_M",
                                             os.cpu_count()])
    result["q4_k_m_gib"] = round(q4.stat().st_size / 2**30, 3)
    bf16.unlink()
    if decode:
        result["speed"] = side_by_side(q4)
    q4.unlink()
    shutil.rmtree(synth) if layers > 8 else None  # small ones are kept for reruns
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvant.bench.studies.real_size")
    parser.add_argument("--layers", default="4", help="comma-separated layer counts")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (big disk)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-text", default="nob-train,nno-train")
    parser.add_argument("--llama-cpp-src", type=Path,
                        help="vendor/llama.cpp of the llama-cpp-python sdist, for side by side")
    parser.add_argument("--no-decode", action="store_true")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "runs": []}
    for layers in (int(n) for n in args.layers.split(",")):
        results["runs"].append(run(layers, args.work, args.train_text, args.llama_cpp_src,
                                   not args.no_decode))
        (args.out / "real_size.json").write_text(json.dumps(results, indent=2) + "\n")
        sys.stdout.write(json.dumps(results["runs"][-1]) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
