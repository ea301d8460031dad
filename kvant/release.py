"""`kvant release RECIPE`: build, benchmark and card every artifact of a recipe.

The top of the import chain: it drives quantize/, export/ and bench/ (imported lazily).
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
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from kvant.errors import ArtifactError, SettingsError
from kvant.registry import nearest

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
BUDGETS_GB = (8, 12, 16, 24)
# Never published: the evaluation and calibration texts may not be republished stand-alone.
_FORBIDDEN_SUFFIXES = (".conllu", ".ud-test.txt", ".calib-1000.txt", ".narc-train.txt")


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
    """{artifact folder name: (kind, settings)} in build order."""
    from kvant.export.gguf import GGUFSettings
    from kvant.export.onnx import ONNXSettings
    from kvant.quantize.bnb import BnbSettings
    from kvant.quantize.gptq import GPTQSettings

    rel = recipe.release
    name = rel["name"]
    common = {"eval_langs": _tuple(rel.get("langs", ["nob", "nno", "sme", "dan", "swe"])),
              "eval_tokens": rel.get("eval_tokens", 2048)}
    calib = rel.get("calib")
    out: dict[str, tuple[str, object]] = {}
    try:
        if (g := recipe.get("gguf")) is not None:
            args = {k: _tuple(v) for k, v in g.items()}
            out[f"{name}-gguf"] = ("gguf", GGUFSettings(**args, **common,
                                                        **({"calib": calib} if calib else {})))
        if (q := recipe.get("gptq")) is not None:
            out[f"{name}-gptq-{q.get('bits', 4)}bit"] = ("gptq", GPTQSettings(
                **q, **common, **({"calib": calib} if calib else {})))
        if (b := recipe.get("bnb")) is not None:
            extra = {k: v for k, v in b.items() if k != "modes"}
            for mode in b.get("modes", ["nf4"]):
                out[f"{name}-bnb-{mode}"] = ("bnb", BnbSettings(
                    mode=mode, **({} if mode == "int8" else extra), **common))
        if (o := recipe.get("onnx")) is not None:
            out[f"{name}-onnx-{o.get('precision', 'int4')}"] = ("onnx",
                                                                 ONNXSettings(**o, **common))
    except TypeError as exc:
        raise SettingsError(f"recipe '{recipe.path}': {exc}") from None
    return out


def _complete(folder: Path) -> bool:
    from kvant.artifact import verify_artifact

    try:
        return folder.is_dir() and verify_artifact(folder) == []
    except ArtifactError:
        return False


def _build(kind: str, model: Path, out: Path, settings, source: dict, cache_dir: Path,
           data_dir: Path | None, progress: bool) -> None:
    from kvant.model import pick_device
    from kvant.pipelines import PIPELINES

    PIPELINES[kind].run(model, out, settings, source=source, cache_dir=cache_dir,
                        data_dir=data_dir, force=True, progress=progress,
                        device=pick_device())


def _model(release: dict, calib: str, cache_dir: Path, data_dir: Path | None,
           progress: bool) -> tuple[Path, dict]:
    from kvant.model import content_hash, model_source

    spec = release["model"]
    if spec == "@stand-in":
        from kvant.data import get_mix, get_text
        from kvant.tiny import TinyRecipe, build_tiny, default_dir

        train = get_mix(calib, cache_dir, data_dir, progress)
        recipe = TinyRecipe()
        path = build_tiny(default_dir(cache_dir, recipe, train), train,
                          get_text("nob", cache_dir, data_dir, progress), recipe,
                          progress=progress)
        return path, {"id": "kvant-stand-in", "content_hash": content_hash(path)}
    return model_source(spec)


def run_release(recipe_path: Path, *, cache_dir: Path, data_dir: Path | None = None,
                calib: str | None = None, push_org: str | None = None,
                token: str | None = None, progress: bool = False) -> tuple[Path, list[str]]:
    """Build, bench and card everything; return the release folder and the upload lines."""
    from dataclasses import replace

    from kvant.artifact import amend_artifact, sha256_file
    from kvant.bench.backends import targets as find_targets
    from kvant.bench.run import BenchSettings, run_bench
    from kvant.model import read_config
    from kvant.plan import _kind_of as kind_of
    from kvant.plan import fit_overhead, kinds, kv_bytes, overhead_bytes, shape_of
    from kvant.release_cards import (
        PLOTS,
        artifact_section,
        index_card,
        upload_plan,
        write_json,
    )

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
    for folder, (kind, settings) in artifacts.items():
        out = root / folder
        if _complete(out):
            logger.info("keeping finished %s", out)
            continue
        logger.info("building %s", out)
        _build(kind, model, out, settings, source, cache_dir, data_dir, progress)

    bench_args = {k: (tuple(str(c) for c in v) if k == "ctx" else v)
                  for k, v in (recipe.get("bench") or {}).items()}
    langs = tuple(rel.get("langs", ["nob", "nno", "sme", "dan", "swe"]))
    bench_settings = replace(BenchSettings(**bench_args), langs=langs)
    run_bench([root / f for f in artifacts], model, bench_settings, root / "bench",
              cache_dir=cache_dir, data_dir=data_dir, progress=progress)
    results = json.loads((root / "bench" / "results.json").read_text())
    targets = results["targets"]
    ctx = bench_settings.ctx[0]
    shape = shape_of(read_config(model))
    fitted, _ = fit_overhead(results, shape)
    predicted = {}
    for tname, entry in targets.items():
        kind = kind_of(tname, entry)
        if kind:
            predicted[tname] = (entry["size_bytes"] + kv_bytes(shape, kinds()[kind], 4096)
                                + overhead_bytes(kinds()[kind].stack, 4096, shape.vocab,
                                                 fitted))
    folders = {f: [t.name for t in find_targets(root / f)] for f in artifacts}
    plots = {p: root / "bench" / p for p in PLOTS}
    for folder, names in folders.items():
        amend_artifact(root / folder, card_section=artifact_section(targets, names, ctx),
                       files=plots, validation={"bench": {n: targets[n] for n in names}})
    recipe_text = Path(recipe_path).read_text(encoding="utf-8")
    (root / "recipe.toml").write_text(recipe_text, encoding="utf-8")
    (root / "README.md").write_text(index_card(name, source["id"], recipe_text, targets,
                                               folders, predicted, ctx), encoding="utf-8")
    index_files = [root / "README.md", root / "recipe.toml",
                   *sorted((root / "bench").glob("*"))]
    (root / "SHA256SUMS").write_text("".join(
        f"{sha256_file(f)}  {f.relative_to(root).as_posix()}\n" for f in index_files
        if f.is_file()), encoding="utf-8")
    write_json(root / "release.json", {"name": name, "source": source,
                                       "artifacts": {f: k for f, (k, _) in artifacts.items()}})
    plan = upload_plan(root, push_org or "ORG", name, list(artifacts))
    if push_org:
        _push(plan, token)
        return root, [f"uploaded {p['repo']}/{p['path']}" for p in plan]
    return root, [f"would upload {p['repo']}: {p['path']} ({p['size_bytes']:,} bytes)"
                  for p in plan]


def _push(plan: list[dict], token: str | None) -> None:
    from huggingface_hub import HfApi

    if not token:
        raise SettingsError("--push needs a Hugging Face token: set HF_TOKEN")
    api = HfApi(token=token)
    for repo in dict.fromkeys(p["repo"] for p in plan):
        api.create_repo(repo, exist_ok=True)
        for item in (p for p in plan if p["repo"] == repo):
            api.upload_file(path_or_fileobj=item["local"], path_in_repo=item["path"],
                            repo_id=repo)
