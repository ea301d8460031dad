"""Put every results table in place in README.md and docs/*.md, from its JSON.

    python tools/render_docs.py            # rewrite the tables whose JSON changed
    python tools/render_docs.py --check    # exit 1 and name each table out of date

A table is the text between `<!-- table: results/NAME.json -->` and `<!-- /table -->`; the
path is relative to docs/. The JSON is what a study wrote (kvant.bench.tables: its columns,
rows, command and machine), copied into docs/results/ by whoever ran it; this script is the
only writer of the text between the markers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from kvant.bench.tables import markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- table: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /table -->)",
                   re.DOTALL)


def render(text: str, docs: Path = DOCS) -> tuple[str, list[str]]:
    """``text`` with every table block filled from its JSON, and the JSON paths used."""
    used = []

    def fill(match: re.Match) -> str:
        path = docs / match.group("path")
        if not path.is_file():
            raise SystemExit(f"render_docs: {path} is missing; run the study it names, "
                             "or fix the path in the marker")
        used.append(match.group("path"))
        body = markdown(json.loads(path.read_text(encoding="utf-8")))
        return f"{match.group(1)}{body}\n{match.group(4)}"

    return BLOCK.sub(fill, text), used


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/render_docs.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a table differs from its JSON")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        new, _ = render(text)
        if new != text:
            stale.append(page.relative_to(ROOT).as_posix())
            if not args.check:
                page.write_text(new, encoding="utf-8")
    verb = "out of date" if args.check else "rewritten"
    for name in stale:
        sys.stdout.write(f"{name}: tables {verb}\n")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
