"""The whole `kvant export gguf` run: convert, imatrix, quantize, validate, card.

Steps: convert the checkpoint to a bf16 GGUF with Kvant's converter (gguf-py; exact tokenizer
embedded), compute a Norwegian importance matrix with llama.cpp's llama-imatrix, make every
other type with llama.cpp's own quantizer, then load each file back in llama.cpp and score it
on the HF tokenizer's ids against the transformers model: logits parity for f32, mean KLD and
top-1 agreement for the rest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from kvant.artifact import (
    ArtifactWriter,
    PipelineOutput,
    check_free_space,
    check_input,
    settings_dict,
)
from kvant.data import TextFile, get_mix, paragraphs
from kvant.errors import DataError, SettingsError
from kvant.export.gguf import (
    DIRECT,
    GGUFSettings,
    file_name,
    file_stem,
    is_mix,
    kind,
    mix_base,
    mix_size,
)
from kvant.export.gguf_card import card, run_it
from kvant.export.gguf_clients import client_fidelity, modelfile
from kvant.export.gguf_convert import convert
from kvant.export.gguf_mix import candidates, make_mix, mix_verdict, uniform_frontier
from kvant.export.gguf_quantize import bits_per_weight, compute_imatrix, quantize, tensor_types
from kvant.export.gguf_sensitivity import Sensitivity, token_frequencies
from kvant.export.gguf_substitution import substitution_costs
from kvant.export.gguf_tensors import OverTimeBudget, quantizable
from kvant.files import sha256_file
from kvant.model import (
    model_info,
    read_config,
    refuse_sliding_window,
    trained_context,
)
from kvant.plan.kinds import shape_of
from kvant.plan.peaks import LAPTOP_BUDGET, context_that_fits, disk_need
from kvant.plan.sizes import GIB
from kvant.recorder import REHEARSAL_WARNING, language_tokens, step
from kvant.runtimes.llamacpp import LlamaCppRuntime, StockTokenizer
from kvant.runtimes.reference import Reference, pipeline_reference, score_against
from kvant.runtimes.targets import Target
from kvant.scoring import eval_windows, held_out, sequence_nll_bits
from kvant.tokenization import exact_tokenizer, fidelity

logger = logging.getLogger(__name__)

BASE_TYPE = "bf16"  # the file every other type is made from
MAX_UNIT_TOKENS = 1024  # longer paragraphs are left out of the bits-per-byte score


def tokenizer_report(base: Path, texts: dict[str, TextFile], settings: GGUFSettings) -> dict:
    """Per language: what stock llama.cpp tokenization gives, and what it costs in bits/byte.

    Identical share and aligned agreement are over every paragraph. Bits per byte score the
    first paragraphs (up to eval_tokens tokens) under both tokenizations with the same file.
    Each paragraph is tokenized once per tokenizer and the vocabulary opened once.
    """
    exact_tok = exact_tokenizer(base)
    stock_tok = StockTokenizer(base)
    try:
        units = {lang: paragraphs(text.read()) for lang, text in texts.items()}
        exact = {lang: [e.ids for e in exact_tok.encode_batch(u)] for lang, u in units.items()}
        stock = {lang: [stock_tok.tokenize(x) for x in u] for lang, u in units.items()}
    finally:
        stock_tok.close()
    report = {}
    runtime = LlamaCppRuntime(base, threads=settings.n_threads, n_ctx=2 * MAX_UNIT_TOKENS)
    try:
        for lang in texts:
            fid = fidelity(exact[lang], stock[lang])
            bits_exact = bits_stock = 0.0
            n_bytes = n_tokens = longest = 0
            for unit, ids, ids_stock in zip(units[lang], exact[lang], stock[lang], strict=True):
                if max(len(ids), len(ids_stock)) > MAX_UNIT_TOKENS:
                    continue
                longest = max(longest, len(ids), len(ids_stock))
                bits_exact += sequence_nll_bits(runtime.logits(ids), ids)
                bits_stock += sequence_nll_bits(runtime.logits(ids_stock), ids_stock)
                n_bytes += len(unit.encode("utf-8"))
                n_tokens += len(ids)
                if n_tokens >= settings.eval_tokens:
                    break
            report[lang] = {"paragraphs": fid.units, "stock_identical_pct": fid.identical_pct,
                            "stock_aligned_pct": fid.aligned_pct,
                            "bpb_exact_ids": round(bits_exact / n_bytes, 4),
                            "bpb_stock_llama_cpp": round(bits_stock / n_bytes, 4),
                            "scored_bytes": n_bytes, "longest_scored_tokens": longest}
    finally:
        runtime.close()
    return report


def validate(path: Path, ref: Reference | None, wins: dict, settings: GGUFSettings) -> dict:
    """Load a file in llama.cpp and score it against the reference on identical ids.

    With no windows (a synthetic checkpoint: no quality to measure) only the file facts.
    """
    facts = {"size_bytes": path.stat().st_size, "bits_per_weight": bits_per_weight(path),
             "tensor_types": tensor_types(path)}
    if not wins:
        return facts
    target = Target(path.stem, path, "llama.cpp", "gguf", facts["size_bytes"], None,
                    (path.name,))
    return {**facts, **score_against(target, ref, wins, threads=settings.n_threads)}


def _judge_mix(spec: str, uniform: Path, files: dict, mix: dict, ref: Reference | None,
               wins: dict, settings: GGUFSettings) -> str | None:
    """Why the ``<type>-mix`` must not be published (None: it may). Its held-out scores
    against its uniform twin's (kvant.export.gguf_mix.mix_verdict); the twin is scored here
    when it was made only as the budget. Without held-out text (synthetic weights) nothing
    can be judged and the mix stays."""
    if mix.get("skipped"):
        return mix["skipped"]
    if mix.get("same_as_uniform"):
        return "no trade of bytes between tensors was predicted to help at this size"
    if not wins:
        return None
    uniform_type = mix_base(spec)
    if uniform_type not in files:
        files[uniform_type] = {"file": uniform.name, "kind": kind(uniform_type),
                               "fallback_tensors": 0, **validate(uniform, ref, wins, settings)}
    reason = mix_verdict(files[spec], files[uniform_type])
    if reason is None and uniform_type not in settings.types:
        del files[uniform_type]  # scored to judge the mix, not published
    return reason


def against_frontier(files: dict, withheld: dict) -> None:
    """Each scored mix's held-out mean KLD beside the uniform frontier at its bytes
    (kvant.export.gguf_mix.uniform_frontier over the uniform files scored here), written into
    its entry where two uniform files bracket it."""
    points = [(f["size_bytes"], f["mean_kld"]) for t, f in files.items()
              if not is_mix(t) and f.get("mean_kld")]
    scored = [f for t, f in files.items() if is_mix(t)]
    scored += [w["held_out"] for w in withheld.values() if "held_out" in w]
    for entry in scored:
        frontier = uniform_frontier(points, entry["size_bytes"]) if "mean_kld" in entry \
            else None
        if frontier:
            entry["uniform_frontier_kld"] = round(frontier, 8)
            entry["vs_uniform_frontier"] = round(entry["mean_kld"] / frontier, 4)


def _sensitivity(settings: GGUFSettings, info, model_dir: Path, base: Path,
                 imatrix: Path | None, calib, scratch: Path, reference_dir: Path | None,
                 device: str, cache_dir: Path, data_dir: Path | None,
                 progress: bool, rehearsal: bool = False, specs: tuple = ()) -> Sensitivity:
    """How the mixes' per-tensor costs are measured: directly on calibration windows (their
    reference from the model, as for the held-out text), or by the proxy. A rehearsal
    (synthetic weights: the proxy) first times what the torch method would cost at this
    depth (:func:`_rehearse_torch`)."""
    mode = settings.mix_sensitivity
    if mode == "auto" and info.synthetic:
        mode = "proxy"  # synthetic weights have no KLD to measure
    if mode != "proxy" and info.synthetic:
        raise SettingsError(f"--mix-sensitivity {mode} measures KLD, which synthetic weights "
                            "do not have; use proxy (or auto)")
    calib = calib or get_mix(settings.calib, cache_dir, data_dir, progress)
    # the proxy weighs token_embd's rows by how often the calibration text reads them
    ids = exact_tokenizer(model_dir).encode(calib.read()).ids
    freq = token_frequencies(ids, read_config(model_dir)["vocab_size"])
    if rehearsal and settings.mix_sensitivity == "auto":
        _rehearse_torch(settings, model_dir, base, imatrix, calib, scratch, reference_dir,
                        device, specs)
    if mode == "proxy":  # measured here, for every mix at once (its own step)
        with step("gguf mix sensitivity", kind="llama-quantize"):
            sensitivity = Sensitivity(mode, base, imatrix, scratch, settings.n_threads,
                                      progress=progress, token_freq=freq)
            sensitivity.costs_of(_candidates(specs, imatrix))
        return sensitivity
    wins = calibration_windows(model_dir, settings, calib)
    ref = pipeline_reference(model_dir, wins, reference_dir, scratch, settings.eval_ctx, device)
    return Sensitivity(mode, base, imatrix, scratch, settings.n_threads, ref, wins["calib"],
                       progress, time_budget_s=settings.mix_time_budget, model_dir=model_dir,
                       device=device, token_freq=freq)


def calibration_windows(model_dir: Path, settings: GGUFSettings, calib) -> dict:
    """{"calib": the windows a measured mix sensitivity scores on}: ``settings.mix_tokens``
    of the calibration text ``calib`` (a TextFile) in windows of ``settings.eval_ctx``."""
    return eval_windows(model_dir, {"calib": calib}, settings.mix_tokens, settings.eval_ctx)


def _candidates(specs: tuple, imatrix: Path | None) -> list[str]:
    """Every type some mix of ``specs`` may choose (before its uniform file's own types,
    which are among them for llama.cpp's recipes)."""
    return list(dict.fromkeys(t for spec in specs
                              for t in candidates(spec, imatrix=imatrix is not None)))


def _rehearse_torch(settings: GGUFSettings, model_dir: Path, base: Path,
                    imatrix: Path | None, calib, scratch: Path, reference_dir: Path | None,
                    device: str, specs: tuple) -> None:
    """The torch sensitivity's cost at this depth, for the rehearsal's plan: its reference on
    the calibration windows, the model loaded, one --pure file and two substituted forwards
    (the head's alone, every layer replayed, and the whole model's), timed (the estimate,
    carried to full depth by kvant.app.rehearsal, says whether it fits --mix-time-budget on
    this machine; where it does not, auto ships the uniform file).
    The rehearsal then times the proxy, as synthetic weights get; the costs measured here
    on random weights are thrown away."""
    types = _candidates(specs, imatrix)
    wins = calibration_windows(model_dir, settings, calib)
    ref = pipeline_reference(model_dir, wins, reference_dir, scratch, settings.eval_ctx, device)
    tensors = quantizable(base)
    with step("gguf mix sensitivity torch", kind="mix-torch", ctx=settings.eval_ctx,
              dtype=ref.dtype, tensors=len(tensors), types=len(types), device=device,
              tokens=sum(map(len, wins["calib"])),
              time_budget_s=settings.mix_time_budget) as record:
        try:
            substitution_costs(model_dir, base, tensors, types, imatrix, ref, wins["calib"],
                               scratch, settings.n_threads, device, ref.dtype,
                               time_budget_s=0)
        except OverTimeBudget as over:  # always: a budget of 0 stops after one evaluation
            record["estimate"] = over.estimate


def write_modelfiles(folder: Path, paths: dict[str, Path], config: dict, context: int) -> dict:
    """One Ollama Modelfile per published file, num_ctx sized for a typical laptop."""
    shape = shape_of(config)
    written = {}
    for gguf_type, path in paths.items():
        if path.parent != folder:  # the scratch bf16 file is not published
            continue
        num_ctx, fits = context_that_fits(shape, kind(gguf_type), context,
                                          weights=path.stat().st_size)
        target = folder / f"{path.stem}.Modelfile"
        target.write_text(modelfile(path.name, num_ctx, fits, LAPTOP_BUDGET / GIB),
                          encoding="utf-8")
        written[gguf_type] = {"file": target.name, "num_ctx": num_ctx,
                              "fits_laptop": fits}
    return written


@dataclass
class _Inputs:
    """What an export was asked for, checked before any work (:func:`_inputs`)."""

    config: dict
    info: object
    name: str
    model_id: str
    context: int
    context_warning: str | None
    quant_types: list[str]
    mix_types: list[str]
    imatrix_file: Path | None
    calib: object  # the calibration TextFile of an importance matrix to compute, or None


def _inputs(model_dir: Path, out: Path, settings: GGUFSettings, source: dict, force: bool,
            cache_dir: Path, data_dir: Path | None, progress: bool) -> _Inputs:
    """Every refusal an export can make before it starts: the output folder, the model, the
    importance matrix file, free space, a calibration text too short for one chunk."""
    config = check_input(model_dir, out, force, allow_synthetic=True)  # synthetic: converted
    refuse_sliding_window(config, model_dir, "GGUF")
    name = Path(source.get("id", model_dir.name)).name
    # hub ids (and Kvant's stand-in) name the model in its general.* metadata; a local
    # folder's path does not
    model_id = source.get("id", name) if not Path(source.get("id", "")).is_absolute() else name
    context, context_warning = trained_context(config, source.get("id", model_dir.name),
                                               settings.context_length)
    quant_types = [t for t in settings.types if t not in DIRECT and not is_mix(t)]
    mix_types = [t for t in settings.types if is_mix(t)]
    imatrix_file = None
    if (quant_types or mix_types) and settings.imatrix not in ("auto", "none"):
        imatrix_file = Path(settings.imatrix).expanduser()
        if not imatrix_file.is_file():
            raise DataError(f"--imatrix '{settings.imatrix}' not found; pass an existing "
                            "imatrix file, auto (compute one) or none")
    check_free_space(out.parent, disk_need(
        config, [kind(t) for t in settings.types],
        scratch=[] if BASE_TYPE in settings.types else [kind(BASE_TYPE)]))
    calib = None
    if (quant_types or mix_types) and settings.imatrix == "auto":
        calib = get_mix(settings.calib, cache_dir, data_dir, progress)
        calib_tokens = len(exact_tokenizer(model_dir).encode(calib.read()).ids)
        if calib_tokens < settings.imatrix_ctx:
            raise DataError(f"calibration text '{calib.name}' gives {calib_tokens} tokens, "
                            f"fewer than one --imatrix-ctx {settings.imatrix_ctx} chunk; pass "
                            "a longer --calib text or --imatrix none")
    return _Inputs(config, model_info(model_dir), name, model_id, context, context_warning,
                   quant_types, mix_types, imatrix_file, calib)


def _importance(art, model_dir: Path, base: Path, settings: GGUFSettings,
                asked: _Inputs) -> tuple[Path | None, dict | None]:
    """The importance matrix the quantized types are made with (computed on the calibration
    text, or the user's file), recorded in the manifest; (None, None) where there is none."""
    if not (asked.quant_types or asked.mix_types) or settings.imatrix == "none":
        return None, None
    if asked.calib is None:  # the user's file: its digest says what a release was made with
        art.data.append({"name": asked.imatrix_file.name, "path": asked.imatrix_file.name,
                         "sha256": sha256_file(asked.imatrix_file), "source": "--imatrix"})
        return asked.imatrix_file, {"file": asked.imatrix_file.name, "chunks": None,
                                    "ctx": None}
    art.data.append(asked.calib.as_manifest())
    normalizer = Tokenizer.from_file(str(model_dir / "tokenizer.json")).normalizer
    path = art.dir / f"{asked.name}.imatrix.gguf"
    with step("gguf imatrix", kind="imatrix", ctx=settings.imatrix_ctx):
        return path, compute_imatrix(base, asked.calib.read(), path, settings, normalizer,
                                     art.scratch, process_output=bool(asked.mix_types))


def _mixes(art, base: Path, paths: dict, quantized: dict, sensitivity, imatrix_path,
           settings: GGUFSettings, asked: _Inputs) -> dict[str, Path]:
    """Make each -MIX and mix:SIZE file into ``paths`` and ``quantized``; return each
    ``<type>-mix``'s uniform twin (its budget), made in scratch where not asked for."""
    uniform_of: dict[str, Path] = {}
    for spec in asked.mix_types:
        uniform_type, uniform = mix_base(spec), None
        if uniform_type:
            uniform = paths.get(uniform_type)
            if uniform is None:  # the budget's measure, published only in the mix's place
                uniform = art.scratch / file_name(asked.name, uniform_type)
                with step(f"gguf quantize {uniform_type}", kind="llama-quantize"):
                    quantize(base, uniform, uniform_type, imatrix_path, settings.n_threads)
            uniform_of[spec] = uniform
        paths[spec] = art.dir / file_name(asked.name, spec)
        with step(f"gguf mix {spec}", kind="llama-quantize"):
            quantized[spec] = {"fallback_tensors": 0, "mix": make_mix(
                spec, base, paths[spec], sensitivity, uniform,
                None if uniform_type else mix_size(spec), settings.n_threads)}
    return uniform_of


def _withhold(art, uniform_of: dict[str, Path], paths: dict, files: dict, quantized: dict, ref,
              wins, settings: GGUFSettings) -> dict:
    """Each -MIX worse than its twin on held-out text, removed with its uniform twin shipped
    in its place (kvant.export.gguf_mix.mix_verdict); returns why, per mix."""
    withheld = {}
    for spec, uniform in uniform_of.items():
        reason = _judge_mix(spec, uniform, files, quantized[spec]["mix"], ref, wins, settings)
        if reason is None:
            continue
        uniform_type = mix_base(spec)
        paths.pop(spec).unlink(missing_ok=True)
        if uniform.parent != art.dir:  # not asked for on its own: shipped in its place
            paths[uniform_type] = uniform.rename(art.dir / uniform.name)
            if uniform_type not in files:  # scored already when the mix was judged
                files[uniform_type] = {"kind": kind(uniform_type), "fallback_tensors": 0,
                                       **validate(paths[uniform_type], ref, wins, settings)}
            files[uniform_type]["file"] = uniform.name
        withheld[spec] = {"reason": reason, "instead": uniform.name,
                          "mix": quantized[spec]["mix"],
                          **({"held_out": files.pop(spec)} if spec in files else {})}
        art.warn(f"{spec}: not published: {reason}; {uniform.name} is shipped instead")
    return withheld


def _convert(art, model_dir: Path, settings: GGUFSettings, asked: _Inputs,
             progress: bool) -> tuple[dict, dict[str, Path]]:
    """The bf16 file every type is quantized from (published if asked for, else in scratch)
    and the other types gguf-py writes directly: (the base's conversion facts, {type: path})."""
    name = asked.name
    base = (art.dir if BASE_TYPE in settings.types else art.scratch) / file_name(
        name, BASE_TYPE)
    with step(f"gguf convert {BASE_TYPE}", kind=kind(BASE_TYPE)):
        conv = convert(model_dir, base, BASE_TYPE, settings.pre, name, progress,
                       asked.context, asked.model_id)
    paths: dict[str, Path] = {BASE_TYPE: base}
    for direct in (t for t in settings.types if t in DIRECT and t != BASE_TYPE):
        paths[direct] = art.dir / file_name(name, direct)
        with step(f"gguf convert {direct}", kind=kind(direct)):
            convert(model_dir, paths[direct], direct, settings.pre, name, progress,
                    asked.context, asked.model_id)
    return conv, paths


def _quantize(art, base: Path, paths: dict[str, Path], imatrix_path: Path | None,
              settings: GGUFSettings, asked: _Inputs) -> dict[str, dict]:
    """Each uniform type llama-quantize makes from ``base`` into ``paths``: {type: facts}."""
    quantized = {}
    for gguf_type in asked.quant_types:
        paths[gguf_type] = art.dir / file_name(asked.name, gguf_type)
        with step(f"gguf quantize {gguf_type}", kind="llama-quantize"):
            q = quantize(base, paths[gguf_type], gguf_type, imatrix_path, settings.n_threads)
        if q["fallback_tensors"]:
            art.warn(f"{gguf_type}: {q['fallback_tensors']} tensor(s) fell back to another "
                     "type (rows not divisible by the block size)")
        quantized[gguf_type] = q
    return quantized


def run(model_dir: Path, out: Path, settings: GGUFSettings, *, source: dict,
        cache_dir: Path, data_dir: Path | None = None, force: bool = False,
        progress: bool = False, device: str = "cpu", reference_dir: Path | None = None,
        rehearsal: bool = False) -> PipelineOutput:
    """Convert, quantize and validate; publish ``out`` atomically (``reference_dir`` and
    ``rehearsal``: see kvant.quantize.checkpoint)."""
    asked = _inputs(model_dir, out, settings, source, force, cache_dir, data_dir, progress)
    name, info = asked.name, asked.info
    # synthetic weights: convert and quantize for speed and memory, but score nothing
    langs = () if info.synthetic and not rehearsal else settings.eval_langs
    texts, wins = held_out(model_dir, settings, cache_dir, data_dir, progress, langs)
    with ArtifactWriter(out, fmt="gguf", force=force, protect=(model_dir,)) as art:
        ref = pipeline_reference(model_dir, wins, reference_dir, art.scratch,
                                 settings.eval_ctx, device) if wins else None
        art.settings = settings_dict(settings)
        art.source = source
        if asked.context_warning:
            art.warn(asked.context_warning)
        conv, paths = _convert(art, model_dir, settings, asked, progress)
        base = paths[BASE_TYPE]
        imatrix_path, imatrix = _importance(art, model_dir, base, settings, asked)
        quantized = _quantize(art, base, paths, imatrix_path, settings, asked)
        sensitivity = None
        if asked.mix_types:
            sensitivity = _sensitivity(settings, info, model_dir, base, imatrix_path,
                                       asked.calib, art.scratch, reference_dir, device,
                                       cache_dir, data_dir, progress, rehearsal,
                                       tuple(asked.mix_types))
        uniform_of = _mixes(art, base, paths, quantized, sensitivity, imatrix_path, settings, asked)
        files = {}
        for t in settings.types:
            mix = quantized.get(t, {}).get("mix", {})
            if mix.get("same_as_uniform") or mix.get("skipped"):
                continue  # no file was made: judged below
            with step(f"gguf score {t}", kind=kind(t), ctx=settings.eval_ctx,
                      weights=paths[t].stat().st_size, tokens_per_language=language_tokens(wins)):
                files[t] = {"file": paths[t].name, "kind": kind(t), **quantized.get(t, {}),
                            **validate(paths[t], ref, wins, settings)}
        withheld = _withhold(art, uniform_of, paths, files, quantized, ref, wins, settings)
        against_frontier(files, withheld)
        with step("gguf tokenizer report", kind=kind(BASE_TYPE),
                  weights=base.stat().st_size) as record:
            tok_report = tokenizer_report(base, texts, settings)
            record["ctx"] = max((r["longest_scored_tokens"] for r in tok_report.values()),
                                default=0)
            clients = client_fidelity(base, texts)
        modelfiles = write_modelfiles(art.dir, paths, asked.config, asked.context)
        if rehearsal:
            art.warn(REHEARSAL_WARNING)
        elif info.synthetic:
            art.warn("synthetic weights: files converted and quantized, quality not measured")
        art.data += [t.as_manifest() for t in texts.values()]
        art.kinds = {file_stem(name, t): kind(t) for t in files}
        art.validation = {"reference": f"transformers, {ref.dtype if ref else '-'} weights, "
                                       "float32 log-softmax", "files": files,
                          "tokenizer": {"gguf": conv["tokenizer"], "stock_llama_cpp": tok_report,
                                        "clients": clients},
                          "modelfiles": modelfiles,
                          "mix_sensitivity": sensitivity.as_dict() if sensitivity else None,
                          "withheld_mixes": withheld,
                          "imatrix": imatrix, "eval_ctx": settings.eval_ctx,
                          "context_length": asked.context, "rehearsal": rehearsal}
        art.tags = ["gguf", "llama.cpp"]
        art.title = f"{name} GGUF"
        art.card_body = card(name, files, tok_report, imatrix, asked.calib,
                              run_it(files, clients, asked.context), withheld)
    logger.info("GGUF export: %s", json.dumps({t: f.get("mean_kld") for t, f in files.items()}))
    return PipelineOutput(out, art.kinds)
