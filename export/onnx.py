"""`kvant export onnx`: ONNX Runtime (GenAI) models with KV cache, fp32 / fp16 / int4.

Through onnxruntime-genai's model builder (called through its Python API; its `--help`
crashes in 0.18.0): MatMulNBits int4 with KV cache and the genai_config.json that ONNX
Runtime GenAI apps (Windows/DirectML, mobile, CPU) load. Not optimum-onnx: 0.1.0 pins
transformers < 4.58, which cannot live beside GPTQModel.

Tokenizer: onnxruntime-extensions ignores NorMistral's normalizer and runs `.{1,24}` in
std::regex over UTF-8 bytes, where a cut inside a multi-byte character makes `encode` crash.
The artifact's `tokenizer.json` (what GenAI apps read) uses a split that never cuts inside a
character; `tokenizer.normistral.json` is the exact HF tokenizer, which Kvant's own ONNX
paths use (they feed HF ids; og.Tokenizer also leaves out <s>).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvant.data import EvalSettings
from kvant.errors import KvantError, SettingsError
from kvant.registry import unknown_key_message

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int4")
PROVIDERS = ("cpu", "cuda", "dml")
OG_SPLIT = r"[\s\S]{1,24}(?![\x80-\xBF])"  # 24 bytes, never ending inside a UTF-8 character
EXACT_TOKENIZER = "tokenizer.normistral.json"


@dataclass(frozen=True)
class ONNXSettings(EvalSettings):
    """ONNX export settings; stored in the manifest."""

    precision: str = "int4"
    provider: str = "cpu"
    """Execution provider the model is built for: cpu, cuda or dml (DirectML)."""
    block_size: int = 32
    """int4: weights per scale (MatMulNBits block); 32 is more accurate, 128 smaller."""
    accuracy_level: int = 4
    """int4 on CPU: MatMulNBits compute type (0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precision not in PRECISIONS:
            raise SettingsError(unknown_key_message("precision", self.precision, PRECISIONS))
        if self.provider not in PROVIDERS:
            raise SettingsError(unknown_key_message("provider", self.provider, PROVIDERS))
        if self.precision == "fp16" and self.provider == "cpu":
            raise SettingsError("fp16 is built for --provider cuda or dml (ONNX Runtime's CPU "
                                "path is fp32 or int4); on a CPU use fp32 or int4")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise SettingsError(f"--block-size {self.block_size}: use 16, 32, 64, 128 or 256")
        if self.accuracy_level not in range(5):
            raise SettingsError(f"--accuracy-level {self.accuracy_level}: use 0 to 4")


_BUILD = """
import sys
from onnxruntime_genai.models.builder import create_model, parse_extra_options
model, out, precision, provider, cache = sys.argv[1:6]
opts = parse_extra_options(model, model, out, precision, provider, cache, sys.argv[6:])
create_model(model, model, out, precision, provider, cache, **opts)
from kvant.memory import peak_rss_mib
print("KVANT_PEAK_RSS_MIB", peak_rss_mib())
"""


def build(model_dir: Path, out_dir: Path, settings: ONNXSettings) -> dict:
    """Run the GenAI model builder in a child process; return its time and peak RSS.

    A child process, so that its peak memory is its own (the builder loads the whole
    checkpoint through transformers; the child reports its VmHWM, see kvant.memory) and its
    prints stay out of ours.
    """
    extra = [] if settings.precision != "int4" else [
        f"block_size={settings.block_size}", f"accuracy_level={settings.accuracy_level}"]
    with tempfile.TemporaryDirectory(prefix="kvant-onnx-") as cache, \
            tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _BUILD, str(model_dir), str(out_dir),
                                 settings.precision, settings.provider, cache, *extra],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        proc.wait()
        log.seek(0)
        text = log.read()
        if proc.returncode:
            tail = " | ".join(text.strip().splitlines()[-3:])
            raise KvantError(f"the ONNX Runtime GenAI builder failed: {tail}")
    peak = re.findall(r"KVANT_PEAK_RSS_MIB ([0-9.]+)", text)
    return {"build_seconds": round(time.perf_counter() - started, 1),
            "builder_peak_rss_mib": float(peak[-1]) if peak else None}


def og_tokenizer_json(exact: dict) -> dict:
    """The most faithful tokenizer.json onnxruntime-extensions can run without crashing."""
    spec = json.loads(json.dumps(exact))
    for step in spec["pre_tokenizer"]["pretokenizers"]:
        if step["type"] == "Split" and step["pattern"].get("Regex") == ".{1,24}":
            step["pattern"] = {"Regex": OG_SPLIT}
    return spec


def ort_session(model_dir: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_dir / "model.onnx"), options,
                                providers=["CPUExecutionProvider"])


def ort_logits(session, wins: list[list[int]], kv_shape: tuple[int, int]) -> list[np.ndarray]:
    """Plain onnxruntime (no GenAI): each window from an empty KV cache. (len, vocab) each.

    ``kv_shape``: (num_key_value_heads, head_size), from genai_config.json.
    """
    out = []
    for win in wins:
        feeds = {}
        for inp in session.get_inputs():
            if inp.name == "input_ids":
                feeds[inp.name] = np.array([win], dtype=np.int64)
            elif inp.name == "attention_mask":
                feeds[inp.name] = np.ones((1, len(win)), dtype=np.int64)
            else:  # past_key_values.N.key/value: (batch, kv_heads, 0, head_dim)
                dtype = np.float16 if "float16" in inp.type else np.float32
                feeds[inp.name] = np.zeros((1, kv_shape[0], 0, kv_shape[1]), dtype=dtype)
        out.append(session.run(["logits"], feeds)[0][0].astype(np.float32))
    return out


def og_model(model_dir: Path):
    """An onnxruntime-genai model on the CPU, whatever provider it was built for."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()
    return og.Model(config)


def og_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt_ids, dtype=np.int32))
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def og_fidelity(model, exact_tokenizer, units: list[str]) -> dict:
    """What og.Tokenizer gives on raw text against the HF ids (without <s>, which og
    leaves out): identical units, token-weighted aligned agreement, crashes."""
    import onnxruntime_genai as og

    from kvant.export.gguf_tokenizer import aligned_matches

    tok = og.Tokenizer(model)
    identical = crashes = matched = total = 0
    for unit in units:
        exact = exact_tokenizer.encode(unit).ids[1:]
        try:
            got = [int(i) for i in tok.encode(unit)]
        except RuntimeError:
            crashes += 1
            continue
        identical += got == exact
        m, n = aligned_matches(exact, got)
        matched, total = matched + m, total + n
    return {"units": len(units), "og_identical_pct": round(100 * identical / len(units), 2),
            "og_aligned_pct": round(100 * matched / max(total, 1), 3), "og_crashes": crashes}


def _card(name: str, settings: ONNXSettings, validation: dict) -> str:
    from kvant.scoring import drift_table

    fid_rows = ["| language | paragraphs | identical | aligned agreement | crashes |",
                "|---|---|---|---|---|"]
    for lang, f in validation["og_tokenizer"].items():
        fid_rows.append(f"| {lang} | {f['units']} | {f['og_identical_pct']:.1f}% | "
                        f"{f['og_aligned_pct']:.2f}% | {f['og_crashes']} |")
    block = (f", MatMulNBits block {settings.block_size}, accuracy level "
             f"{settings.accuracy_level}" if settings.precision == "int4" else "")
    return f"""ONNX Runtime GenAI model of `{name}`: {settings.precision} for the
`{settings.provider}` execution provider{block}, with KV cache (`genai_config.json`).

Scored with plain onnxruntime on the HF tokenizer's ids against the transformers model
(float32); max |Δlogit| {validation['max_abs_logit_diff']:.5f}; greedy generation of
{validation['greedy_tokens']} tokens through onnxruntime-genai matched transformers on
{validation['greedy_match_pct']:.0f}% of tokens.

{drift_table(validation)}

## Tokenization

Feed token ids from `{EXACT_TOKENIZER}` (the exact NorMistral tokenizer) and prepend `<s>`
(id 1). `tokenizer.json` is for ONNX Runtime GenAI apps: onnxruntime-extensions ignores
NorMistral's normalizer (prepended space, NFKC, newline rule), so its ids differ; its chunk
split is rewritten so that it never cuts inside a character (the original crashes `encode`
on some words). What `og.Tokenizer` gives on raw held-out text, against the exact ids:

{chr(10).join(fid_rows)}
"""


def run(model_dir: Path, out: Path, settings: ONNXSettings, *, source: dict, cache_dir: Path,
        data_dir: Path | None = None, force: bool = False) -> Path:
    """`kvant export onnx`: build, rewrite the tokenizer, validate, publish ``out``."""
    from tokenizers import Tokenizer

    from kvant.artifact import ArtifactWriter, refuse_existing, settings_dict
    from kvant.data import paragraphs
    from kvant.model import refuse_quantized
    from kvant.scoring import drift_per_language, reference

    refuse_existing(out, force)
    refuse_quantized(model_dir)
    texts, wins, ref = reference(model_dir, settings.eval_langs, settings.eval_tokens,
                                 settings.eval_ctx, cache_dir, data_dir)
    exact = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    with ArtifactWriter(out, fmt="onnx", force=force) as art:
        facts = build(model_dir, art.dir, settings)
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        (art.dir / EXACT_TOKENIZER).write_text(json.dumps(spec, ensure_ascii=False),
                                               encoding="utf-8")
        (art.dir / "tokenizer.json").write_text(
            json.dumps(og_tokenizer_json(spec), ensure_ascii=False), encoding="utf-8")
        session = ort_session(art.dir)
        decoder = json.loads((art.dir / "genai_config.json").read_text())["model"]["decoder"]
        kv_shape = (decoder["num_key_value_heads"], decoder["head_size"])
        logits = {lang: ort_logits(session, w, kv_shape) for lang, w in wins.items()}
        del session
        diffs = [float(np.abs(a - b).max()) for lang in wins
                 for a, b in zip(ref[lang], logits[lang], strict=True)]
        model = og_model(art.dir)
        prompt = wins[settings.eval_langs[0]][0][:32]
        greedy = og_greedy(model, prompt, 16)
        hf_greedy = _hf_greedy(model_dir, prompt, 16)
        same = sum(a == b for a, b in zip(greedy, hf_greedy, strict=False))
        art.validation = {
            "reference": "transformers, float32", "runtime": "onnxruntime (CPU)", **facts,
            "max_abs_logit_diff": round(max(diffs), 6), "greedy_tokens": len(hf_greedy),
            "greedy_match_pct": round(100 * same / len(hf_greedy), 1),
            "greedy_identical": greedy == hf_greedy,
            **drift_per_language(ref, logits, wins),
            "og_tokenizer": {lang: og_fidelity(model, exact, paragraphs(t.read()))
                             for lang, t in texts.items()}}
        del model
        art.source, art.settings = source, settings_dict(settings)
        art.data = [t.as_manifest() for t in texts.values()]
        art.tags = ["onnx", "onnxruntime-genai", settings.precision]
        name = Path(source.get("id", model_dir.name)).name
        art.title = f"{name} ONNX {settings.precision} ({settings.provider})"
        art.card_body = _card(name, settings, art.validation)
    return out


def _hf_greedy(model_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()
