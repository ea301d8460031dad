"""`kvant release RECIPE`: build, benchmark and card every artifact of a recipe.

App layer: it drives the pipelines (through kvant.app.pipelines) and the bench.
Every artifact is an atomic Kvant folder, so a killed release resumes: a finished artifact
is kept when its checksums verify and its manifest records the settings, source model and
text sets the recipe asks for now (`resume_changes`); one made from anything else is refused,
naming what changed, unless `--rebuild`. `--push ORG` uploads with huggingface_hub; without
it the exact upload list is printed instead.

Recipe schema (TOML), every key optional except release.name and release.model:

    [release]  name, model (hub id, folder, or "@stand-in"), revision (hub ids: branch, tag
               or commit), out, calib, langs, eval_tokens
    [gguf] [gptq] [onnx] [mlx]  every field of GGUFSettings, GPTQSettings, ONNXSettings,
                          MLXSettings
    [bnb]      every field of BnbSettings, with `modes` (a list) for `mode`
    [bench]    every field of BenchSettings but langs (release.langs) and verify
    [eval]     tasks (lm-eval task names), limit, num_fewshot, include_path (folders of
               task YAMLs): `kvant eval` on every artifact and the bf16 model, its drift on
               the index card (skipped on synthetic weights; a rehearsal times it on the
               local cloze task instead)

A section's calib, eval_langs or eval_tokens overrides the [release] value for that section.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvant.app.pipelines import PIPELINES
from kvant.app.rehearsal import REHEARSAL_TABLE, scale_work, write_rehearsal
from kvant.app.release_cards import (
    INDEX_FILES,
    PLOTS,
    artifact_section,
    index_card,
    long_context_picks,
    upload_plan,
    verify_release,
)
from kvant.artifact import (
    amend_artifact,
    published_arg,
    read_manifest,
    settings_dict,
    verify_artifact,
)
from kvant.bench.depth import depth, documents
from kvant.bench.depth import table as depth_table
from kvant.bench.run import quality_windows, run_bench, texts_for
from kvant.bench.settings import BenchSettings
from kvant.data import get_mix, get_text, paragraphs
from kvant.errors import ArtifactError, SettingsError
from kvant.files import sha256_file, write_json
from kvant.model import (
    content_hash,
    model_info,
    model_source,
    pick_device,
    read_config,
    trained_context,
)
from kvant.plan.fit import entry_kind, fit_overhead
from kvant.plan.kinds import shape_of
from kvant.plan.kv import kv_types_for
from kvant.plan.peaks import peak_bytes
from kvant.recorder import recording, step
from kvant.registry import nearest
from kvant.runtimes.reference import reference_logits, reference_matches
from kvant.runtimes.targets import targets as find_targets
from kvant.scoring import eval_windows
from kvant.synth import SHAPES, synthesize
from kvant.tiny import TinyRecipe, build_tiny, default_dir

logger = logging.getLogger(__name__)


def _fields(cls, drop=(), add=()) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - set(drop) | set(add)


# Built from the settings classes, so a field added to a pipeline is a recipe key at once.
RECIPE_SCHEMA = {
    "release": {"name", "model", "revision", "out", "calib", "langs", "eval_tokens"},
    **{key: _fields(PIPELINES[key].settings) for key in ("gguf", "gptq", "onnx", "mlx")},
    "bnb": _fields(PIPELINES["bnb"].settings, drop=("mode",), add=("modes",)),
    "bench": _fields(BenchSettings, drop=("langs", "verify")),
    "eval": {"tasks", "limit", "num_fewshot", "include_path"},
}
REHEARSAL_EVAL_DOCS = 40  # cloze documents (4 requests each) a full-work rehearsal times
PLAN_CTX = 4096  # the context "Which to pick" plans for


@dataclass
class Recipe:
    path: Path
    sections: dict = field(default_factory=dict)

    @property
    def release(self) -> dict:
        return self.sections["release"]

    def get(self, section: str) -> dict | None:
        return self.sections.get(section)


def load_recipe(path: Path) -> Recipe:
    """Parse and check a recipe: unknown sections or keys are errors naming the key."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"recipe '{path}' not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"recipe '{path}' is not valid TOML: {exc}") from None
    for section, values in data.items():
        if section not in RECIPE_SCHEMA:
            hint = nearest(section, RECIPE_SCHEMA)
            raise SettingsError(f"recipe '{path}': unknown section [{section}]"
                                + (f"; did you mean [{hint}]?" if hint else ""))
        for key in values:
            if key not in RECIPE_SCHEMA[section]:
                hint = nearest(key, RECIPE_SCHEMA[section])
                raise SettingsError(f"recipe '{path}': unknown key {section}.{key}"
                                    + (f"; did you mean {section}.{hint}?" if hint else ""))
    for key in ("name", "model"):
        if key not in data.get("release", {}):
            raise SettingsError(f"recipe '{path}': release.{key} is required")
    _check_eval(path, data.get("eval"))
    return Recipe(Path(path), data)


def _check_eval(path: Path, section: dict | None) -> None:
    if section is None:
        return
    tasks = section.get("tasks")
    if not tasks or not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise SettingsError(f"recipe '{path}': eval.tasks must be a list of lm-eval task "
                            "names, e.g. [\"norcommonsenseqa_nob_p0\"]")
    for key in ("limit", "num_fewshot"):
        value = section.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < (1 if key == "limit" else 0)):
            raise SettingsError(f"recipe '{path}': eval.{key} must be a whole number"
                                f"{' above 0' if key == 'limit' else ', 0 or more'}")
    include = section.get("include_path", [])
    if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
        raise SettingsError(f"recipe '{path}': eval.include_path must be a list of folders")
    for folder in include:
        if not Path(folder).expanduser().is_dir():  # as on the command line: from here
            raise SettingsError(f"recipe '{path}': eval.include_path folder '{folder}' "
                                "does not exist")


def _tuple(value):
    return tuple(str(v) for v in value) if isinstance(value, list) else value


def bench_settings(recipe: Recipe) -> BenchSettings:
    """The bench of a release: the recipe's [bench] on its [release] langs."""
    bench_args = {k: (tuple(str(c) for c in v) if k == "ctx" else v)
                  for k, v in (recipe.get("bench") or {}).items()}
    langs = tuple(recipe.release.get("langs", ["nob", "nno", "sme", "dan", "swe"]))
    # every artifact here was just verified against its manifest (_complete) or just written
    # by this run: the bench checks sizes, not sha256 a second time (minutes at 11.4B)
    return replace(BenchSettings(**bench_args), langs=langs, verify=False)


def plan_artifacts(recipe: Recipe) -> dict[str, tuple[str, object]]:
    """{artifact folder name: (pipeline key, settings)} in build order."""
    rel = recipe.release
    name = rel["name"]
    common = {"eval_langs": rel.get("langs", ["nob", "nno", "sme", "dan", "swe"]),
              "eval_tokens": rel.get("eval_tokens", 2048)}
    calib = {"calib": rel["calib"]} if rel.get("calib") else {}
    wanted: list[tuple[str, dict]] = []
    for key in ("gguf", "gptq"):
        if (section := recipe.get(key)) is not None:
            wanted.append((key, {**common, **calib, **section}))
    if (b := recipe.get("bnb")) is not None:
        extra = {k: v for k, v in b.items() if k != "modes"}
        for mode in b.get("modes", ["nf4"]):
            four_bit = {k: v for k, v in extra.items()
                        if mode != "int8" or k not in ("double_quant", "compute_dtype")}
            wanted.append(("bnb", {**common, **four_bit, "mode": mode}))
    for key in ("onnx", "mlx"):
        if (section := recipe.get(key)) is not None:
            wanted.append((key, {**common, **section}))
    out: dict[str, tuple[str, object]] = {}
    for key, args in wanted:
        pipeline = PIPELINES[key]
        try:
            settings = pipeline.settings(**{k: _tuple(v) for k, v in args.items()})
        except TypeError as exc:
            raise SettingsError(f"recipe '{recipe.path}': {exc}") from None
        out[pipeline.folder(name, settings)] = (key, settings)
    for settings in (s for k, s in out.values() if k == "onnx"):
        if settings.int4_algo == "gptq" and _gptq_input(out, settings) is None:
            raise SettingsError(
                f"recipe '{recipe.path}': onnx.int4_algo = \"gptq\" builds from the recipe's "
                f"GPTQ artifact, and it has no [gptq] with bits = 4 and group_size = "
                f"{settings.block_size}; add one, set onnx.block_size to its group_size, or "
                "use int4_algo = \"k_quant_last\"")
    return out


def _gptq_input(artifacts: dict, onnx) -> str | None:
    """The folder of the GPTQ artifact an ONNX int4 build from GPTQ reads (4-bit, its group
    size the ONNX block size), or None."""
    if onnx.int4_algo != "gptq" or onnx.precision != "int4":
        return None
    return next((f for f, (k, s) in artifacts.items() if k == "gptq" and s.bits == 4
                 and s.group_size == onnx.block_size), None)


def _current_data(settings, cache_dir: Path, data_dir: Path | None) -> dict[str, str]:
    """{text set or file name: sha256} of what ``settings`` would be made from now, under
    the names manifests record them by (kvant.data.TextFile.as_manifest)."""
    found = {}
    if getattr(settings, "calib", None):
        text = get_mix(settings.calib, cache_dir, data_dir)
        found[text.name] = text.sha256
    for lang in settings.eval_langs:
        text = get_text(lang, cache_dir, data_dir)
        found[text.name] = text.sha256
    imatrix = getattr(settings, "imatrix", "none")
    if imatrix not in ("auto", "none") and Path(imatrix).expanduser().is_file():
        found[Path(imatrix).name] = sha256_file(Path(imatrix).expanduser())
    return found


# Settings that say how fast an artifact is made, not what it holds: never a reason to rebuild.
HOW_FAST = {"threads"}


def _shown(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def resume_changes(folder: Path, key: str, settings, source: dict,
                   data: dict[str, str]) -> list[str]:
    """What differs between the finished artifact in ``folder`` and what the recipe asks
    for now: each changed setting (``gguf.types: ["q8_0"] -> ["q4_k_m"]``), the source
    model (its id, hub revision or content hash) and each text set whose content changed
    (calibration, held-out text, an imatrix file). Empty: the artifact may be kept."""
    manifest = read_manifest(folder)
    changes = []
    made, wanted = manifest.get("settings", {}), settings_dict(settings)
    # a field newer than the artifact: unchanged if the recipe leaves it at its default
    defaults = settings_dict(type(settings)())
    for name in sorted((made.keys() | wanted.keys()) - HOW_FAST):
        if name not in made and wanted.get(name) == defaults.get(name):
            continue
        if made.get(name) != wanted.get(name):
            changes.append(f"{key}.{name}: {_shown(made.get(name))} -> "
                           f"{_shown(wanted.get(name))}")
    was = manifest.get("source", {})
    for name in ("id", "revision", "content_hash"):
        if was.get(name) != source.get(name):
            changes.append(f"source {name}: {_shown(was.get(name))} -> "
                           f"{_shown(source.get(name))}")
    for entry in manifest.get("data", []):
        now = data.get(entry.get("name"))
        if now is not None and now != entry.get("sha256"):
            changes.append(f"text '{entry['name']}' changed (sha256 {entry['sha256'][:12]} -> "
                           f"{now[:12]})")
    return changes


def _complete(folder: Path) -> bool:
    try:
        return folder.is_dir() and verify_artifact(folder) == []
    except ArtifactError:
        return False


def _model(release: dict, calib: str, cache_dir: Path, data_dir: Path | None,
           progress: bool) -> tuple[Path, dict]:
    spec = release["model"]
    if spec == "@stand-in":
        train = get_mix(calib, cache_dir, data_dir, progress)
        recipe = TinyRecipe()
        path = build_tiny(default_dir(cache_dir, recipe, train), train,
                          get_text("nob", cache_dir, data_dir, progress), recipe,
                          progress=progress)
        if release.get("revision"):
            raise SettingsError("release.revision applies to a hub id, and the model is the "
                                "stand-in; drop revision from the recipe")
        return path, {"id": "kvant-stand-in", "content_hash": content_hash(path)}
    return model_source(spec, release.get("revision"))


def _shared_reference(model: Path, artifacts: dict, bench: BenchSettings, folder: Path,
                      cache_dir: Path, data_dir: Path | None) -> None:
    """The reference distributions of every window any pipeline or the bench scores,
    computed with the model loaded once (kvant.runtimes.reference_logits), into ``folder``."""
    wins: dict[str, list[list[int]]] = {}
    for _, settings in artifacts.values():
        texts = {lang: get_text(lang, cache_dir, data_dir) for lang in settings.eval_langs}
        for lang, lang_wins in eval_windows(model, texts, settings.eval_tokens,
                                            settings.eval_ctx).items():
            wins.setdefault(f"{lang}@{settings.eval_ctx}", lang_wins)
    bench_wins, _ = quality_windows(model, texts_for(bench, cache_dir, data_dir), bench)
    for lang, lang_wins in bench_wins.items():
        wins.setdefault(f"bench {lang}", lang_wins)
    if wins:
        ctx = max(len(w) for ws in wins.values() for w in ws)
        with step("reference", kind="reference", ctx=ctx) as record:
            record["dtype"] = reference_logits(model, wins, folder, pick_device()).dtype


def _rehearsal_model(rel: dict, layers: int, calib: str, cache_dir: Path,
                     data_dir: Path | None, progress: bool) -> tuple[Path, dict]:
    """The recipe's model at real width with ``layers`` layers and random weights (built
    once into the cache), and its source record."""
    shape = "kvant-stand-in" if rel["model"] == "@stand-in" else Path(str(rel["model"])).name
    if shape not in SHAPES:
        raise SettingsError(f"--rehearse needs a model whose shapes Kvant knows "
                            f"({', '.join(SHAPES)}); the recipe's model is '{rel['model']}'")
    folder = cache_dir / "synth" / f"{shape}-{layers}l"
    if not _complete(folder):
        text = get_mix(calib, cache_dir, data_dir, progress)
        synthesize(folder, shape, paragraphs(text.read())[:20000], layers, force=True,
                   progress=progress)
    return folder, {"id": f"kvant-synth/{shape}", "shape": shape, "layers": layers,
                    "content_hash": content_hash(folder)}


def _to_build(root: Path, source: dict, artifacts: dict, cache_dir: Path,
              data_dir: Path | None, rebuild: bool) -> dict:
    """The artifacts a resumed release must build: every one not finished, and (with
    ``rebuild``) every finished one made from other inputs; without ``rebuild`` such a one
    is refused, before any work, naming the first change."""
    todo = {}
    for folder, (key, settings) in artifacts.items():
        if not _complete(root / folder):
            todo[folder] = (key, settings)
            continue
        changes = resume_changes(root / folder, key, settings, source,
                                 _current_data(settings, cache_dir, data_dir))
        if not changes:
            logger.info("keeping finished %s: same settings, source and texts", root / folder)
        elif rebuild:
            logger.warning("rebuilding %s: %s", root / folder, "; ".join(changes))
            todo[folder] = (key, settings)
        else:
            more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
            raise SettingsError(f"'{root / folder}' was made from other inputs than the recipe "
                                f"asks for now: {changes[0]}{more}; pass --rebuild to rebuild "
                                "it, or restore the recipe")
    # an ONNX model made from the GPTQ artifact is rebuilt with it
    made_from = {f: _gptq_input(artifacts, s) for f, (k, s) in artifacts.items() if k == "onnx"}
    return {f: a for f, a in artifacts.items() if f in todo or made_from.get(f) in todo}


def _build(root: Path, model: Path, source: dict, artifacts: dict, bench: BenchSettings,
           cache_dir: Path, data_dir: Path | None, progress: bool, rehearsal: bool,
           rebuild: bool = False) -> None:
    """Every artifact (resuming: a finished one is kept when it was made from what the recipe
    asks for now, see _to_build; a rehearsal builds all anew), each scored against one
    shared reference, then the bench."""
    reference = root / ".reference"  # scratch: the distributions every artifact is scored on
    stamp = reference / "reference.json"
    if stamp.is_file() and (rehearsal or not reference_matches(reference, model)):
        # Kvant's own scratch, left by a killed run: reused by a release that resumes, but
        # not when it came from other weights, nor by a rehearsal (which measures it)
        shutil.rmtree(reference)
    todo = dict(artifacts) if rehearsal else _to_build(root, source, artifacts, cache_dir,
                                                          data_dir, rebuild)
    if rehearsal:
        # measure every step anew: the bench's and [eval]'s kept scores would skip theirs
        (root / "bench" / "results.json").unlink(missing_ok=True)
        shutil.rmtree(root / "eval", ignore_errors=True)  # Kvant's own, in the rehearsal folder
    _shared_reference(model, todo, bench, reference, cache_dir, data_dir)
    for folder, (key, settings) in todo.items():
        logger.info("building %s", root / folder)
        inputs = {"gptq_dir": root / g} if key == "onnx" and (
            g := _gptq_input(artifacts, settings)) else {}
        PIPELINES[key].run(model, root / folder, settings, source=source, cache_dir=cache_dir,
                           data_dir=data_dir, force=True, progress=progress,
                           device=pick_device(), reference_dir=reference, rehearsal=rehearsal,
                           **inputs)
    run_bench([root / f for f in artifacts], model, bench, root / "bench", cache_dir=cache_dir,
              data_dir=data_dir, progress=progress, reference_dir=reference,
              rehearsal=rehearsal)
    shutil.rmtree(reference, ignore_errors=True)


def _task_eval(root: Path, model: Path, artifacts: dict, section: dict | None,
               langs: tuple[str, ...], rehearsal: bool, work: float, cache_dir: Path,
               data_dir: Path | None) -> dict:
    """The recipe's [eval]: lm-eval's tasks on every artifact and the bf16 model
    (kvant.app.lmeval.run_eval, a recorded step per model) into root/eval; its results, or
    {} when nothing was scored. Synthetic weights score nothing: a rehearsal times the step
    on Kvant's local cloze task in the release's first language instead (the recipe's tasks
    may need their data from the hub), any other run skips it."""
    if not section:
        return {}
    tasks, limit = section["tasks"], section.get("limit")
    include = [Path(p).expanduser() for p in section.get("include_path", [])]
    if rehearsal:
        tasks, include = [f"kvant_cloze_{langs[0]}"], []
        limit = max(4, round(REHEARSAL_EVAL_DOCS * work))
    elif model_info(model).synthetic:
        logger.warning("skipping [eval]: '%s' has synthetic weights, whose task scores mean "
                       "nothing", model)
        return {}
    from kvant.app.lmeval import run_eval  # lm-eval: only for a recipe with [eval]

    out = root / "eval"
    run_eval([root / f for f in artifacts], model, tasks, out, cache_dir=cache_dir,
             data_dir=data_dir, include_path=include, limit=limit,
             num_fewshot=None if rehearsal else section.get("num_fewshot"),
             device=pick_device())
    return {} if rehearsal else json.loads((out / "results.json").read_text())


def _depth_study(root: Path, model: Path, source: dict, artifacts: dict,
                 settings: BenchSettings, cache_dir: Path, data_dir: Path | None) -> dict:
    """Each long-context pick scored by position with its KV cache type and with f16
    (kvant.bench.depth), into bench/depth.json and depth.md; {} when the release runs none
    (depth_ctx 0, or synthetic weights, whose KLD means nothing)."""
    if not settings.depth_ctx or model_info(model).synthetic:
        return {}
    targets, _, long_predicted, _ = _predictions(root, model, source, _folders(root, artifacts))
    docs = documents(model, list(settings.langs), settings.depth_ctx, cache_dir, data_dir)
    caches: dict[str, dict[str, None]] = {}  # per picked target: f16, then its picks' types
    for _, n, kv in long_context_picks(targets, long_predicted):
        if n:
            caches.setdefault(n, {"f16": None})[kv] = None
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix=".depth-", dir=root / "bench") as scratch:
        for n, kvs in sorted(caches.items()):  # each target and cache type scored once
            results.update(depth([root / "bench" / targets[n]["path"]], model, docs, tuple(kvs),
                                 Path(scratch)))
    write_json(root / "bench" / "depth.json", results)
    (root / "bench" / "depth.md").write_text(depth_table(results) + "\n", encoding="utf-8")
    return results


def _depth_tokens(depth: dict) -> int:
    return max((r["tokens"] for by_kv in depth.values() for by_lang in by_kv.values()
                for r in by_lang.values()), default=0)


def _predictions(root: Path, model: Path, source: dict, folders: dict[str, list[str]]
                 ) -> tuple[dict, dict, dict, int]:
    """(bench targets, each shipped target's predicted peak at PLAN_CTX, the same per KV
    cache type at the trained context, that context), fitted to the release's bench."""
    results = json.loads((root / "bench" / "results.json").read_text())
    targets = results["targets"]
    shape = shape_of(read_config(model))
    fitted, _ = fit_overhead(results, shape)
    shipped = {n for names in folders.values() for n in names}  # never the reference model
    predicted, long_predicted = {}, {}
    long_ctx = trained_context(read_config(model), source["id"], 0)[0]
    for tname in shipped:
        if (k := entry_kind(targets[tname], shape)) is not None:
            predicted[tname] = peak_bytes(shape, k, PLAN_CTX, targets[tname]["size_bytes"],
                                          fitted)
            long_predicted[tname] = {kv: peak_bytes(shape, k, long_ctx,
                                                    targets[tname]["size_bytes"], fitted, kv)
                                     for kv in kv_types_for(k.backend)}
    return targets, predicted, long_predicted, long_ctx


def _folders(root: Path, artifacts: dict) -> dict[str, list[str]]:
    return {f: [t.name for t in find_targets(root / f)] for f in artifacts}


def effective_recipe(text: str, calib: str | None) -> str:
    """The recipe that ran: ``text`` with ``--calib`` (``calib``) in its [release] section's
    calib, the override named in a comment beside it. A local file is named by its file
    name and sha256, and an absolute ``out`` by its folder's name: never the publisher's
    folders."""
    # an output folder given as an absolute path is the publisher's: named by its name
    text = re.sub(r'(?m)^(out\s*=\s*)"(/[^"]*)"', lambda m: f'{m[1]}"{Path(m[2]).name}"',
                  text)
    if not calib:
        return text
    digests = [f"{path.name} sha256 {sha256_file(path)}"
               for part in calib.split(",")
               if (path := Path(part.strip().partition(":")[0]).expanduser()).is_file()]
    line = (f"calib = {json.dumps(published_arg(calib))}  # set by --calib for this release"
            + (f" ({'; '.join(digests)})" if digests else ""))
    head, found, rest = text.partition("[release]")
    if not found:
        return f"[release]\n{line}\n\n{text}"
    header = re.search(r"(?m)^\[", rest)  # the next section's
    section, tail = (rest[:header.start()], rest[header.start():]) if header else (rest, "")
    if re.search(r"(?m)^calib\s*=.*$", section):
        section = re.sub(r"(?m)^calib\s*=.*$", lambda _: line, section, count=1)
    else:
        section = section.replace("\n", f"\n{line}\n", 1)  # right below [release]
    return head + found + section + tail


def _cards(root: Path, recipe_path: Path, name: str, model: Path, source: dict,
           artifacts: dict, bench_settings: BenchSettings, at_depth: dict,
           tasks: dict, calib: str | None = None) -> None:
    """Cards, plots and checksums of every artifact and the release's index (with the task
    drift of [eval], ``tasks``: kvant eval's results, or {})."""
    folders = _folders(root, artifacts)
    targets, predicted, long_predicted, long_ctx = _predictions(root, model, source, folders)
    ctx = bench_settings.ctx[0]
    plots = {p: root / "bench" / p for p in PLOTS}
    for folder, names in folders.items():
        amend_artifact(root / folder, card_section=artifact_section(targets, names, ctx),
                       files=plots, validation={"bench": {n: targets[n] for n in names}})
    recipe_text = effective_recipe(Path(recipe_path).read_text(encoding="utf-8"), calib)
    (root / "recipe.toml").write_text(recipe_text, encoding="utf-8")
    (root / "README.md").write_text(index_card(name, source["id"], recipe_text, targets,
                                               folders, predicted, ctx, PLAN_CTX,
                                               long_predicted, long_ctx, at_depth,
                                               _depth_tokens(at_depth), tasks),
                                    encoding="utf-8")
    write_json(root / "release.json", {"name": name, "source": source,
                                       "artifacts": {f: k for f, (k, _) in artifacts.items()}})
    (root / "SHA256SUMS").write_text("".join(
        f"{sha256_file(root / rel)}  {rel}\n" for rel in INDEX_FILES
        if rel != "SHA256SUMS" and (root / rel).is_file()), encoding="utf-8")


def run_release(recipe_path: Path, *, cache_dir: Path, data_dir: Path | None = None,
                calib: str | None = None, push_org: str | None = None,
                token: str | None = None, public: bool = False,
                progress: bool = False, rehearse: int | None = None,
                work: float = 1.0, rebuild: bool = False) -> tuple[Path, list[str]]:
    """Build, bench and card everything; return the release folder and the upload lines.

    ``rehearse``: run every step on a synthetic checkpoint of the recipe's model with this
    many layers (kvant.app.rehearsal), into `<out>-rehearsal-<N>l`; nothing there is published.
    ``work`` (rehearsals only) scales the recipe's counts (calibration samples, imatrix
    chunks, scored tokens) for a quicker run. ``rebuild``: rebuild a finished artifact made
    from other settings, source or texts than the recipe's (else such a run is refused).
    """
    recipe = load_recipe(recipe_path)
    if work != 1.0:
        if rehearse is None:
            raise SettingsError("--work applies to --rehearse runs only")
        recipe = scale_work(recipe, work)
    rel = recipe.release
    if calib:
        rel["calib"] = calib
    name = rel["name"]
    root = Path(rel.get("out", f"out/release/{name}"))
    calib_text = rel.get("calib", "nob-train,nno-train")
    if rehearse is not None:
        if push_org:
            raise SettingsError("--rehearse runs on random weights and is never pushed; "
                                "drop --push")
        root = root.with_name(f"{root.name}-rehearsal-{rehearse}l")
        model, source = _rehearsal_model(rel, rehearse, calib_text, cache_dir, data_dir,
                                         progress)
    else:
        model, source = _model(rel, calib_text, cache_dir, data_dir, progress)
    artifacts = plan_artifacts(recipe)
    bench = bench_settings(recipe)
    root.mkdir(parents=True, exist_ok=True)
    finished = False
    with recording() as steps:
        try:
            _build(root, model, source, artifacts, bench, cache_dir, data_dir,
                   progress, rehearse is not None, rebuild)
            tasks = _task_eval(root, model, artifacts, recipe.get("eval"), bench.langs,
                               rehearse is not None, work, cache_dir, data_dir)
            with step("depth study", ctx=bench.depth_ctx):
                at_depth = _depth_study(root, model, source, artifacts, bench,
                                        cache_dir, data_dir)
            with step("cards"):
                _cards(root, recipe_path, name, model, source, artifacts, bench,
                       at_depth, tasks, calib)
            finished = True
        finally:
            if rehearse is not None:  # a failed rehearsal still shows the steps it ran
                try:
                    data = write_rehearsal(root, steps, read_config(model),
                                           SHAPES[source["shape"]].n_layers, work, finished)
                except Exception:
                    if finished:
                        raise
                    # the error that stopped the run is the one to see: this one is logged
                    logger.exception("the rehearsal's table of the steps it ran could not "
                                     "be written")
    if rehearse is not None:
        return root, [f"rehearsal: {root / REHEARSAL_TABLE}", f"rehearsal data: {data}"]
    plan, left_out = upload_plan(root, push_org or "ORG", name, list(artifacts))
    skipped = [f"not uploaded (not part of the release): {rel}" for rel in left_out]
    if push_org:
        problems = verify_release(root, list(artifacts))
        if problems:  # before the first byte goes up
            raise ArtifactError(f"not pushing: {problems[0]} ({len(problems)} problem(s)); "
                                "rebuild with `kvant release` and push again")
        _push(plan, token, public)
        return root, [*skipped, *(f"uploaded {p['repo']}/{p['path']}" for p in plan)]
    visibility = "public" if public else "private"
    return root, [*skipped, *(f"would upload {p['repo']} ({visibility}): {p['path']} "
                              f"({p['size_bytes']:,} bytes)" for p in plan)]


def _push(plan: list[dict], token: str | None, public: bool) -> None:
    """Each repo of ``plan`` in one commit (huggingface_hub's create_commit): a failure
    midway leaves that repo as it was, never half a model that looks published."""
    from huggingface_hub import CommitOperationAdd, HfApi  # network client: only when pushing

    if not token:
        raise SettingsError("--push needs a Hugging Face token: set HF_TOKEN")
    api = HfApi(token=token)
    for repo in dict.fromkeys(p["repo"] for p in plan):
        api.create_repo(repo, exist_ok=True, private=not public)
        api.create_commit(repo_id=repo, commit_message="Kvant release", operations=[
            CommitOperationAdd(path_in_repo=item["path"], path_or_fileobj=str(item["local"]))
            for item in plan if item["repo"] == repo])
