"""Named Norwegian text sets: pinned download, sha256 verification, cache, extraction.

Evaluation sets are the UD *test* treebanks of Bokmål, Nynorsk, North Sámi, Danish and
Swedish; the calibration default for users is the UD *train* splits of Bokmål, Nynorsk and
North Sámi at the same commits. Each set is pinned to a repository commit; a pinned sha256
must match or the file is refused. The train splits were never mirrored here, so their
sha256 cannot be pinned in advance: the digest of what was downloaded is recorded in the
cache and in every manifest that used it.

The texts are never copied into an artifact: the Norwegian Dependency Treebank's terms
forbid republishing them as stand-alone texts. Manifests record names, URLs and digests only.
"""

from __future__ import annotations

import logging
import re
import unicodedata
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from kvant.errors import DataError, SettingsError
from kvant.files import sha256_file, sha256_text
from kvant.registry import Registry, unknown_key_message

logger = logging.getLogger(__name__)

UD_RAW = "https://raw.githubusercontent.com/UniversalDependencies/{repo}/{commit}/{file}"
_CC_BY_SA = "CC BY-SA 4.0"
_NDT_TERMS = (_CC_BY_SA + "; NDT terms: the original texts may not be republished as "
              "stand-alone texts")
_NO_ATTR = "UD Norwegian: Øvrelid, Jørgensen, Hohle, Tollersrud, Dale, Solberg, Kåsen"
_SME_ATTR = "UD North Sámi Giella: Trosterud, Antonsen, Tyers"


@dataclass(frozen=True)
class TextSet:
    """A text set pinned to one file at one commit of a UD repository."""

    name: str
    repo: str
    commit: str
    file: str
    sha256: str | None
    """Pinned digest of the raw file; None where it could not be pinned in advance."""
    licence: str
    attribution: str
    role: str
    """'eval' (held-out test split), 'calib' (train split) or 'english' (comparison text)."""
    language: str
    underscores_to_spaces: bool = False
    """The Giella treebank writes multiword expressions as `dan_dihte` in `# text`."""

    @property
    def url(self) -> str:
        return UD_RAW.format(repo=self.repo, commit=self.commit, file=self.file)


TEXT_SETS: Registry[TextSet] = Registry("text set")
_NOB = ("UD_Norwegian-Bokmaal", "e83586ff8b324f147e767dccd7ed801b3666ca08")
_NNO = ("UD_Norwegian-Nynorsk", "d332ca7108148ceb6d38859affdc17462bcd9860")
_SME = ("UD_North_Sami-Giella", "5d84ca5b1c0498dfdb78482a79363c1cca61bb5f")
for _set in (
    TextSet("nob", *_NOB, "no_bokmaal-ud-test.conllu",
            "b45e4809d38ea560f0b164023b0f4c6d8f0d7731f66c4df129917bb06d1676f8",
            _NDT_TERMS, _NO_ATTR, "eval", "nb"),
    TextSet("nno", *_NNO, "no_nynorsk-ud-test.conllu",
            "d005008ca04a764e77791b0aa8da982e9a41ceef4303b71e30c304f5ffc7342f",
            _NDT_TERMS, _NO_ATTR, "eval", "nn"),
    TextSet("sme", *_SME, "sme_giella-ud-test.conllu",
            "d830948ca6e794918200a8698c1b70365a1e76dffa6b234e137352562b0b99fa",
            _CC_BY_SA, _SME_ATTR, "eval", "se", underscores_to_spaces=True),
    TextSet("dan", "UD_Danish-DDT", "85faf86dc39f735722925fb1e822070d83649068",
            "da_ddt-ud-test.conllu",
            "2232ee43dcd35dba32b476534d230edf1aa26d4bd830813f452fd829c276f737",
            _CC_BY_SA + " or GPL-2.0", "UD Danish DDT: Johannsen, Martínez Alonso, Plank",
            "eval", "da"),
    TextSet("swe", "UD_Swedish-Talbanken", "30067217d275233ed460d0c0abafeaf22d63a3d2",
            "sv_talbanken-ud-test.conllu",
            "b8909c4f5f2c64b3cee251de7004fa293717d309e54ca59d149a61d75e8571d7",
            _CC_BY_SA, "UD Swedish Talbanken: Nivre, Smith, Norrman", "eval", "sv"),
    TextSet("eng", "UD_English-EWT", "15d613d8447b3478787d4c278730a1e48a945efb",
            "en_ewt-ud-dev.conllu",
            "531a54ff90d6ab12201c5a50c3e78e6ddac4de69abc4bce5d275d3cd29efe2b6",
            _CC_BY_SA, "UD English EWT contributors", "english", "en"),
    TextSet("nob-train", *_NOB, "no_bokmaal-ud-train.conllu", None, _NDT_TERMS, _NO_ATTR,
            "calib", "nb"),
    TextSet("nno-train", *_NNO, "no_nynorsk-ud-train.conllu", None, _NDT_TERMS, _NO_ATTR,
            "calib", "nn"),
    TextSet("sme-train", *_SME, "sme_giella-ud-train.conllu", None, _CC_BY_SA, _SME_ATTR,
            "calib", "se", underscores_to_spaces=True),
):
    TEXT_SETS.add(_set.name, _set)

EVAL_SETS = tuple(k for k, s in TEXT_SETS.items() if s.role == "eval")


@dataclass(frozen=True)
class EvalSettings:
    """The held-out text every pipeline scores its own output on (the base of each
    pipeline's settings)."""

    eval_langs: tuple[str, ...] = EVAL_SETS
    """Held-out text sets scored (comma-separated: nob, nno, sme, dan, swe, eng, or paths
    of UTF-8 files)."""
    eval_tokens: int = 2048
    """Held-out tokens per language scored for KLD and top-1 agreement."""
    eval_ctx: int = 256
    """Tokens per scored window: each window starts afresh, as a user's prompt does."""

    def __post_init__(self) -> None:
        if min(self.eval_tokens, self.eval_ctx) <= 1:
            raise SettingsError("--eval-tokens and --eval-ctx must be above 1")


@dataclass(frozen=True)
class TextFile:
    """A UTF-8 text ready to use, and where it came from (for manifests)."""

    name: str
    path: Path
    sha256: str
    """Digest of the source file (the raw CoNLL-U for a named set)."""
    source: str
    licence: str = ""
    pinned: bool = False

    def as_manifest(self) -> dict:
        """Name, origin and digest only: the text itself never goes into an artifact."""
        entry = asdict(self)
        entry["path"] = self.path.name
        return entry

    def read(self) -> str:
        return self.path.read_text(encoding="utf-8")


_MARKER = re.compile(r"^# (newpar|newdoc)\b")
_TEXT = re.compile(r"^# text = ?(.*)$")


def conllu_to_text(conllu: str, underscores_to_spaces: bool = False) -> str:
    """Running text from the ``# text`` lines of a CoNLL-U file.

    With ``# newpar``/``# newdoc`` markers: one paragraph per line (its sentences joined by a
    space) and a blank line between paragraphs. Without markers: one sentence per line, since
    no paragraph boundary can be known. Whitespace runs become one space, ends are stripped.

    >>> conllu_to_text("# newpar\\n# text = Hei.\\n# text = Ha  det.\\n# newpar\\n# text = Ja.\\n")
    'Hei. Ha det.\\n\\nJa.\\n'
    """
    lines = conllu.splitlines()
    marked = any(_MARKER.match(line) for line in lines)
    paragraphs: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        if _MARKER.match(line):
            if current:
                paragraphs.append(current)
            current = []
        elif match := _TEXT.match(line):
            sentence = match.group(1)
            if underscores_to_spaces:
                sentence = sentence.replace("_", " ")
            sentence = unicodedata.normalize("NFC", " ".join(sentence.split()))
            if marked:
                current.append(sentence)
            else:
                paragraphs.append([sentence])
    if current:
        paragraphs.append(current)
    separator = "\n\n" if marked else "\n"
    return separator.join(" ".join(p) for p in paragraphs) + "\n"


def _download(url: str, dest: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, part.open("wb") as handle:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                      disable=not progress) as bar:
                while block := response.read(1 << 20):
                    handle.write(block)
                    bar.update(len(block))
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({exc}); check the connection, or pass "
                        "--data-dir (or set KVANT_DATA_DIR) to a folder holding the file") from exc
    part.rename(dest)


def fetch_raw(text_set: TextSet, cache_dir: Path, data_dir: Path | None = None,
              progress: bool = False) -> tuple[Path, str]:
    """The raw file of a set and its sha256, from ``data_dir`` (offline) or the cache."""
    if data_dir is not None:
        raw = Path(data_dir) / text_set.file
        if not raw.is_file():
            raise DataError(f"'{text_set.file}' (text set '{text_set.name}') is not in data dir "
                            f"'{data_dir}'; put the file there or drop --data-dir to download it")
    else:
        raw = Path(cache_dir) / "raw" / text_set.commit[:12] / text_set.file
        if not raw.is_file():
            logger.info("downloading %s", text_set.url)
            _download(text_set.url, raw, progress)
    digest = sha256_file(raw)
    if text_set.sha256 is not None and digest != text_set.sha256:
        if data_dir is None:
            raw.unlink()
        raise DataError(f"sha256 mismatch for '{raw}' (text set '{text_set.name}'): expected "
                        f"{text_set.sha256}, got {digest}; the file is not the pinned upstream "
                        "one: delete it and fetch it again")
    if text_set.sha256 is None:
        # Unpinned (UD train splits): record what was used, beside the file in the cache.
        record = Path(cache_dir) / "raw" / "recorded-sha256" / f"{text_set.name}.sha256"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{digest}  {text_set.url}\n", encoding="utf-8")
    return raw, digest


def get_text(name_or_path: str | Path, cache_dir: Path, data_dir: Path | None = None,
             progress: bool = False) -> TextFile:
    """A UTF-8 text file for a named set or a local path.

    >>> get_text("nob", cache_dir=Path("~/.cache/kvant")).path  # doctest: +SKIP
    PosixPath('.../text/nob.b45e4809.txt')
    """
    key = str(name_or_path)
    if key in TEXT_SETS:
        text_set = TEXT_SETS[key]
        raw, digest = fetch_raw(text_set, cache_dir, data_dir, progress)
        out = Path(cache_dir) / "text" / f"{text_set.name}.{digest[:8]}.txt"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            text = conllu_to_text(raw.read_text(encoding="utf-8"),
                                  text_set.underscores_to_spaces)
            tmp = out.with_name(out.name + ".part")
            tmp.write_text(text, encoding="utf-8")
            tmp.rename(out)
        return TextFile(text_set.name, out, digest, text_set.url, text_set.licence,
                        pinned=text_set.sha256 is not None)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"'{path}' is not UTF-8 text ({exc}); convert it with "
                            "iconv -t UTF-8") from exc
        return TextFile(path.stem, path, sha256_file(path), "local file")
    if path.suffix or "/" in key:
        raise DataError(f"text file '{key}' not found")
    raise DataError(unknown_key_message("text set", key, TEXT_SETS.keys())
                    + " or pass a path to a UTF-8 text file")


def encode_stream(tokenizer, units: list[str]) -> list[int]:
    """Token ids of ``units`` (paragraphs) concatenated, each starting with <s> (NorMistral's
    post-processor adds it); ``tokenizer`` is a `tokenizers.Tokenizer`."""
    ids: list[int] = []
    for enc in tokenizer.encode_batch(units):
        ids.extend(enc.ids)
    return ids


def paragraphs(text: str) -> list[str]:
    """Units of a text: blank-line-separated paragraphs, or lines where there are no blanks."""
    blocks = [b.strip() for b in text.split("\n\n")]
    if len(blocks) > 1:
        return [b for b in blocks if b]
    return [line for line in text.splitlines() if line.strip()]


# The calibration default mirrors NorMistral's training mix (mostly Bokmål and Nynorsk, with
# Sámi and English; UD has no code treebank): "name:weight" shares of characters.
DEFAULT_CALIB = "nob-train:0.5,nno-train:0.3,sme-train:0.1,eng:0.1"


def _parse_mix(spec: str) -> list[tuple[str, float]]:
    parts, shared = [], []
    for item in (p.strip() for p in str(spec).split(",")):
        if not item:
            continue
        weighted = re.fullmatch(r"(.+):([-+]?[0-9.]+)", item)
        name, weight = weighted.groups() if weighted else (item, "1")
        shared.append(bool(weighted))
        try:
            parts.append((name, float(weight)))
        except ValueError:
            raise DataError(f"bad share in '{item}'; write name:0.3") from None
        if parts[-1][1] <= 0:
            raise DataError(f"the share of '{name}' is {weight}; shares must be positive "
                            "(name:0.3)")
    if not parts:
        raise DataError("empty text list; pass a set name such as nob or a path")
    if any(shared):
        if not all(shared):
            raise DataError(f"'{spec}' gives shares to some texts only; give each a share "
                            "(nob-train:0.7,sme-train:0.3) or none (round-robin)")
        total = sum(w for _, w in parts)
        if total > 1 + 1e-9:
            raise DataError(f"the shares in '{spec}' add up to {total:g}; they are fractions "
                            "of the mix's characters and must add up to at most 1")
    return parts


def _weighted_interleave(units: list[list[str]], weights: list[float]) -> list[str]:
    """Paragraphs taken so that each source's share of characters follows its weight.

    Stops when the first source runs out, so the proportions hold for the whole mix.
    """
    taken = [0] * len(units)
    chars = [0] * len(units)
    mixed = []
    while True:
        pick = min(range(len(units)), key=lambda i: (chars[i] / weights[i], i))
        if taken[pick] >= len(units[pick]):
            return mixed
        unit = units[pick][taken[pick]]
        taken[pick] += 1
        chars[pick] += len(unit) + 1
        mixed.append(unit)


def get_mix(spec: str, cache_dir: Path, data_dir: Path | None = None,
            progress: bool = False) -> TextFile:
    """One text from a comma-separated list of set names and paths, optionally weighted.

    ``nob,nno`` alternates paragraphs; ``nob-train:0.5,nno-train:0.3,...`` gives each source
    that share of the characters. Truncating the mix keeps every source in it.

    >>> get_mix(DEFAULT_CALIB, cache_dir=Path("/tmp/c"))  # doctest: +SKIP
    """
    parts = _parse_mix(spec)
    files = [get_text(name, cache_dir, data_dir, progress) for name, _ in parts]
    if len(files) == 1:
        return files[0]
    weights = [w for _, w in parts]
    digest = sha256_text("|".join(f"{f.sha256}:{w}" for f, w in zip(files, weights, strict=True)))
    out = Path(cache_dir) / "text" / f"mix-{digest[:12]}.txt"
    if not out.is_file():
        mixed = _weighted_interleave([paragraphs(f.read()) for f in files], weights)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        tmp.write_text("\n\n".join(mixed) + "\n", encoding="utf-8")
        tmp.rename(out)
    return TextFile("+".join(f.name for f in files), out, digest,
                    "; ".join(f"{f.name} x{w}: {f.source} sha256 {f.sha256}"
                              for f, w in zip(files, weights, strict=True)),
                    "; ".join(sorted({f.licence for f in files if f.licence})),
                    pinned=all(f.pinned for f in files))
