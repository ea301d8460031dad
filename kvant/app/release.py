"""`kvant release RECIPE`: build, benchmark and card every artifact of a recipe.

App layer: it drives the pipelines (through kvant.app.pipelines) and the bench.
Every artifact is an atomic Kvant folder, so a killed release resumes: a finished artifact
is kept when its checksums verify and its manifest records the settings, source model and
text sets the recipe asks for now (kvant.app.resume); one made from anything else is refused,
naming what changed, unless `--rebuild`. `--push ORG` uploads with huggingface_hub; without
it the exact upload list is printed instead.

The recipe, its schema and what it asks for are kvant.app.recipe's; what a resumed release
keeps is kvant.app.resume's.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from kvant.app.pipelines import PIPELINES
from kvant.app.recipe import (
    bench_settings,
    effective_recipe,
    gptq_input,
    load_recipe,
    plan_artifacts,
)
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
from kvant.app.resume import to_build, verified
from kvant.artifact import (
    amend_artifact,
)
from kvant.bench.depth import depth, documents
from kvant.bench.depth import table as depth_table
from kvant.bench.run import quality_windows, run_bench, texts_for
from kvant.bench.settings import BenchSettings
from kvant.data import get_mix, get_text, paragraphs
from kvant.errors import ArtifactError, SettingsError
from kvant.export.gguf import measures_mix
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
from kvant.runtimes.reference import reference_logits, reference_matches
from kvant.runtimes.targets import targets as find_targets
from kvant.scoring import eval_windows
from kvant.synth import SHAPES, synthesize
from kvant.tiny import TinyRecipe, build_tiny, default_dir

logger = logging.getLogger(__name__)


REHEARSAL_EVAL_DOCS = 40  # cloze documents (4 requests each) a full-work rehearsal times
PLAN_CTX = 4096  # the context "Which to pick" plans for


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
                      cache_dir: Path, data_dir: Path | None, rehearsal: bool = False) -> None:
    """The reference distributions of every window any pipeline or the bench scores (a
    -MIX's calibration windows included), computed with the model loaded once
    (kvant.runtimes.reference_logits), into ``folder``."""
    wins: dict[str, list[list[int]]] = {}
    synthetic = model_info(model).synthetic
    for key, settings in artifacts.values():
        texts = {lang: get_text(lang, cache_dir, data_dir) for lang in settings.eval_langs}
        for lang, lang_wins in eval_windows(model, texts, settings.eval_tokens,
                                            settings.eval_ctx).items():
            wins.setdefault(f"{lang}@{settings.eval_ctx}", lang_wins)
        if key == "gguf" and measures_mix(settings, synthetic, rehearsal):
            from kvant.export.gguf_pipeline import calibration_windows  # llama.cpp's

            calib = get_mix(settings.calib, cache_dir, data_dir)
            for name, calib_wins in calibration_windows(model, settings, calib).items():
                wins.setdefault(f"{name}@{settings.calib}", calib_wins)
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
    if not verified(folder):
        text = get_mix(calib, cache_dir, data_dir, progress)
        synthesize(folder, shape, paragraphs(text.read())[:20000], layers, force=True,
                   progress=progress)
    return folder, {"id": f"kvant-synth/{shape}", "shape": shape, "layers": layers,
                    "content_hash": content_hash(folder)}


def _build(root: Path, model: Path, source: dict, artifacts: dict, bench: BenchSettings,
           cache_dir: Path, data_dir: Path | None, progress: bool, rehearsal: bool,
           rebuild: bool = False) -> None:
    """Every artifact (resuming: a finished one is kept when it was made from what the recipe
    asks for now, see kvant.app.resume.to_build; a rehearsal builds all anew), each scored
    against one shared reference, then the bench."""
    reference = root / ".reference"  # scratch: the distributions every artifact is scored on
    stamp = reference / "reference.json"
    if stamp.is_file() and (rehearsal or not reference_matches(reference, model)):
        # Kvant's own scratch, left by a killed run: reused by a release that resumes, but
        # not when it came from other weights, nor by a rehearsal (which measures it)
        shutil.rmtree(reference)
    todo = dict(artifacts) if rehearsal else to_build(root, source, artifacts, cache_dir,
                                                          data_dir, rebuild)
    if rehearsal:
        # measure every step anew: the bench's and [eval]'s kept scores would skip theirs
        (root / "bench" / "results.json").unlink(missing_ok=True)
        shutil.rmtree(root / "eval", ignore_errors=True)  # Kvant's own, in the rehearsal folder
    _shared_reference(model, todo, bench, reference, cache_dir, data_dir, rehearsal)
    for folder, (key, settings) in todo.items():
        logger.info("building %s", root / folder)
        inputs = {"gptq_dir": root / g} if key == "onnx" and (
            g := gptq_input(artifacts, settings)) else {}
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
