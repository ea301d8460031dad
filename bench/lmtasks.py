"""Kvant's local lm-eval tasks, built from the held-out text on this machine.

    build_tasks(folder, cache_dir, data_dir, langs=("nob", "nno"))  # -> task names

Per language two tasks, from the templates beside this file (bench/tasks/*.yaml, lm-eval's
YAML with ``dataset_path: json`` and a local ``data_files``): ``kvant_cloze_<lang>``, the
right next sentence of a held-out paragraph against three sentences of other paragraphs of
the same text (multiple choice, accuracy), and ``kvant_complete_<lang>``, the rest of a
paragraph's second sentence after its start (generation, chrF). The documents are written
into ``folder`` next to the filled-in YAML, which lm-eval loads with ``include_path``. The
texts' licence forbids republishing them, so neither the documents nor the YAML that
points at them ever leave the machine: the repository ships the templates and this builder.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from kvant.data import get_text, paragraphs

TEMPLATES = Path(__file__).parent / "tasks"
LOCAL_TASK = re.compile(r"kvant_(?:cloze|complete)_([a-z]+(?:-[a-z]+)?)")  # group: language
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+(?=[\"«(\[]?[A-ZÆØÅÄÖÁČĐŊŠŦŽ0-9])")
_CHOICES = 4


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def cloze_docs(text: str, seed: int = 0) -> list[dict]:
    """One document per paragraph of at least two sentences: its first sentences as the
    context, the next as the answer, three sentences of other paragraphs as the others, in
    an order drawn from ``seed``."""
    units = [sentences(p) for p in paragraphs(text)]
    pool = [(i, s) for i, ss in enumerate(units) for s in ss if len(s.split()) >= 3]
    rng = random.Random(seed)
    docs = []
    for i, ss in enumerate(units):
        if len(ss) < 2 or len(ss[1].split()) < 3:
            continue
        cut = min(len(ss) - 1, 3)
        others = [s for j, s in rng.sample(pool, min(len(pool), 12)) if j != i][:_CHOICES - 1]
        if len(others) < _CHOICES - 1:
            continue
        choices = [ss[cut], *others]
        rng.shuffle(choices)
        docs.append({"context": " ".join(ss[:cut]), "choices": choices,
                     "label": choices.index(ss[cut])})
    return docs


def complete_docs(text: str) -> list[dict]:
    """One document per paragraph whose second sentence has at least six words: the first
    sentence and the second's first half as the context, the rest as the reference."""
    docs = []
    for paragraph in paragraphs(text):
        ss = sentences(paragraph)
        if len(ss) < 2 or len(words := ss[1].rstrip(".!?…").split()) < 6:
            continue
        half = len(words) // 2
        docs.append({"context": f"{ss[0]} {' '.join(words[:half])}",
                     "target": " " + " ".join(words[half:])})
    return docs


def build_tasks(folder: Path, cache_dir: Path, data_dir: Path | None,
                langs: tuple[str, ...] = ("nob", "nno")) -> list[str]:
    """Write the local tasks' documents and YAML for ``langs`` into ``folder`` (created);
    return the task names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for lang in langs:
        text = get_text(lang, cache_dir, data_dir).read()
        for kind, docs in (("cloze", cloze_docs(text)), ("complete", complete_docs(text))):
            data = folder / f"kvant_{kind}_{lang}.jsonl"
            data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                            encoding="utf-8")
            yaml = (TEMPLATES / f"kvant_{kind}.yaml").read_text(encoding="utf-8")
            (folder / f"kvant_{kind}_{lang}.yaml").write_text(
                yaml.replace("__LANG__", lang).replace("__DATA__", str(data.resolve())),
                encoding="utf-8")
            names.append(f"kvant_{kind}_{lang}")
    return names
