"""The README runs as written, and every results table in the docs is its JSON's rendering."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from kvant.app.cli import build_parser
from tests.conftest import REPO, load_tool

README = REPO / "README.md"
render_docs = load_tool("render_docs")


def shell_commands(text: str) -> list[list[str]]:
    """Every command of the ```sh blocks: continuations joined, comments dropped, `&&`
    chains split, bash's $'...' quoting read as plain quotes (the newline stays escaped)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\$'", "'", line)
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
    return commands


COMMANDS = shell_commands(README.read_text(encoding="utf-8"))


def test_the_readme_is_short_and_its_shell_blocks_were_found():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250
    heads = {c[0] for c in COMMANDS}
    assert {"make", "kvant", "python"} <= heads, heads
    assert {"make", "kvant", "python"} >= heads, f"a README command nobody checks: {heads}"


@pytest.mark.parametrize("words", [c for c in COMMANDS if c[0] == "kvant"],
                         ids=lambda c: " ".join(c[:3]))
def test_each_kvant_command_parses_with_its_flags(words):
    try:
        args = build_parser().parse_args(words[1:])
    except SystemExit as exc:  # argparse's exit on an unknown flag or a bad value
        pytest.fail(f"{' '.join(words)}: does not parse (exit {exc.code})")
    assert args.command == words[1]


@pytest.mark.parametrize("words", [c for c in COMMANDS if c[0] == "python"],
                         ids=lambda c: c[2])
def test_each_python_module_command_takes_its_flags(words):
    assert words[1] == "-m"
    result = subprocess.run([sys.executable, "-m", words[2], "--help"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-800:]
    for flag in (w.split("=")[0] for w in words[3:] if w.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout), \
            f"{words[2]} has no {flag}"


def test_each_make_target_exists():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    for words in (c for c in COMMANDS if c[0] == "make"):
        for target in words[1:]:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target


def test_the_checker_catches_a_flag_that_does_not_exist():
    """The parse above fails on what a user would see fail."""
    words = shell_commands("```sh\nkvant bench out/x --reference ./tiny --contexts 512\n```")[0]
    with pytest.raises(SystemExit):
        build_parser().parse_args(words[1:])


def test_every_docs_table_is_the_rendering_of_its_json():
    for page in render_docs.pages():
        text = page.read_text(encoding="utf-8")
        rendered, _ = render_docs.render(text)
        assert rendered == text, f"{page.name}: run python tools/render_docs.py"


def test_every_results_json_is_shown_and_says_where_it_was_measured():
    used = set()
    for page in render_docs.pages():
        used |= set(render_docs.render(page.read_text(encoding="utf-8"))[1])
    files = {f"results/{p.name}" for p in (REPO / "docs" / "results").glob("*.json")}
    assert files == used, f"unused: {files - used}, missing: {used - files}"
    for name in files:
        doc = json.loads((REPO / "docs" / name).read_text(encoding="utf-8"))
        assert doc["machine"] and doc["command"] and doc["measured"], name
        assert all(len(row) == len(doc["columns"]) for row in doc["rows"]), name


def test_no_published_page_names_a_path_of_the_machine_that_made_it():
    pattern = re.compile(r"(?<![\w.~])/(?:root|home|work|tmp|Users)/")
    pages = [REPO / "README.md", *(REPO / "docs").glob("*.md"),
             *(REPO / "docs" / "results").glob("*.json")]
    found = [f"{p.name}: {m.group(0)}" for p in pages
             for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert found == []


def test_a_study_command_keeps_no_machine_path(tmp_path, monkeypatch):
    from kvant.bench.tables import command_line

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/someone")
    line = command_line([f"{tmp_path}/out", "--calib", f"eng:0.5,{tmp_path.parent}/c.txt",
                         "--model", "/home/someone/.cache/kvant/tiny/m"], module="m")
    assert line == "python -m m out --calib eng:0.5,../c.txt --model ~/.cache/kvant/tiny/m"
