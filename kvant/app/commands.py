"""What each `kvant` command does with its parsed arguments (kvant.app.cli builds the
parser and runs them): the result it prints, or a KvantError with the one line to say.

App layer, light at import like the parser: each command imports its implementation (torch,
llama.cpp, ONNX Runtime) when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from kvant import DEFAULT_MODEL
from kvant.app.pipelines import PIPELINES
from kvant.bench.settings import BenchSettings
from kvant.data import TEXT_SETS, get_mix, get_text, paragraphs
from kvant.errors import SettingsError
from kvant.model import model_info, model_source, pick_device, read_config, resolve_model
from kvant.paths import cache_dir, default_data_dir
from kvant.peer import default_dir as peer_dir
from kvant.peer import get_peer
from kvant.plan.fit import fit_overhead, load_results, prediction_errors
from kvant.plan.kinds import kind as kind_of
from kvant.plan.kinds import shape_of
from kvant.plan.kv import KV_TYPES
from kvant.plan.peaks import plan_table
from kvant.plan.sizes import parse_size
from kvant.synth import SHAPES, synthesize
from kvant.tiny import TinyRecipe, build_tiny, default_dir

logger = logging.getLogger("kvant")


def settings_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def cmd_tiny(args: argparse.Namespace) -> str:
    recipe = settings_from_args(TinyRecipe, args)
    progress = not args.no_progress
    train = get_mix(args.train_text, cache_dir(), args.data_dir, progress)
    held_out = get_text(args.eval_text, cache_dir(), args.data_dir, progress)
    out = args.out or default_dir(cache_dir(), recipe, train)
    return str(build_tiny(out, train, held_out, recipe, force=args.force, progress=progress))


def cmd_pipeline(args: argparse.Namespace) -> str:
    """kvant export gguf|onnx and kvant quantize gptq|bnb."""
    pipeline = PIPELINES[args.pipeline]
    settings = settings_from_args(pipeline.settings, args)
    model_dir, source = model_source(args.model, args.revision)
    name = Path(source.get("id", model_dir.name)).name
    out = args.out or Path("out") / pipeline.folder(name, settings)
    made = pipeline.run(model_dir, out, settings, source=source, cache_dir=cache_dir(),
                        data_dir=args.data_dir, force=args.force,
                        progress=not args.no_progress, device=pick_device(args.device),
                        **{f"{name}_dir": getattr(args, name) for name, _ in pipeline.inputs})
    return str(made.out)


def cmd_bench(args: argparse.Namespace) -> str:
    from kvant.bench.run import run_bench  # opens runtimes: numpy, tokenizers, engines

    settings = settings_from_args(BenchSettings, args)
    reference = args.reference or (DEFAULT_MODEL if settings.quality else None)
    ref_dir = model_source(reference)[0] if reference else None
    return str(run_bench(args.artifacts, ref_dir, settings, args.out, cache_dir=cache_dir(),
                         data_dir=args.data_dir, progress=not args.no_progress) / "report.md")


def cmd_eval(args: argparse.Namespace) -> str:
    try:
        from kvant.app.lmeval import run_eval  # lm-eval, and each artifact's runtime
    except ImportError as exc:
        raise SettingsError(f"kvant eval needs lm-evaluation-harness ({exc.name} is missing); "
                            "install it with pip install 'kvant[eval]'") from exc
    if args.limit is not None and args.limit < 1:
        raise SettingsError(f"--limit {args.limit}: give at least 1 document per task")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise SettingsError("--tasks is empty: name lm-eval tasks, e.g. kvant_cloze_nob")
    reference = model_source(args.reference)[0] if args.reference else None
    return str(run_eval(args.artifacts, reference, tasks, args.out, cache_dir=cache_dir(),
                        data_dir=args.data_dir, include_path=args.include_path,
                        limit=args.limit, num_fewshot=args.num_fewshot,
                        device=pick_device(args.device)))


def cmd_lm_eval(args: argparse.Namespace) -> str:
    try:
        from kvant.app.lmeval import lm_eval_cli  # lm-eval, registering `kvant` with it
    except ImportError as exc:
        raise SettingsError(f"kvant lm-eval needs lm-evaluation-harness ({exc.name} is "
                            "missing); install it with pip install 'kvant[eval]'") from exc
    code = lm_eval_cli(args.lm_eval_args, cache_dir=cache_dir(), data_dir=default_data_dir())
    if code:
        raise SystemExit(code)
    return ""


def _sampling(args: argparse.Namespace):
    from kvant.engine import Sampling

    return Sampling(args.temperature, args.top_p, args.top_k, args.seed)


def cmd_generate(args: argparse.Namespace) -> str:
    from kvant.app.generate import generate  # opens a runtime

    for piece in generate(args.artifact, args.prompt, args.max_new_tokens,
                          stop_at_newline=args.stop_at_newline,
                          device=args.device, check=args.verify,  # the Engine picks
                          sampling=_sampling(args), stop=tuple(args.stop),
                          kv_type=args.kv_type):
        args.stdout.write(piece)  # stream past the stdout guard in main()
        args.stdout.flush()
    args.stdout.write("\n")


def cmd_serve(args: argparse.Namespace) -> None:
    from kvant.engine import Engine

    try:
        from kvant.app.serve import is_loopback, serve  # FastAPI and uvicorn
    except ImportError as exc:
        raise SettingsError(f"kvant serve needs FastAPI and uvicorn ({exc.name} is missing); "
                            "install them with pip install 'kvant[serve]'") from exc

    api_key = _api_key(args)
    if args.max_queue < 1:
        raise SettingsError(f"--max-queue {args.max_queue}: let at least 1 request wait")
    engine = Engine(args.artifact, args.device, args.ctx, args.threads,
                    check=args.verify, kv_type=args.kv_type)
    if not is_loopback(args.host) and api_key is None:
        sys.stderr.write(f"kvant: warning: {args.host} is reachable from other machines and no "
                         f"API key is set: anyone who reaches port {args.port} can use the "
                         f"model; pass --api-key-file or set {API_KEY_ENV}\n")
    key = ", API key required" if api_key else ""
    sys.stderr.write(f"kvant: serving {engine.name} at http://{args.host}:{args.port}/v1 "
                     f"(context {engine.n_ctx:,} tokens{key}); Ctrl-C stops\n")
    serve(engine, args.host, args.port, api_key, args.max_queue)
    return ""


API_KEY_ENV = "KVANT_API_KEY"


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file (first line), --api-key or $KVANT_API_KEY, in that
    order; the file or the variable keep it out of `ps`, which shows argv."""
    if args.api_key_file is not None:
        if args.api_key is not None:
            raise SettingsError("--api-key and --api-key-file both given; pass one")
        try:
            lines = args.api_key_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SettingsError(f"--api-key-file '{args.api_key_file}' cannot be read "
                                f"({exc.strerror}); pass a readable file") from None
        key = lines[0].strip() if lines else ""
        where = f"--api-key-file '{args.api_key_file}'"
    elif args.api_key is not None:
        key, where = args.api_key, "--api-key"
    elif API_KEY_ENV in os.environ:
        key, where = os.environ[API_KEY_ENV].strip(), API_KEY_ENV
    else:
        return None
    if not key:
        raise SettingsError(f"{where} gives an empty key; give a key, or leave it out")
    return key


def cmd_synth(args: argparse.Namespace) -> str:
    text = get_mix(args.train_text, cache_dir(), args.data_dir, not args.no_progress)
    return str(synthesize(args.out, args.shape, paragraphs(text.read())[:20000], args.layers,
                          force=args.force, progress=not args.no_progress))


def cmd_plan(args: argparse.Namespace) -> str:
    from kvant.runtimes.targets import target_config  # reads artifacts' files

    artifacts = None
    target = _artifact_target(Path(args.model)) if args.model else None
    if target is not None and target.fmt != "bf16":
        # an artifact: plan what it needs, with its own bytes on disk as the weights
        shape = shape_of(target_config(target))
        found = kind_of(target.kind, file_bpw=8 * target.size_bytes / shape.n_params()) \
            if target.kind else None
        if found is None:
            raise SettingsError(f"'{target.path}' records no kind kvant plan knows "
                                f"({target.kind}); plan its source model with --model SOURCE")
        artifacts = [(target.kind, found, target.size_bytes)]
    elif args.model:
        shape = shape_of(read_config(resolve_model(args.model)))
    else:
        shape = SHAPES[args.shape]
    budget = parse_size(args.budget, "--budget", "8GiB or 24GB", default_unit="GiB")
    results = load_results(args.bench)
    fitted, calibration = fit_overhead(results, shape_of(_bench_config(results))) \
        if results else ({}, set())
    lines = [f"Budget {args.budget}; {shape.n_layers} layers, {shape.n_params() / 1e9:.2f}B "
             "parameters; overhead " + ("fitted to " + str(args.bench) if results
                                        else "from this project's CPU bench"), "",
             plan_table(shape, [int(c) for c in args.ctx.split(",")], budget, fitted,
                        _kv_types(args.kv_type), artifacts)]
    if results:
        errors = prediction_errors(results, shape_of(_bench_config(results)), fitted,
                                   calibration)
        worst = max((abs(e["error_pct"]) for e in errors), default=0.0)
        lines += ["", f"Prediction error on {len(errors)} held-out bench measurements: "
                      f"worst {worst:.1f}%"]
    return "\n".join(lines)


def _kv_types(text: str) -> tuple[str, ...]:
    types = tuple(t.strip() for t in text.split(",") if t.strip())
    for t in types:
        if t not in KV_TYPES:
            raise SettingsError(f"--kv-type {t}: use {', '.join(KV_TYPES)} (comma-separated)")
    return types


def _bench_config(results: dict) -> dict:
    """The benched model's config.json, as the bench recorded it (older results: read from
    the reference folder they name)."""
    if results.get("reference_config"):
        return results["reference_config"]
    return json.loads((Path(results["reference"]) / "config.json").read_text())


def cmd_release(args: argparse.Namespace) -> str:
    from kvant.app.release import run_release  # drives every pipeline and the bench

    root, lines = run_release(args.recipe, cache_dir=cache_dir(), data_dir=args.data_dir,
                              calib=args.calib, push_org=args.push,
                              token=os.environ.get("HF_TOKEN"), public=args.public,
                              progress=not args.no_progress, rehearse=args.rehearse,
                              work=args.work, rebuild=args.rebuild)
    return "\n".join([*lines, f"release: {root}", f"index card: {root / 'README.md'}",
                      f"report: {root / 'bench' / 'report.md'}"])


def cmd_peer(args: argparse.Namespace) -> str:
    out = args.out or peer_dir(cache_dir(), args.name)
    return str(get_peer(args.name, out, wheel=args.wheel, force=args.force))


def cmd_data_get(args: argparse.Namespace) -> str:
    return str(get_mix(args.name, cache_dir(), args.data_dir, not args.no_progress).path)


def cmd_data_list(args: argparse.Namespace) -> str:
    lines = []
    for name, text_set in TEXT_SETS.items():
        pinned = text_set.sha256[:12] if text_set.sha256 else "recorded at download"
        lines.append(f"{name:10} {text_set.role:8} {text_set.language:3} sha256 {pinned:20} "
                     f"{text_set.url}")
    return "\n".join(lines)


def _artifact_target(path: Path):
    """The one model of an artifact (a .gguf file, or a folder Kvant made, an ONNX folder or a
    folder of GGUF files); None for a plain checkpoint folder or a hub id."""
    from kvant.runtimes.targets import targets  # opens a GGUF's metadata

    if not (path.is_file() and path.suffix == ".gguf") and not (
            path.is_dir() and ((path / "manifest.json").is_file() or
                               (path / "genai_config.json").is_file() or
                               any(path.glob("*.gguf")))):
        return None
    found = targets(path)
    if len(found) != 1:
        names = ", ".join(t.path.name for t in found)
        raise SettingsError(f"'{path}' holds {len(found)} models ({names}); pass one of them")
    return found[0]


def _artifact_rows(target) -> dict:
    """What every artifact kind shows first: its kind, engine, size and stated context, and
    which tokenizer feeds its engine."""
    from kvant.engine import stated_context

    rows = {"path": str(target.path), "kind": target.kind, "backend": target.backend,
            "size on disk": f"{target.size_bytes / 2**20:,.1f} MiB",
            "context": f"{stated_context(target):,}"}
    if target.backend == "llama.cpp":
        from kvant.runtimes.llamacpp import native_exact, tokenizer_path

        exact = native_exact(target.path)  # loads the vocabulary: once
        rows.update({"tokenizer": tokenizer_path(exact), "llama.cpp exact": exact})
    elif target.backend == "onnxruntime-genai":
        rows["tokenizer"] = ("NorMistral's exact tokenizer (tokenizer.normistral.json) feeds "
                             "ONNX Runtime GenAI; its own tokenizer.json is the nearest it "
                             "runs")
    elif target.backend == "mlx":
        rows["tokenizer"] = ("the artifact's tokenizer.json (NorMistral's own) feeds mlx-lm; "
                             "mlx-lm's tokenizer gives the same ids (its card measures it)")
    return rows


def _build_info() -> dict:
    from kvant.runtimes.llamacpp import build_info

    info = build_info()
    if not info["recorded"]:
        return {"llama-cpp-python": info["llama_cpp_python"],
                "build": "not recorded: not installed by `make setup` (tools/llama_cpp_wheel.py)",
                "CPU features": " ".join(info["features"])}
    faults = "; ".join(f"{f['variant']} died on {f['signal']} in {f['tool']}"
                       for f in info["faults"]) or "none"
    return {"llama-cpp-python": info["llama_cpp_python"], "build": info["variant"],
            "compiler flags": " ".join(info["cflags"]) or "-march=native",
            "CPU features": " ".join(info["features"]),
            "checked on": f"{info['cpu']['model']} ({info['checked']}, smoke test with "
                          "repacking on)",
            "faults": faults}


def cmd_info(args: argparse.Namespace) -> str:
    if args.build:
        rows = _build_info()
        if args.json:
            return json.dumps(rows, indent=2)
        return "\n".join(f"{key:18} {value}" for key, value in rows.items())
    target = _artifact_target(Path(args.model))
    artifact = None if target is None else _artifact_rows(target)
    if artifact is not None and artifact["backend"] != "torch":
        if args.json:
            return json.dumps(artifact, indent=2)
        return "\n".join(f"{key:18} {value}" for key, value in artifact.items())
    info = model_info(resolve_model(args.model))
    if args.json:
        return json.dumps({**info.as_dict(), **(artifact or {})}, indent=2)
    rows = [] if artifact is None else [("kind", artifact["kind"])]
    rows += [
        ("path", info.path),
        ("architecture", f"{info.architecture} ({info.model_type})"
         + (" [synthetic weights]" if info.synthetic else "")),
        ("parameters", f"{info.n_params:,} ({info.n_params / 1e9:.3f} B)"),
        ("dtype", info.dtype + (f", quantized: {info.quantized}" if info.quantized else "")),
        ("size on disk", f"{info.size_bytes / 2**20:,.1f} MiB"),
        ("layers", f"{info.n_layers}, hidden {info.hidden_size}, intermediate "
                   f"{info.intermediate_size}"),
        ("attention", f"{info.n_heads} query / {info.n_kv_heads} KV heads of dim "
                      f"{info.head_dim}"),
        ("vocabulary", f"{info.vocab_size}, embeddings "
                       f"{'tied' if info.tied_embeddings else 'untied'}"),
        ("context", artifact["context"] if artifact else f"{info.context_length:,}"),
        ("tokenizer", info.tokenizer),
    ]
    manifest = Path(info.path) / "manifest.json"
    if manifest.is_file():  # a Kvant artifact: say what made it and how it validated
        made = json.loads(manifest.read_text(encoding="utf-8"))
        rows.append(("kvant format", made.get("format", "?")))
        rows += [(f"  {k}", str(v)) for k, v in made.get("validation", {}).items()]
    return "\n".join(f"{key:18} {value}" for key, value in rows)


