"""Any Kvant artifact as an lm-evaluation-harness model, on NorMistral's exact tokens.

    import lm_eval
    from kvant.app.lmeval import KvantLM
    lm_eval.simple_evaluate(model=KvantLM("out/normistral-11b-long-gguf/...-Q4_K_M.gguf"),
                            tasks=["noreval_..."])

Registered as ``kvant`` (``--model kvant --model_args artifact=PATH`` wherever lm-eval's
registry has this module imported). lm-eval's own gguf and OpenAI-API backends tokenize with
the server's tokenizer or none at all; here every request is tokenized with the exact
NorMistral tokenizer the artifact carries (kvant.tokenization.exact_tokenizer: tokenizer.json,
or the one embedded in a GGUF), and the runtime is Kvant's own for that kind (transformers
for bf16, GPTQ and bitsandbytes, llama.cpp for GGUF, ONNX Runtime for ONNX), so a bf16 folder
and its bf16 GGUF score the same ids.

Written here because lm-eval's HFLM takes transformers models only; the split of a request
follows HFLM's (lm-eval's convention: trailing spaces of the context belong to the
continuation, and the continuation's ids are those of context + continuation after the
context's own).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from kvant.engine import Engine, stated_context
from kvant.errors import SettingsError
from kvant.files import sha256_file, sha256_text, write_json
from kvant.recorder import step
from kvant.runtimes import open_runtime
from kvant.runtimes.reference import reference_dtype
from kvant.runtimes.targets import targets, verify
from kvant.scoring import log_softmax
from kvant.tokenization import exact_tokenizer

DEFAULT_MAX_LENGTH = 4096  # tokens per forward unless the artifact states less

logger = logging.getLogger(__name__)


def split_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with <s>, continuation ids): the continuation's ids are the tail of
    context + continuation's exact ids after the context's own (HFLM's rule), with the
    context's trailing spaces moved to the continuation first."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation).ids
    head = tokenizer.encode(context).ids if context else whole[:1]  # "" is <s> alone
    return head, whole[len(head):]


def usable_device(device: str | None) -> str:
    """``device`` where it is there; else the CPU, with a warning, as lm-eval's own HFLM
    does (lm-eval's CLI passes its default, cuda, to every model it builds)."""
    import torch

    device = device or "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %s is not available here: running on the CPU", device)
        return "cpu"
    return device


@register_model("kvant")
class KvantLM(LM):
    """One artifact (a bf16 folder, a GPTQ or bitsandbytes checkpoint, a .gguf file, an ONNX
    folder) behind lm-eval's three request types. ``max_length``: tokens per forward (a
    longer request keeps its last ones, as HFLM does). ``runtime``: an opened kvant runtime
    to use instead (tests record what it is fed)."""

    def __init__(self, artifact: str, device: str = "cpu", max_length: int | str = 0,
                 threads: int | str = 0, runtime=None, **_lm_eval_args) -> None:
        super().__init__()
        found = targets(Path(artifact))
        if len(found) != 1:
            raise SettingsError(f"'{artifact}' holds {len(found)} models; pass one .gguf file "
                                "or one artifact folder")
        self.target = found[0]
        verify(self.target)
        self.tokenizer = exact_tokenizer(self.target.path)
        self.bos_id = self.tokenizer.token_to_id("<s>")
        self.max_length = int(max_length) or min(stated_context(self.target),
                                                 DEFAULT_MAX_LENGTH)
        self.where, self.threads = usable_device(device), int(threads)  # LM.device: lm-eval's
        self._runtime, self._engine = runtime, None
        self.dtype = None  # the scoring runtime's, once opened (a bf16 folder's: the plan's)
        self._own_runtime = runtime is None
        self.longest = 0  # the most tokens one forward took (a release step's plan context)

    # the scoring runtime and the generation engine are opened one at a time: never two
    # copies of an 11.4B model in memory
    def _scorer(self):
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._runtime is None:
            dtype = (reference_dtype(self.target.path, self.where)
                     if self.target.fmt == "bf16" else "bfloat16")
            self._runtime = open_runtime(self.target, self.where, self.threads,
                                         n_ctx=self.max_length + 8, dtype=dtype)
            self.dtype = dtype
        return self._runtime

    def _generator(self) -> Engine:
        if self._runtime is not None and self._own_runtime:
            self._runtime.close()
            self._runtime = None
        if self._engine is None:
            self._engine = Engine(self.target.path, self.where, self.max_length,
                                  self.threads, check=False)
        return self._engine

    def close(self) -> None:
        for held in (self._engine, self._runtime if self._own_runtime else None):
            if held is not None:
                held.close()
        self._engine = self._runtime = None

    def score(self, head: list[int], tail: list[int]) -> tuple[float, bool]:
        """(sum of log p(tail | head), whether greedy decoding gives ``tail``): one forward
        over head + tail, cut on the left to ``max_length`` + 1 ids."""
        if not tail:
            raise SettingsError("a request's continuation is empty after tokenization; "
                                "lm-eval tasks score at least one token")
        ids = (head + tail)[-(self.max_length + 1):]
        self.longest = max(self.longest, len(ids) - 1)
        logits = self._scorer().logits(ids[:-1])[-len(tail):]
        logp = log_softmax(logits)
        rows = np.arange(len(tail))
        return float(logp[rows, tail].sum()), bool((logits.argmax(-1) == tail).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        done: dict[tuple, tuple[float, bool]] = {}  # multiple choice repeats its pairs
        out = []
        for request in requests:
            head, tail = split_request(self.tokenizer, *request.args)
            key = (tuple(head), tuple(tail))
            if key not in done:
                done[key] = self.score(head, tail)
            out.append(done[key])
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for request in requests:
            ids = self.tokenizer.encode(request.args[0]).ids[1:]  # after <s>
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=self.bos_id, max_seq_len=self.max_length,
                context_len=1)]
            out.append(sum(self.score(head, tail)[0] for head, tail in windows))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
                raise SettingsError("kvant's lm-eval model decodes greedily; set the task's "
                                    "generation_kwargs do_sample: false")
            engine = self._generator()
            ids = engine.encode(context)[-(self.max_length - 1):]
            n_new = min(int(kwargs.get("max_gen_toks") or 256), self.max_length - len(ids))
            self.longest = max(self.longest, len(ids) + n_new)
            out.append("".join(engine.complete(ids, n_new, stop=until)))
        return out


# `kvant eval`: lm-eval's tasks on artifacts and their bf16 reference, with the drift.

def _metrics(task_results: dict) -> dict[str, dict]:
    """{metric: {"value", "stderr"}} from lm-eval's "acc,none" / "acc_stderr,none" keys."""
    found = {}
    for key, value in task_results.items():
        name, _, filt = key.partition(",")
        if not filt or "_stderr" in name or not isinstance(value, (int, float)):
            continue
        stderr = task_results.get(f"{name}_stderr,{filt}")
        found[name if filt == "none" else key] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return found


def drift_of(model: dict, reference: dict) -> dict:
    """Per task and metric: the artifact's value, the reference's, their difference
    (absolute and relative) and the difference's standard error, sqrt(se^2 + se_ref^2):
    the two runs' stderrs as if independent (they score the same documents, so the true
    paired error is smaller; lm-eval reports no per-document covariance)."""
    out = {}
    for task, metrics in model.items():
        for metric, m in metrics.items():
            r = reference.get(task, {}).get(metric)
            if r is None:
                continue
            delta = m["value"] - r["value"]
            se = (math.hypot(m["stderr"], r["stderr"])
                  if m["stderr"] is not None and r["stderr"] is not None else None)
            out.setdefault(task, {})[metric] = {
                "value": m["value"], "reference": r["value"], "delta": delta,
                "relative": delta / r["value"] if r["value"] else None, "delta_stderr": se}
    return out


def _lm_eval_file(path: Path, results: dict, out: Path) -> None:
    """lm-eval's own results (its dict as its tracker writes it) and per-sample logs. The
    task configs name their data files by absolute path: written relative to ``out`` (the
    eval folder, which holds the tasks), never the machine's folders."""
    path.mkdir(parents=True, exist_ok=True)
    samples = results.get("samples") or {}
    kept = {k: v for k, v in results.items() if k != "samples"}
    here = str(out.resolve()) + "/"

    def dump(value, **kwargs) -> str:
        return json.dumps(value, default=str, **kwargs).replace(here, "")

    (path / "results.json").write_text(dump(kept, indent=2) + "\n", encoding="utf-8")
    for task, rows in samples.items():
        with (path / f"samples_{task}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(dump(row, ensure_ascii=False) + "\n")


def lm_eval_cli(argv: list[str], *, cache_dir: Path, data_dir: Path | None) -> int:
    """lm-eval's own command line (``lm_eval ARGS``) with ``kvant`` registered as a model:
    ``kvant lm-eval run --model kvant --model_args artifact=PATH --tasks ...``. lm-eval finds
    installed backends by their ``lm_eval.models`` entry point only from its PR #4013 on, in
    no release yet (0.4.13 is the newest), so a bare ``lm_eval --model kvant`` cannot find
    this module; running lm-eval's CLI after importing it can. Kvant's local tasks named in
    the arguments (kvant_cloze_<lang>, kvant_complete_<lang>) are built from the held-out text
    into the cache and passed as --include_path when none is given. Returns lm-eval's exit
    status."""
    from lm_eval.__main__ import cli_evaluate

    from kvant.bench.lmtasks import LOCAL_TASK, build_tasks

    argv = list(argv)
    words = [w for arg in argv for w in arg.split(",")]
    local = sorted({m.group(1) for w in words if (m := LOCAL_TASK.fullmatch(w.strip()))})
    only_local = False
    if local and "--include_path" not in argv:
        folder = cache_dir / "lm-eval-tasks"
        build_tasks(folder, cache_dir, data_dir, tuple(local))
        argv += ["--include_path", str(folder)]
        only_local = all(LOCAL_TASK.fullmatch(t.strip()) for t in _tasks_argument(argv))
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        with _without_bundled_tasks(only_local):
            cli_evaluate()
    except SystemExit as exc:  # argparse's usage errors and lm-eval's own exits
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _tasks_argument(argv: list[str]) -> list[str]:
    """The task names of ``--tasks A,B`` (or ``--tasks=A,B``) in ``argv``; none without it."""
    for i, arg in enumerate(argv):
        if arg == "--tasks" and i + 1 < len(argv):
            return argv[i + 1].split(",")
        if arg.startswith("--tasks="):
            return arg.removeprefix("--tasks=").split(",")
    return []


@contextlib.contextmanager
def _without_bundled_tasks(skip: bool):
    """lm-eval's TaskManager without the index of its own bundled tasks (``skip``): 5.6 s of
    YAML parsing on 2 cores, for nothing when every task asked for is Kvant's own. lm-eval's
    command line has no switch for TaskManager's ``include_defaults``: this sets its default."""
    if not skip:
        yield
        return
    from lm_eval.tasks import TaskManager

    original = TaskManager.__init__

    def init(self, *args, include_defaults: bool = False, **kwargs):
        original(self, *args, include_defaults=include_defaults, **kwargs)

    TaskManager.__init__ = init
    try:
        yield
    finally:
        TaskManager.__init__ = original


KVANT_ENTRY = "kvant.json"  # beside lm-eval's files: Kvant's summary of one model's run


def run_eval(artifacts: list[Path], reference: Path | None, tasks: list[str], out: Path, *,
             cache_dir: Path, data_dir: Path | None, include_path: list[Path] = (),
             limit: int | None = None, num_fewshot: int | None = None,
             device: str = "cpu") -> Path:
    """lm-eval's ``tasks`` on the reference and on every model in ``artifacts`` (each .gguf
    of a GGUF folder), identical requests for all; writes results.json first, then
    report.md and drift.png, and lm-eval's own files per model under lm-eval/. Tasks named
    kvant_* are Kvant's local ones, built from the held-out text into out/tasks. Without a
    ``reference`` the scores are reported without their drift."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from kvant.bench.lmtasks import LOCAL_TASK, build_tasks

    # every path checked before any work
    models = [t for p in ([reference] if reference else []) + list(artifacts)
              for t in targets(Path(p))]
    if reference is None:
        logger.warning("no --reference: the task scores are reported without their drift")
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(include) for include in include_path]
    local = sorted({m.group(1) for t in tasks if (m := LOCAL_TASK.fullmatch(t))})
    if local:
        build_tasks(out / "tasks", cache_dir, data_dir, tuple(local))
        paths.append(out / "tasks")
    # lm-eval's 27,000 bundled task files take 5.6 s to index: not when every task is Kvant's
    manager = TaskManager(include_path=[str(p) for p in paths] or None,
                          include_defaults=not all(LOCAL_TASK.fullmatch(t) for t in tasks))
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise SettingsError(f"unknown lm-eval task '{unknown[0]}'; list them with `lm_eval "
                            "ls tasks`, or pass --include-path DIR with its YAML")
    # what a model's scores depend on besides its weights: a model whose scores in out were
    # made from the same is not evaluated again (a resumed release)
    setup = sha256_text(json.dumps({
        "tasks": tasks, "limit": limit, "num_fewshot": num_fewshot,
        "lm_eval": lm_eval.__version__,
        "task files": {str(f.relative_to(p)): sha256_file(f) for p in paths
                       for f in sorted(p.rglob("*")) if f.suffix in (".yaml", ".jsonl")}}))
    found = {}
    where = usable_device(device)
    for target in models:
        # the device and the dtype a model is scored in change its log-likelihoods too
        dtype = reference_dtype(target.path, where) if target.fmt == "bf16" else target.fmt
        key = sha256_text(f"{target.digest()}|{setup}|{where}|{dtype}")
        done = out / "lm-eval" / target.name / KVANT_ENTRY
        if done.is_file() and (entry := json.loads(done.read_text())).get("key") == key:
            found[target.name] = entry
            continue
        # a release step each (kvant.recorder): its memory planned like the bench's scoring
        with step(f"eval {target.name}", kind=target.kind, weights=target.size_bytes,
                  task_eval=True) as record:
            lm = KvantLM(str(target.path), device=where)
            started = time.perf_counter()
            try:
                results = lm_eval.simple_evaluate(model=lm, tasks=tasks,
                                                  num_fewshot=num_fewshot, limit=limit,
                                                  task_manager=manager, log_samples=True)
            finally:
                lm.close()
            seconds = time.perf_counter() - started
            record["ctx"] = lm.longest
            if target.fmt == "bf16" and lm.dtype:  # float32 where it fits, as the reference
                record["dtype"] = lm.dtype
            if target.fmt == "gguf":  # llama.cpp clears its whole KV cache when it opens
                record["n_ctx"] = lm.max_length + 8
        _lm_eval_file(out / "lm-eval" / target.name, results, out)
        requests = sum(len(row["arguments"]) for rows in results["samples"].values()
                       for row in rows)
        record["requests"] = requests
        found[target.name] = {
            "key": key, "file": target.path.name, "seconds": round(seconds, 1),
            "documents": sum(len(rows) for rows in results["samples"].values()),
            "requests": requests,
            "results": {t: _metrics(r) for t, r in results["results"].items()
                        if t in tasks or t in results.get("group_subtasks", {})}}
        write_json(done, found[target.name])
    ref_name = models[0].name if reference else None
    data = {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot,
            "reference": ref_name, "lm_eval_version": lm_eval.__version__, "models": found,
            "drift": {n: drift_of(m["results"], found[ref_name]["results"])
                      for n, m in found.items() if n != ref_name} if ref_name else {}}
    write_json(out / "results.json", data)
    (out / "report.md").write_text(eval_report(data), encoding="utf-8")
    if ref_name:
        _drift_plot(data, out / "drift.png")
    return out / "report.md"


def eval_report(data: dict) -> str:
    """report.md: per task and metric the reference's value and each model's drift."""
    run = (f"lm-eval {data['lm_eval_version']}, tasks {', '.join(data['tasks'])}"
           + (f", {data['limit']} documents per task" if data["limit"] else "")
           + (f", {data['num_fewshot']}-shot" if data["num_fewshot"] is not None else ""))
    if data["reference"] is None:
        lines = ["# Task scores", "", run + "; no reference was given, so no drift", "",
                 "| model | task | metric | value | stderr |", "|---|---|---|---|---|"]
        for name, m in data["models"].items():
            for task, metrics in m["results"].items():
                for metric, v in metrics.items():
                    se = f"{v['stderr']:.4f}" if v["stderr"] is not None else "-"
                    lines.append(f"| {name} | {task} | {metric} | {v['value']:.4f} | {se} |")
        return "\n".join(lines) + "\n"
    lines = [f"# Task drift against {data['reference']}", "", run,
             "", "| model | task | metric | value | bf16 | drift (± stderr) | relative |",
             "|---|---|---|---|---|---|---|"]
    for name, tasks in data["drift"].items():
        for task, metrics in tasks.items():
            for metric, d in metrics.items():
                se = f" ± {d['delta_stderr']:.4f}" if d["delta_stderr"] is not None else ""
                rel = f"{100 * d['relative']:+.1f}%" if d["relative"] is not None else "-"
                lines.append(f"| {name} | {task} | {metric} | {d['value']:.4f} | "
                             f"{d['reference']:.4f} | {d['delta']:+.4f}{se} | {rel} |")
    lines += ["", "| model | requests | seconds | s per 1,000 requests |", "|---|---|---|---|"]
    for name, m in data["models"].items():
        per = 1000 * m["seconds"] / m["requests"] if m["requests"] else 0
        lines.append(f"| {name} | {m['requests']} | {m['seconds']:.1f} | {per:,.0f} |")
    return "\n".join(lines) + "\n"


def _drift_plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(t, m) for tasks in data["drift"].values() for t, ms in tasks.items()
                   for m in ms})
    names = list(data["drift"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        # relative, so that accuracies (0-1) and chrF (0-100) share the axis
        rows = [data["drift"][name].get(t, {}).get(m) for t, m in keys]
        rows = [r if r and r["reference"] else None for r in rows]
        ax.bar([j + i * width for j in range(len(keys))],
               [100 * r["delta"] / r["reference"] if r else 0 for r in rows], width,
               label=name, capsize=3,
               yerr=[100 * (r["delta_stderr"] or 0) / abs(r["reference"]) if r else 0
                     for r in rows])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))],
                  [f"{t}\n{m}" for t, m in keys], fontsize=7)
    ax.set(ylabel=f"% drift against {data['reference']}",
           title="Task score drift, relative (± stderr)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
