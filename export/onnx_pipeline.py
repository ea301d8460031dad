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
import re
import tempfile
from pathlib import Path

from tokenizers import Tokenizer

from kvant.artifact import (
    ArtifactWriter,
    PipelineOutput,
    check_free_space,
    check_input,
    settings_dict,
)
from kvant.data import paragraphs
from kvant.errors import SettingsError
from kvant.export.onnx import ONNXSettings
from kvant.files import sha256_file
from kvant.machine import PEAK_REPORT, run_python
from kvant.model import (
    read_config,
    refuse_sliding_window,
    trained_context,
    weight_files,
)
from kvant.plan.peaks import disk_need
from kvant.recorder import REHEARSAL_WARNING, language_tokens, step
from kvant.runtimes.onnx import GenaiRuntime, OrtRuntime
from kvant.runtimes.reference import pipeline_reference, score_against
from kvant.runtimes.targets import Target
from kvant.scoring import drift_table, held_out
from kvant.tokenization import ONNX_EXACT_TOKENIZER, fidelity

OG_SPLIT = r"[\s\S]{1,24}(?![\x80-\xBF])"  # 24 bytes, never ending inside a UTF-8 character
EXACT_TOKENIZER = ONNX_EXACT_TOKENIZER

_BUILD = """
import sys
from onnxruntime_genai.models.builder import create_model, parse_extra_options
if "--lean" in sys.argv:
    sys.argv.remove("--lean")
    from kvant.export.onnx_builder import lean_prequantized
    lean_prequantized()
model, out, precision, provider, cache = sys.argv[1:6]
opts = parse_extra_options(model, model, out, precision, provider, cache, sys.argv[6:])
create_model(model, model, out, precision, provider, cache, **opts)
""" + PEAK_REPORT


def with_context(model_dir: Path, context: int, scratch: Path) -> Path:
    """``model_dir`` as the builder should see it: when config.json states another context
    than the trained one, a folder in scratch whose config.json says ``context`` and whose
    other files link to the originals (no weight is copied)."""
    config = read_config(model_dir)
    if int(config.get("max_position_embeddings") or 0) == context:
        return model_dir
    view = scratch / "model"
    view.mkdir()
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (view / item.name).symlink_to(item.resolve())
    (view / "config.json").write_text(json.dumps({**config, "max_position_embeddings": context},
                                                 indent=2), encoding="utf-8")
    return view


_SAME_SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size")


def gptq_source(gptq_dir: Path | None, model_dir: Path, settings: ONNXSettings) -> Path:
    """The GPTQ checkpoint an ``int4_algo = "gptq"`` build reads, checked against the model
    and the settings (SettingsError naming the fix otherwise)."""
    if gptq_dir is None:
        raise SettingsError(
            "--int4-algo gptq builds from a GPTQ checkpoint of the model: pass --gptq DIR "
            f"(made by kvant quantize gptq --group-size {settings.block_size}), or use "
            "--int4-algo k_quant_last")
    gptq_dir = Path(gptq_dir)
    theirs = read_config(gptq_dir) if (gptq_dir / "config.json").is_file() else {}
    quant = theirs.get("quantization_config") or {}
    if quant.get("quant_method") != "gptq":
        raise SettingsError(f"--gptq '{gptq_dir}' is not a GPTQ checkpoint (its config.json "
                            "has no GPTQ quantization_config); pass a kvant quantize gptq "
                            "folder")
    if quant.get("bits") != 4:
        raise SettingsError(f"--gptq '{gptq_dir}' is {quant.get('bits')}-bit; an int4 model "
                            "is built from a 4-bit one (kvant quantize gptq --bits 4)")
    if quant.get("group_size") != settings.block_size:
        raise SettingsError(f"--gptq '{gptq_dir}' has group size {quant.get('group_size')} "
                            f"and --block-size is {settings.block_size}: pass --block-size "
                            f"{quant.get('group_size')}, or quantize with --group-size "
                            f"{settings.block_size}")
    ours = read_config(model_dir)
    differ = [k for k in _SAME_SHAPE if ours.get(k) != theirs.get(k)]
    if differ:
        raise SettingsError(f"--gptq '{gptq_dir}' is a checkpoint of another model ({differ[0]}"
                            f" {theirs.get(differ[0])}, not {ours.get(differ[0])}); pass a GPTQ "
                            f"folder made from '{model_dir}'")
    return gptq_dir


def build(model_dir: Path, out_dir: Path, settings: ONNXSettings, scratch: Path, *,
          lean: bool = True) -> dict:
    """Run the GenAI model builder in a child process; return its time and peak RSS.

    ``lean`` (int4 from GPTQ): quantize the lm_head in the builder's graph; False runs the
    builder's own whole-graph route, which writes the same bytes (a test checks this).

    A child process, so that its peak memory is its own (the builder loads the whole
    checkpoint through transformers; the child reports its VmHWM, see kvant.memory) and its
    prints stay out of ours.
    """
    # from a GPTQ checkpoint the layers are GPTQ's and the float lm_head is made int8 by
    # ONNX Runtime's default (MLAS) round to nearest, in the builder's own graph
    # (kvant.export.onnx_builder): k_quant's search on its 262M weights took 2 of the 2.7
    # minutes of a 2-layer build and most of its 13.6 GB (int8 leaves a search little to find)
    # shared_embeddings off: for a model with tied embeddings (SmolLM2) the builder (0.18)
    # shares them by default, and from a GPTQ checkpoint it then writes a graph whose int8
    # lm_head names an initializer it never wrote (ONNX Runtime refuses to load it); the
    # lm_head gets its own int8 copy instead
    algo = ["algo_config=default", "matmul_mixed_precision=last_matmul:int8",
            "shared_embeddings=false", *(["--lean"] if lean else [])] \
        if settings.int4_algo == "gptq" \
        else [f"algo_config={settings.int4_algo}"]
    extra = [] if settings.precision != "int4" else [
        f"block_size={settings.block_size}", f"accuracy_level={settings.accuracy_level}", *algo]
    with tempfile.TemporaryDirectory(prefix="builder-", dir=scratch) as cache:
        text, seconds, peak = run_python(
            _BUILD, [str(model_dir), str(out_dir), settings.precision, settings.provider,
                     cache, *extra], "the ONNX Runtime GenAI builder")
    facts = {"build_seconds": round(seconds, 1), "builder_peak_rss_mib": peak}
    in_place = re.findall(r"KVANT_IN_PLACE (\S+)", text)
    if in_place:  # which float MatMuls kvant.export.onnx_builder quantized in place
        facts["quantized_in_place"] = in_place
    return facts


def og_tokenizer_json(exact: dict) -> dict:
    """The most faithful tokenizer.json onnxruntime-extensions can run without crashing."""
    spec = json.loads(json.dumps(exact))
    pre = spec.get("pre_tokenizer") or {}
    # NorMistral's is a Sequence holding the 24-character chunk split; other models' (a
    # single ByteLevel, or none) have nothing onnxruntime-extensions crashes on
    for part in pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]:
        if part.get("type") == "Split" and part["pattern"].get("Regex") == ".{1,24}":
            part["pattern"] = {"Regex": OG_SPLIT}
    return spec


def og_fidelity(runtime: GenaiRuntime, exact_tokenizer, units: list[str]) -> dict:
    """What og.Tokenizer gives on raw text against the HF ids (without <s>, which og
    leaves out): identical units, token-weighted aligned agreement, crashes."""
    tok = runtime.tokenizer()
    exact, got, crashes = [], [], 0
    for unit in units:
        try:
            ids = [int(i) for i in tok.encode(unit)]
        except RuntimeError:
            crashes += 1
            continue
        exact.append(exact_tokenizer.encode(unit).ids[1:])
        got.append(ids)
    fid = fidelity(exact, got)
    return {"units": len(units), "og_identical_pct": round(fid.identical_pct * fid.units
                                                           / max(len(units), 1), 2),
            "og_aligned_pct": fid.aligned_pct, "og_crashes": crashes}


def _card(name: str, settings: ONNXSettings, validation: dict) -> str:
    fid_rows = ["| language | paragraphs | identical | aligned agreement | crashes |",
                "|---|---|---|---|---|"]
    for lang, f in validation["og_tokenizer"].items():
        fid_rows.append(f"| {lang} | {f['units']} | {f['og_identical_pct']:.1f}% | "
                        f"{f['og_aligned_pct']:.2f}% | {f['og_crashes']} |")
    how = (f"`{settings.int4_algo}`" if settings.int4_algo != "gptq" else
           f"GPTQ (from `{validation['int4_from']['folder']}`, calibrated; lm_head int8 by "
           "ONNX Runtime's round to nearest)")
    block = (f", MatMulNBits block {settings.block_size}, accuracy level "
             f"{settings.accuracy_level}, weights quantized by {how}"
             if settings.precision == "int4" else "")
    return f"""ONNX Runtime GenAI model of `{name}`: {settings.precision} for the
`{settings.provider}` execution provider{block}, with KV cache (`genai_config.json`).

Scored with plain onnxruntime on the HF tokenizer's ids against the transformers model
(float32); max |Δlogit| {validation['max_abs_logit_diff']:.5f}; greedy generation of
{validation['greedy_tokens']} tokens through onnxruntime-genai (KV cache) matched the
full-sequence greedy choice on {validation['greedy_match_pct']:.0f}% of tokens.

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
        data_dir: Path | None = None, force: bool = False, progress: bool = False,
        device: str = "cpu", reference_dir: Path | None = None,
        rehearsal: bool = False, gptq_dir: Path | None = None) -> PipelineOutput:
    """`kvant export onnx`: build, rewrite the tokenizer, validate, publish ``out``
    (``reference_dir`` and ``rehearsal``: see kvant.quantize.checkpoint; ``gptq_dir``: the
    GPTQ checkpoint of ``model_dir`` an ``int4_algo = "gptq"`` build reads)."""
    config = check_input(model_dir, out, force, allow_synthetic=rehearsal)
    weights = (gptq_source(gptq_dir, model_dir, settings) if settings.int4_algo == "gptq"
               and settings.precision == "int4" else model_dir)
    refuse_sliding_window(config, model_dir, "ONNX")
    context, context_warning = trained_context(config, source.get("id", model_dir.name),
                                               settings.context_length)
    check_free_space(out.parent, disk_need(config, [settings.kind]))
    texts, wins = held_out(model_dir, settings, cache_dir, data_dir, progress)
    exact = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    with ArtifactWriter(out, fmt="onnx", force=force, protect=(model_dir,)) as art:
        if context_warning:
            art.warn(context_warning)
        if rehearsal:
            art.warn(REHEARSAL_WARNING)
        ref = pipeline_reference(model_dir, wins, reference_dir, art.scratch,
                                 settings.eval_ctx, device)
        with step(f"{settings.kind} build", kind="onnx-builder",
                  source="gptq" if weights != model_dir else "weights"):
            facts = build(with_context(weights, context, art.scratch), art.dir, settings,
                          art.scratch)
        if weights != model_dir:
            facts["int4_from"] = {"folder": weights.name, "weights_sha256": {
                f.name: sha256_file(f) for f in weight_files(weights)}}
        facts["context_length"] = context
        # the source's sizes beside the graph, as transformers names them (kvant plan and
        # kvant info read them; genai_config.json leaves out the SwiGLU width)
        (art.dir / "config.json").write_text(
            json.dumps({**config, "max_position_embeddings": context}, indent=2),
            encoding="utf-8")
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        (art.dir / EXACT_TOKENIZER).write_text(json.dumps(spec, ensure_ascii=False),
                                               encoding="utf-8")
        (art.dir / "tokenizer.json").write_text(
            json.dumps(og_tokenizer_json(spec), ensure_ascii=False), encoding="utf-8")
        with step(f"{settings.kind} score", kind=settings.kind, ctx=settings.eval_ctx,
                  tokens_per_language=language_tokens(wins)):
            scored = score_against(Target(out.name, art.dir, "onnxruntime", "onnx", 0), ref,
                                   wins)
        prompt = wins[settings.eval_langs[0]][0][:32]
        with step(f"{settings.kind} greedy", kind=settings.kind, ctx=len(prompt) + 16):
            genai = GenaiRuntime(art.dir)
            greedy = [t for t, _ in zip(genai.greedy(prompt, len(prompt) + 16), range(16),
                                        strict=False)]
            og = {lang: og_fidelity(genai, exact, paragraphs(t.read()))
                  for lang, t in texts.items()}
            genai.close()  # before the reference loads: never both in memory
        with step(f"{settings.kind} greedy check", kind=settings.kind, ctx=len(prompt) + 16):
            # GenAI's cached decode against the same model's full-sequence argmax (plain
            # onnxruntime, no cache), whose logits were just compared with the reference:
            # the check needs no second load of the source model
            full = OrtRuntime(art.dir)
            expected = full.logits(prompt + greedy[:-1])[len(prompt) - 1:].argmax(-1).tolist()
            expected = expected[:len(greedy)]  # nothing to check if GenAI stopped at once
            full.close()
        same = sum(a == b for a, b in zip(greedy, expected, strict=True))
        art.validation = {
            "reference": f"transformers, {ref.dtype} weights, float32 log-softmax",
            "runtime": "onnxruntime (CPU)", **facts, "greedy_tokens": len(greedy),
            "greedy_match_pct": round(100 * same / max(len(greedy), 1), 1),
            "greedy_identical": greedy == expected, **scored, "rehearsal": rehearsal,
            "og_tokenizer": og}
        art.source, art.settings = source, settings_dict(settings)
        art.kinds = {out.name: settings.kind}
        art.data = [t.as_manifest() for t in texts.values()]
        art.tags = ["onnx", "onnxruntime-genai", settings.precision]
        name = Path(source.get("id", model_dir.name)).name
        art.title = f"{name} ONNX {settings.precision} ({settings.provider})"
        art.card_body = _card(name, settings, art.validation)
    return PipelineOutput(out, art.kinds)
