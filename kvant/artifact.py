"""Atomic artifact folders with a manifest, checksums and a model card.

Every pipeline writes through :class:`ArtifactWriter`::

    with ArtifactWriter(out, fmt="gguf", force=False) as art:
        (art.dir / "model-Q4_K_M.gguf").write_bytes(...)
        art.settings = asdict(settings)
        art.card_body = "..."
    # only now does `out` exist, complete with manifest.json, SHA256SUMS and README.md

The files go to a hidden sibling folder ``.<name>.partial-<pid>`` that is renamed into place
when the block ends without error, so a killed run never leaves anything that looks finished.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import json
import logging
import os
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from kvant import __version__
from kvant.errors import ArtifactError
from kvant.files import sha256_file
from kvant.model import read_config, refuse_quantized, refuse_synthetic, require_tokenizer
from kvant.paths import looks_like_hub_id

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CHECKSUMS = "SHA256SUMS"
CARD = "README.md"
# Libraries whose versions decide what an artifact contains; recorded when installed.
TRACKED_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate",
                     "gptqmodel", "optimum", "bitsandbytes", "gguf", "llama_cpp_python",
                     "onnx", "onnxruntime", "onnxruntime-genai", "onnx-ir", "huggingface_hub",
                     "mlx", "mlx-lm")
CARD_LANGUAGES = ("no", "nb", "nn", "se")


def installed_versions(names) -> dict[str, str]:
    """{distribution: version} of those of ``names`` that are installed."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def library_versions() -> dict[str, str]:
    return {"python": sys.version.split()[0], "kvant": __version__,
            **installed_versions(TRACKED_LIBRARIES)}


def settings_dict(settings) -> dict:
    """A settings dataclass as JSON-ready dict (tuples as lists), for manifests."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


def check_free_space(folder: Path, need_bytes: int) -> None:
    """Refuse early when ``folder``'s disk cannot hold ``need_bytes`` more."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise ArtifactError(f"not enough disk space in '{folder}': need {need_bytes / 2**30:.2f} "
                            f"GiB, {free / 2**30:.2f} GiB free; free space or pass --out on "
                            "another disk")


def is_kvant_artifact(folder: Path) -> bool:
    """A finished folder Kvant wrote: its manifest.json names the schema, Kvant's version
    and the files it holds."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"schema_version", "kvant_version",
                                           "files"} <= set(manifest)


def refuse_existing(out: Path, force: bool, protect: tuple[Path, ...] = ()) -> None:
    """Re-runs refuse rather than overwrite; call it first, before hours of work.

    ``--force`` replaces only a finished Kvant artifact, and never a folder in ``protect``
    (the input model) nor one that contains it.
    """
    out = Path(out)
    _restore_swapped_out(out)
    for kept in protect:
        kept = Path(kept).resolve()
        if out.resolve() == kept or out.resolve() in kept.parents:
            raise ArtifactError(f"--out '{out}' is the input model '{kept}' or holds it; "
                                "choose another --out")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ArtifactError(f"'{out}' already exists; pass --force to replace it or choose "
                            "another --out")
    if not out.is_dir() or out.is_symlink() or not is_kvant_artifact(out):
        raise ArtifactError(f"--force replaces only a finished Kvant artifact, and '{out}' is "
                            "not one (no Kvant manifest.json); move it away yourself or "
                            "choose another --out")


def check_input(model_dir: Path, out: Path, force: bool, allow_synthetic: bool = False
                ) -> dict:
    """What every pipeline refuses before any work, in this order: an existing ``out``
    (:func:`refuse_existing`), a quantized model, synthetic weights (unless
    ``allow_synthetic``: a rehearsal), a model without tokenizer.json; returns its
    config.json."""
    refuse_existing(out, force, protect=(model_dir,))
    refuse_quantized(model_dir)
    if not allow_synthetic:
        refuse_synthetic(model_dir)
    require_tokenizer(model_dir)
    return read_config(model_dir)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _restore_swapped_out(out: Path) -> None:
    """Put back a finished artifact that a killed ``--force`` run had moved aside
    (``.NAME.old-PID``) before its replacement was in place: the only finished copy."""
    if out.exists():
        return
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)) and is_kvant_artifact(old):
            old.rename(out)
            logger.warning("restored %s from %s, left by an interrupted --force run", out, old)
            return


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux's renameat2 with RENAME_EXCHANGE), so no
    moment exists at which neither is in place; False where the system has no such call.

    Through ctypes because Python's os module has no renameat2 and no library Kvant uses
    wraps it."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a libc older than glibc 2.28
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE):
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or filesystem
            return False
        raise OSError(err, os.strerror(err), str(a), None, str(b))
    return True


def _staging(out: Path) -> Path:
    """A fresh, empty staging folder for ``out`` (``.NAME.partial-PID``), after removing what
    killed runs left beside it."""
    _remove_stale_partials(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _remove_stale_partials(out: Path) -> None:
    """Delete the staging (and swapped-out) folders of ``out`` left by runs that were killed:
    only Kvant names them so, and only for processes that no longer run."""
    for pattern in (f".{out.name}.partial-*", f".{out.name}.old-*"):
        for partial in out.parent.glob(pattern):
            pid = partial.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                logger.warning("removing %s left by an interrupted run", partial)
                shutil.rmtree(partial, ignore_errors=True)


# Below this much free space a failure is taken for a full disk: tools (llama-quantize) and
# numpy's tofile report it without errno ("1048576 requested and 848864 written").
DISK_FULL_MARGIN = 16 * 2**20


def _disk_full(exc: BaseException, folder: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_MARGIN
    except OSError:
        return False


def published_arg(arg: str) -> str:
    """A command-line argument as a published card or manifest shows it: each local path in
    it (``--calib /home/me/texts/a.txt``, ``--out=/tmp/x``, ``a.txt:0.5,nob-train``) by its
    file or folder name, never the publisher's folders; anything else as it is.

    >>> published_arg("--out=/tmp/run/tiny-gguf"), published_arg("norallm/normistral-11b-long")
    ('--out=tiny-gguf', 'norallm/normistral-11b-long')
    """
    flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if not eq:
        flag, value = "", arg
    parts = []
    for part in value.split(","):
        name, colon, share = part.partition(":")
        path = Path(name).expanduser()
        if os.sep in name and (path.is_absolute() or path.exists()):
            name = path.name
        parts.append(f"{name}{colon}{share}")
    return f"{flag}{eq}{','.join(parts)}"


@dataclass
class ArtifactWriter:
    """Stage an artifact folder and publish it atomically with manifest, checksums and card."""

    out: Path
    fmt: str
    force: bool = False
    source: dict = field(default_factory=dict)
    """Source model: {"id": hub id or path, "revision" or "content_hash": ...}."""
    settings: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    data: list[dict] = field(default_factory=list)
    """Text sets used (calibration, evaluation), each with its sha256."""
    kinds: dict[str, str] = field(default_factory=dict)
    """What each model in the folder is: {target name: kind key}, e.g.
    {"normistral-11b-long-Q4_K_M": "gguf-q4_k_m"} (kvant.plan reads these, never file names)."""
    warnings: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    title: str = ""
    card_body: str = ""
    command: str = ""
    protect: tuple[Path, ...] = ()
    """Folders --force must never replace (the input model)."""
    dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.command:  # shell-quoted, so that it reruns as written
            self.command = shlex.join(["kvant", *map(published_arg, sys.argv[1:])]) \
                if sys.argv[0].endswith("kvant") else ""

    @property
    def scratch(self) -> Path:
        """Work space inside the staging folder: gone with it on failure, removed before
        publishing, and cleaned with it by the next run if this one is killed."""
        path = self.dir / ".scratch"
        path.mkdir(exist_ok=True)
        return path

    def __enter__(self) -> ArtifactWriter:
        refuse_existing(self.out, self.force, self.protect)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = _staging(self.out)
        return self

    def warn(self, message: str) -> None:
        """A WARNING in the log and a line in the manifest: nothing degrades silently."""
        logger.warning(message)
        self.warnings.append(message)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            try:
                self._publish()
                return False
            except BaseException as publish_exc:
                self._fail(publish_exc)
                raise
        self._fail(exc)
        return False

    def _fail(self, exc: BaseException) -> None:
        """Remove the staging folder; a full disk becomes one clear error."""
        full = not isinstance(exc, KeyboardInterrupt) and _disk_full(exc, self.dir.parent)
        shutil.rmtree(self.dir, ignore_errors=True)
        if full:
            raise ArtifactError(f"disk full while writing '{self.out}'; free space or pass "
                                "--out on another disk (nothing was published)") from exc

    def _publish(self) -> None:
        shutil.rmtree(self.dir / ".scratch", ignore_errors=True)
        write_model_card(self.dir, title=self.title or self.out.name, fmt=self.fmt,
                         base_model=self.source.get("id"), tags=self.tags,
                         command=self.command, body=self.card_body)
        manifest = build_manifest(self.dir, fmt=self.fmt, source=self.source,
                                  settings=self.settings, validation=self.validation,
                                  data=self.data, warnings=self.warnings, command=self.command,
                                  kinds=self.kinds)
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        swap_into_place(self.dir, self.out)
        logger.info("wrote %s", self.out)


def swap_into_place(staging: Path, out: Path) -> None:
    """Publish the finished folder ``staging`` as ``out``, replacing a finished ``out`` if
    there is one: swapped in one step where the system can, else two renames that a run
    killed between them leaves for the next run to undo (_restore_swapped_out)."""
    if not out.exists():
        staging.rename(out)
    elif exchange(staging, out):  # staging now holds the old artifact
        shutil.rmtree(staging, ignore_errors=True)
    else:
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)


def _artifact_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, CHECKSUMS))


def build_manifest(folder: Path, *, fmt: str, source: dict, settings: dict, validation: dict,
                   data: list[dict], warnings: list[str], command: str,
                   kinds: dict[str, str] | None = None, known: dict[str, str] | None = None
                   ) -> dict:
    """The manifest of ``folder``; also writes SHA256SUMS (``sha256sum -c`` format).
    ``known``: {path: sha256} of files just verified, not hashed again."""
    files = []
    for path in _artifact_files(folder):
        rel = path.relative_to(folder).as_posix()
        digest = (known or {}).get(rel) or sha256_file(path)
        files.append({"path": rel, "size_bytes": path.stat().st_size, "sha256": digest})
    (folder / CHECKSUMS).write_text("".join(f"{f['sha256']}  {f['path']}\n" for f in files),
                                    encoding="utf-8")
    return {
        "schema_version": SCHEMA_VERSION,
        "kvant_version": __version__,
        "format": fmt,
        "kinds": dict(kinds or {}),
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "source": source,
        "settings": settings,
        "data": data,
        "libraries": library_versions(),
        "files": files,
        "warnings": list(warnings),
        "validation": validation,
    }


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"'{folder}' has no {MANIFEST}: it was not written by Kvant or its "
                            "run did not finish; rebuild it")
    return json.loads(path.read_text(encoding="utf-8"))


def verify_artifact(folder: Path) -> list[str]:
    """Problems found when checking every file against the manifest (empty when intact)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    listed = {f["path"] for f in manifest["files"]}
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            problems.append(f"missing {entry['path']}")
        elif path.stat().st_size != entry["size_bytes"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"checksum mismatch {entry['path']}")
    for path in _artifact_files(folder):
        if path.relative_to(folder).as_posix() not in listed:
            problems.append(f"unlisted {path.relative_to(folder).as_posix()}")
    return problems


def card_metadata(base_model: str | None, tags) -> str:
    """The YAML front matter of a Hugging Face model card (base_model only for a hub id),
    written by huggingface_hub (which quotes `no`, Norwegian, that YAML would read as false)."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=base_model if base_model and looks_like_hub_id(base_model) else None,
        license="apache-2.0", language=list(CARD_LANGUAGES),
        tags=list(dict.fromkeys(["kvant", "normistral", *tags])))
    return f"---\n{data.to_yaml()}\n---\n"


def write_model_card(folder: Path, *, title: str, fmt: str, base_model: str | None, tags,
                     command: str, body: str) -> Path:
    """A Hugging Face model card: YAML metadata, then what the artifact is and how it was made.

    ``base_model`` is written only when it is a hub id (a local path means nothing on the Hub).
    """
    meta = card_metadata(base_model, [fmt, *tags])
    made_by = command or "(library call)"
    text = (f"{meta}\n# {title}\n\n{body.strip()}\n\n## How it was made\n\n"
            f"Made with Kvant {__version__} (format `{fmt}`):\n\n```\n{made_by}\n```\n\n"
            "`manifest.json` lists every file with its size and sha256, the settings, the "
            "source model, the library versions and the validation results; `SHA256SUMS` "
            "checks the files with `sha256sum -c SHA256SUMS`.\n")
    path = Path(folder) / CARD
    path.write_text(text, encoding="utf-8")
    return path


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (no copy of gigabytes, the file untouched), or a
    copy where the filesystem has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def amend_artifact(folder: Path, *, card_section: str, files: dict[str, Path],
                   validation: dict | None = None) -> None:
    """Add files and a model-card section to a finished artifact, with a fresh manifest and
    checksums, published as a new artifact is: staged beside it and swapped in, so a crash
    leaves the old artifact as it was.

    The folder must still match its manifest: a file changed since it was published is
    refused, never given a fresh valid checksum. Files kept are hard links in the staging
    folder (their bytes and times untouched)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = verify_artifact(folder)
    if problems:
        raise ArtifactError(f"'{folder}' no longer matches its manifest ({problems[0]}"
                            + (f", and {len(problems) - 1} more" if len(problems) > 1 else "")
                            + "); it was changed after it was published: rebuild it")
    replaced = {*files, CARD, MANIFEST, CHECKSUMS}
    # just verified, and kept as links to the same files: their digests stand
    known = {f["path"]: f["sha256"] for f in manifest["files"] if f["path"] not in replaced}
    staging = _staging(folder)
    try:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_dir():
                (staging / rel).mkdir(exist_ok=True)
            elif rel not in replaced:
                _link_or_copy(path, staging / rel)
        for name, src in files.items():
            shutil.copyfile(src, staging / name)
        card = (folder / CARD).read_text(encoding="utf-8")
        marker = "\n## Benchmark\n"
        card = card.split(marker)[0].rstrip() + "\n" + marker + "\n" + card_section.strip() + "\n"
        (staging / CARD).write_text(card, encoding="utf-8")
        if validation:
            manifest["validation"] = {**manifest.get("validation", {}), **validation}
        fresh = build_manifest(staging, fmt=manifest["format"], source=manifest["source"],
                               settings=manifest["settings"], validation=manifest["validation"],
                               data=manifest["data"], warnings=manifest["warnings"],
                               command=manifest["command"], kinds=manifest.get("kinds"),
                               known=known)
        fresh["created_utc"] = manifest["created_utc"]
        (staging / MANIFEST).write_text(json.dumps(fresh, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
        swap_into_place(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@dataclass(frozen=True)
class PipelineOutput:
    """What a pipeline made: the published folder and the kind of each model in it."""

    out: Path
    kinds: dict[str, str]
    """{target name: artifact kind}, as recorded in the manifest (e.g. gguf-q4_k_m)."""
