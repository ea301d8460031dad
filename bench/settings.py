"""`kvant bench` settings: a light module, so the CLI builds its flags without engines."""

from __future__ import annotations

from dataclasses import dataclass

from kvant.data import EVAL_SETS
from kvant.errors import SettingsError
from kvant.plan.kv import KV_TYPES
from kvant.registry import unknown_key_message


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
    """Timed runs per speed phase (at least; short runs repeat until half a second)."""
    quality_ctx: int = 512
    """Tokens per scored window of the quality rows."""
    quality_tokens: int = 4096
    """Held-out tokens scored per language."""
    quality: bool = True
    """Score perplexity drift (off for synthetic checkpoints: speed and memory only)."""
    peer_checks: bool = True
    """GGUF: compare perplexity with llama-perplexity and speed with llama-bench."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when torch sees a GPU, else cpu)."""
    threads: int = 0
    """CPU threads (0: every core)."""
    max_attempts: int = 3
    """A speed row measured while other programs used the CPU, or whose repeats spread
    widely, is measured again, up to this many times in all; if it stays noisy it is kept
    with `noisy: true` and flagged in the report and cards."""
    max_other_cpu_pct: float = 10.0
    """Other programs' CPU use (percent of the machine) above which a row is noisy."""
    max_spread_pct: float = 25.0
    """(max - min) / median of the repeats above which a row is noisy."""
    repack: bool = False
    """llama.cpp: repack weights for its CPU kernels (llama.cpp's own default). Off: no second
    copy of the weights in memory; on a 2-core EPYC at NorMistral's width prefill was 1.85x
    faster without it and decode 5% slower. llama-bench runs with the same choice."""
    kv_type: str = "f16"
    """KV cache precision of the speed rows (kvant.plan.KV_CACHES): llama.cpp's f16, q8_0
    (about half the memory) or q4_0; transformers' fp8 or int4. A backend without the type
    keeps its own cache (f16), and the row says which it ran."""
    depth_ctx: int = 8192
    """A release's depth study (kvant.bench.depth): held-out tokens per language on which
    each long-context pick and its KV cache type are scored by position (0: none)."""
    verify: bool = True
    """Check every artifact's files against its manifest's sha256 before measuring (sizes are
    always checked); --no-verify skips the hashing."""

    def __post_init__(self) -> None:
        try:
            ctxs = [int(c) for c in self.ctx]
        except ValueError:
            raise SettingsError(f"--ctx {','.join(self.ctx)}: give token counts") from None
        if self.depth_ctx < 0:
            raise SettingsError(f"depth_ctx {self.depth_ctx}: give a token count, or 0")
        if min(ctxs) < 2 or min(self.n_new, self.repeats, self.quality_ctx,
                                 self.quality_tokens, self.max_attempts) < 1:
            raise SettingsError("context lengths and counts must be positive")
        if self.quality_tokens < self.quality_ctx:
            raise SettingsError("--quality-tokens must be at least --quality-ctx")
        if self.kv_type not in KV_TYPES:
            raise SettingsError(unknown_key_message("KV cache type", self.kv_type, KV_TYPES))
        if self.max_other_cpu_pct <= 0 or self.max_spread_pct <= 0:
            raise SettingsError("--max-other-cpu-pct and --max-spread-pct must be positive")

    def measurement_key(self) -> dict:
        """The settings a speed or quality number depends on (results are keyed by them)."""
        return {"quality": [list(self.langs), self.quality_ctx, self.quality_tokens],
                "speed": [self.n_new, self.repeats, self.threads, self.repack, self.kv_type]}
