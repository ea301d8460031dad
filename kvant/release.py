"""`kvant release RECIPE`: build, benchmark and card every artifact of a recipe.

App layer: it drives the pipelines (through kvant.pipelines) and the bench.
Every artifact is an atomic Kvant folder, so a killed release resumes: finished artifacts
whose checksums verify are kept, the rest are built. `--push ORG` uploads with
huggingface_hub; without it the exact upload list is printed instead.

Recipe schema (TOML), every key optional except release.name and release.model:

    [release]  name, model (hub id, folder, or "@stand-in"), out, calib, langs, eval_tokens
    [gguf]     types, imatrix, imatrix_chunks, pre
    [gptq]     bits, group_size, desc_act, sym, damp, samples, seqlen
    [bnb]      modes, double_quant, compute_dtype
    [onnx]     precision, provider, block_size, accuracy_level
    [bench]    ctx, n_new, repeats, quality_ctx, quality_tokens, peer_checks, threads
"""

from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvant.artifact import amend_artifact, verify_artifact
from kvant.bench.run import run_bench
from kvant.bench.settings import BenchSettings
from kvant.data import get_mix, get_text
from kvant.errors import ArtifactError, SettingsError
from kvant.files import sha256_file
from kvant.model import content_hash, model_source, pick_device, read_config
from kvant.pipelines import PIPELINES
from kvant.plan import entry_kind, fit_overhead, peak_bytes, shape_of
from kvant.registry import nearest
from kvant.release_cards import (
    INDEX_FILES,
    PLOTS,
    artifact_section,
    index_card,
    upload_plan,
    verify_release,
    write_json,
)
from kvant.runtimes import targets as find_targets
from kvant.tiny import TinyRecipe, build_tiny, default_dir

logger = logging.getLogger(__name__)

RECIPE_SCHEMA = {
    "release": {"name", "model", "out", "calib", "langs", "eval_tokens"},
    "gguf": {"types", "imatrix", "imatrix_chunks", "pre"},
    "gptq": {"bits", "group_size", "desc_act", "sym", "damp", "samples", "seqlen"},
    "bnb": {"modes", "double_quant", "compute_dtype"},
    "onnx": {"precision", "provider", "block_size", "accuracy_level"},
    "bench": {"ctx", "n_new", "repeats", "quality_ctx", "quality_tokens", "peer_checks",
              "threads"},
}
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
    return Recipe(Path(path), data)


def _tuple(value):
    return tuple(str(v) for v in value) if isinstance(value, list) else value


def plan_artifacts(recipe: Recipe) -> dict[str, tuple[str, object]]:
    """{artifact folder name: (pipeline key, settings)} in build order."""
    rel = recipe.release
    name = rel["name"]
    common = {"eval_langs": _tuple(rel.get("langs", ["nob", "nno", "sme", "dan", "swe"])),
              "eval_tokens": rel.get("eval_tokens", 2048)}
    calib = {"calib": rel["calib"]} if rel.get("calib") else {}
    wanted: list[tuple[str, dict]] = []
    if (g := recipe.get("gguf")) is not None:
        wanted.append(("gguf", {**{k: _tuple(v) for k, v in g.items()}, **common, **calib}))
    if (q := recipe.get("gptq")) is not None:
        wanted.append(("gptq", {**q, **common, **calib}))
    if (b := recipe.get("bnb")) is not None:
        extra = {k: v for k, v in b.items() if k != "modes"}
        for mode in b.get("modes", ["nf4"]):
            wanted.append(("bnb", {"mode": mode, **({} if mode == "int8" else extra), **common}))
    if (o := recipe.get("onnx")) is not None:
        wanted.append(("onnx", {**o, **common}))
    out: dict[str, tuple[str, object]] = {}
    for key, args in wanted:
        pipeline = PIPELINES[key]
        try:
            settings = pipeline.settings(**args)
        except TypeError as exc:
            raise SettingsError(f"recipe '{recipe.path}': {exc}") from None
        out[pipeline.folder(name, settings)] = (key, settings)
    return out


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
        return path, {"id": "kvant-stand-in", "content_hash": content_hash(path)}
    return model_source(spec)


def run_release(recipe_path: Path, *, cache_dir: Path, data_dir: Path | None = None,
                calib: str | None = None, push_org: str | None = None,
                token: str | None = None, public: bool = False,
                progress: bool = False) -> tuple[Path, list[str]]:
    """Build, bench and card everything; return the release folder and the upload lines."""
    recipe = load_recipe(recipe_path)
    rel = recipe.release
    if calib:
        rel["calib"] = calib
    name = rel["name"]
    root = Path(rel.get("out", f"out/release/{name}"))
    root.mkdir(parents=True, exist_ok=True)
    model, source = _model(rel, rel.get("calib", "nob-train,nno-train"), cache_dir, data_dir,
                           progress)
    artifacts = plan_artifacts(recipe)
    for folder, (key, settings) in artifacts.items():
        out = root / folder
        if _complete(out):
            logger.info("keeping finished %s", out)
            continue
        logger.info("building %s", out)
        PIPELINES[key].run(model, out, settings, source=source, cache_dir=cache_dir,
                           data_dir=data_dir, force=True, progress=progress,
                           device=pick_device())

    bench_args = {k: (tuple(str(c) for c in v) if k == "ctx" else v)
                  for k, v in (recipe.get("bench") or {}).items()}
    langs = tuple(rel.get("langs", ["nob", "nno", "sme", "dan", "swe"]))
    # every artifact here was just verified against its manifest (_complete) or just written
    # by this run: the bench checks sizes, not sha256 a second time (minutes at 11.4B)
    bench_settings = replace(BenchSettings(**bench_args), langs=langs, verify=False)
    run_bench([root / f for f in artifacts], model, bench_settings, root / "bench",
              cache_dir=cache_dir, data_dir=data_dir, progress=progress)
    results = json.loads((root / "bench" / "results.json").read_text())
    targets = results["targets"]
    ctx = bench_settings.ctx[0]
    folders = {f: [t.name for t in find_targets(root / f)] for f in artifacts}
    shape = shape_of(read_config(model))
    fitted, _ = fit_overhead(results, shape)
    shipped = {n for names in folders.values() for n in names}  # never the reference model
    predicted = {}
    for tname in shipped:
        if (k := entry_kind(targets[tname], shape)) is not None:
            predicted[tname] = peak_bytes(shape, k, PLAN_CTX, targets[tname]["size_bytes"],
                                          fitted)
    plots = {p: root / "bench" / p for p in PLOTS}
    for folder, names in folders.items():
        amend_artifact(root / folder, card_section=artifact_section(targets, names, ctx),
                       files=plots, validation={"bench": {n: targets[n] for n in names}})
    recipe_text = Path(recipe_path).read_text(encoding="utf-8")
    (root / "recipe.toml").write_text(recipe_text, encoding="utf-8")
    (root / "README.md").write_text(index_card(name, source["id"], recipe_text, targets,
                                               folders, predicted, ctx, PLAN_CTX),
                                    encoding="utf-8")
    write_json(root / "release.json", {"name": name, "source": source,
                                       "artifacts": {f: k for f, (k, _) in artifacts.items()}})
    (root / "SHA256SUMS").write_text("".join(
        f"{sha256_file(root / rel)}  {rel}\n" for rel in INDEX_FILES
        if rel != "SHA256SUMS" and (root / rel).is_file()), encoding="utf-8")
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
    from huggingface_hub import HfApi  # network client: only when pushing

    if not token:
        raise SettingsError("--push needs a Hugging Face token: set HF_TOKEN")
    api = HfApi(token=token)
    for repo in dict.fromkeys(p["repo"] for p in plan):
        api.create_repo(repo, exist_ok=True, private=not public)
        for item in (p for p in plan if p["repo"] == repo):
            api.upload_file(path_or_fileobj=item["local"], path_in_repo=item["path"],
                            repo_id=repo)
