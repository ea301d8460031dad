"""What a resumed release keeps: a finished artifact whose checksums verify and whose
manifest records the settings, source model and texts the recipe asks for now; one made from
anything else is refused before any work, naming what changed, or rebuilt with --rebuild."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kvant.app.recipe import gptq_input
from kvant.artifact import read_manifest, settings_dict, verify_artifact
from kvant.data import get_mix, get_text
from kvant.errors import ArtifactError, SettingsError
from kvant.files import sha256_file

logger = logging.getLogger(__name__)


def current_data(settings, cache_dir: Path, data_dir: Path | None) -> dict[str, str]:
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

def as_json(value) -> str:
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
            changes.append(f"{key}.{name}: {as_json(made.get(name))} -> "
                           f"{as_json(wanted.get(name))}")
    was = manifest.get("source", {})
    for name in ("id", "revision", "content_hash"):
        if was.get(name) != source.get(name):
            changes.append(f"source {name}: {as_json(was.get(name))} -> "
                           f"{as_json(source.get(name))}")
    for entry in manifest.get("data", []):
        now = data.get(entry.get("name"))
        if now is not None and now != entry.get("sha256"):
            changes.append(f"text '{entry['name']}' changed (sha256 {entry['sha256'][:12]} -> "
                           f"{now[:12]})")
    return changes

def verified(folder: Path) -> bool:
    try:
        return folder.is_dir() and verify_artifact(folder) == []
    except ArtifactError:
        return False

def to_build(root: Path, source: dict, artifacts: dict, cache_dir: Path,
              data_dir: Path | None, rebuild: bool) -> dict:
    """The artifacts a resumed release must build: every one not finished, and (with
    ``rebuild``) every finished one made from other inputs; without ``rebuild`` such a one
    is refused, before any work, naming the first change."""
    todo = {}
    for folder, (key, settings) in artifacts.items():
        if not verified(root / folder):
            todo[folder] = (key, settings)
            continue
        changes = resume_changes(root / folder, key, settings, source,
                                 current_data(settings, cache_dir, data_dir))
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
    made_from = {f: gptq_input(artifacts, s) for f, (k, s) in artifacts.items() if k == "onnx"}
    return {f: a for f, a in artifacts.items() if f in todo or made_from.get(f) in todo}
