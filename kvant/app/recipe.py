"""A release recipe: its schema (TOML, built from the pipelines' settings classes), its
checks, what it asks for (the artifacts in build order, the bench), and the recipe as
published.

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
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvant.app.pipelines import PIPELINES
from kvant.artifact import published_arg
from kvant.bench.settings import BenchSettings
from kvant.errors import SettingsError
from kvant.files import sha256_file
from kvant.registry import nearest


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
        if settings.int4_algo == "gptq" and gptq_input(out, settings) is None:
            raise SettingsError(
                f"recipe '{recipe.path}': onnx.int4_algo = \"gptq\" builds from the recipe's "
                f"GPTQ artifact, and it has no [gptq] with bits = 4 and group_size = "
                f"{settings.block_size}; add one, set onnx.block_size to its group_size, or "
                "use int4_algo = \"k_quant_last\"")
    return out

def gptq_input(artifacts: dict, onnx) -> str | None:
    """The folder of the GPTQ artifact an ONNX int4 build from GPTQ reads (4-bit, its group
    size the ONNX block size), or None."""
    if onnx.int4_algo != "gptq" or onnx.precision != "int4":
        return None
    return next((f for f, (k, s) in artifacts.items() if k == "gptq" and s.bits == 4
                 and s.group_size == onnx.block_size), None)

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
