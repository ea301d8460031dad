"""Results tables that keep their measurement: what a study measured, on which machine, with
which command, as JSON; and that JSON as Markdown.

    doc = table_doc("ONNX int4 quantizers", columns, rows, command="python -m ...")
    write_table(out / "table.json", doc)      # the study's output
    markdown(doc)                             # what docs/ shows (tools/render_docs.py)

Every study behind a table in docs/ writes one, and `tools/render_docs.py` puts it in place
between `<!-- table: PATH -->` and `<!-- /table -->`, so a table cannot drift from its
measurement and a rerun refreshes it. Cells are strings as the table shows them (the
numbers themselves are in the study's own results beside it).
"""

from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path

from kvant.files import write_json
from kvant.machine import machine

SCHEMA = 1


def describe(info: dict) -> str:
    """'2 cores of an AMD EPYC, 24 GB RAM, no GPU' from kvant.machine.machine()."""
    cpu = info.get("cpu") or info.get("processor") or "an unknown CPU"
    ram = f", {info['ram_gib']:.0f} GB RAM" if info.get("ram_gib") else ""
    return f"{info.get('cpu_count', '?')} cores of an {cpu}{ram}, {info.get('gpu') or 'no GPU'}"


def portable(arg: str) -> str:
    """``arg`` with this machine's paths made ones any checkout has: the working folder's
    relative, its parent's `../`, the home folder's `~/` (inside comma-separated lists too)."""
    cwd = Path.cwd()
    for prefix, short in ((cwd, ""), (cwd.parent, "../"), (Path.home(), "~/")):
        if prefix != Path(prefix.anchor):
            arg = arg.replace(f"{prefix}/", short)
    return arg


def command_line(argv: list[str] | None = None, module: str | None = None) -> str:
    """The command that ran, as a user would type it (`python -m kvant.bench.studies.X ...`),
    with no path of the machine that ran it (:func:`portable`)."""
    argv = sys.argv[1:] if argv is None else argv
    head = f"python -m {module}" if module else Path(sys.argv[0]).name
    return " ".join([head, *map(_quoted, map(portable, argv))])


def _quoted(arg: str) -> str:
    """shlex.quote, leaving a leading ~/ outside the quotes (where the shell expands it)."""
    return "~/" + shlex.quote(arg[2:]) if arg.startswith("~/") else shlex.quote(arg)


def table_doc(title: str, columns: list[str], rows: list[list[str]], command: str,
              notes: str = "", machine_info: dict | None = None) -> dict:
    if any(len(r) != len(columns) for r in rows):
        raise ValueError(f"{title}: every row needs {len(columns)} cells")
    info = machine() if machine_info is None else machine_info
    return {"schema": SCHEMA, "title": title, "command": command, "machine": describe(info),
            "machine_info": info, "measured": datetime.date.today().isoformat(),
            "columns": columns, "rows": rows, "notes": notes}


def write_table(path: Path, doc: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, doc)  # never a half-written table
    return path


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: a header, its rule, a line per row."""
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                      *("| " + " | ".join(map(str, row)) + " |" for row in rows)])


def markdown(doc: dict) -> str:
    """The table, then one line saying where and how it was measured."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"results table schema {doc.get('schema')}, expected {SCHEMA}")
    lines = [markdown_table(doc["columns"], doc["rows"])]
    where = f"Measured {doc['measured']} on {doc['machine']}"
    if doc.get("source"):
        where += f" ({doc['source']})"
    lines += ["", f"*{where}: `{doc['command']}`.*"]
    if doc.get("notes"):
        lines += ["", doc["notes"]]
    return "\n".join(lines)
