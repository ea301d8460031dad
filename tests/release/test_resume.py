"""A resumed release keeps an artifact only when it was made from what the recipe asks for
now; recipes reach every settings field; the hub revision is pinned and recorded."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from kvant.app.pipelines import PIPELINES
from kvant.app.recipe import RECIPE_SCHEMA, bench_settings, load_recipe, plan_artifacts
from kvant.app.resume import resume_changes
from kvant.artifact import read_manifest, settings_dict, verify_artifact
from kvant.bench.settings import BenchSettings
from kvant.errors import SettingsError
from tests.conftest import CALIB_FILE, REPO, UD_DIR, run_kvant

RECIPE = """
[release]
name = "one"
model = "@stand-in"
out = "{out}"
langs = ["nob"]
eval_tokens = 256
calib = "{stand_in_calib}"

[gguf]
types = {types}
imatrix = "{imatrix}"
{calib}

[bench]
ctx = [32]
quality_tokens = 256
quality_ctx = 128
repeats = 1
n_new = 4
peer_checks = false
depth_ctx = 0
max_attempts = 1
"""


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _release(recipe, *extra):
    """`kvant release RECIPE` in the recipe's folder (where its relative paths lead)."""
    return run_kvant("--no-progress", "release", str(recipe), *extra,
                     env={"KVANT_DATA_DIR": str(UD_DIR)}, cwd=recipe.parent)


def _gguf_files(folder):
    return sorted(p.name for p in folder.glob("*.gguf") if not p.name.endswith(".imatrix.gguf"))


@pytest.fixture(scope="module")
def first_release(tmp_path_factory, tiny_model):
    """One finished release (Q4_K_M with an imatrix from its own calibration text) that
    each resume scenario copies and changes: recipe, calibration text and output folder."""
    root = tmp_path_factory.mktemp("resume")
    (root / "calib.txt").write_text(CALIB_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    _write_recipe(root, '["q4_k_m"]')
    first = _release(root / "one.toml")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _gguf_files(root / "out" / "one-gguf") == ["kvant-stand-in-Q4_K_M.gguf"]
    return root


def _write_recipe(root, types):
    """The recipe in ``root``, its output folder and calibration text named relative to it."""
    (root / "one.toml").write_text(RECIPE.format(
        out="out", types=types, imatrix="auto", calib='calib = "calib.txt"',
        stand_in_calib=CALIB_FILE))


def _copy_of(first_release, tmp_path):
    """The first release, its recipe and its text, copied into ``tmp_path`` with their
    times (so that a kept file is seen as kept)."""
    root = tmp_path / "copy"
    shutil.copytree(first_release, root)
    return root


def test_an_edited_recipe_is_refused_then_rebuilt_with_rebuild(first_release, tmp_path):
    """Resume keeps a folder only when the recipe still asks for it: edit `types` from q4_k_m
    to q8_0, and a folder whose checksums verify is still not carded as the new type."""
    root = _copy_of(first_release, tmp_path)
    recipe, out = root / "one.toml", root / "out"
    # the same recipe again: kept as it is (the same file, not rebuilt)
    made = (out / "one-gguf" / "kvant-stand-in-Q4_K_M.gguf").stat()
    again = _release(recipe)
    assert again.returncode == 0, again.stderr[-3000:]
    kept = (out / "one-gguf" / "kvant-stand-in-Q4_K_M.gguf").stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    _write_recipe(root, '["q8_0"]')
    before = _snapshot(out)
    refused = _release(recipe)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert 'gguf.types: ["q4_k_m"] -> ["q8_0"]' in line and "--rebuild" in line
    assert _snapshot(out) == before  # refused before any work: nothing touched
    rebuilt = _release(recipe, "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert "rebuilding" in rebuilt.stderr and "gguf.types" in rebuilt.stderr
    assert _gguf_files(out / "one-gguf") == ["kvant-stand-in-Q8_0.gguf"]
    assert verify_artifact(out / "one-gguf") == []
    assert read_manifest(out / "one-gguf")["settings"]["types"] == ["q8_0"]
    index = (out / "README.md").read_text()
    assert "Q8_0" in index and "Q4_K_M" not in index


def test_changed_calibration_text_is_named(first_release, tmp_path):
    """Same recipe, same calibration path, other bytes: the imatrix it made is stale."""
    root = _copy_of(first_release, tmp_path)
    text = root / "calib.txt"
    paragraphs = text.read_text(encoding="utf-8").split("\n")
    text.write_text("\n".join(reversed(paragraphs)), encoding="utf-8")
    before = _snapshot(root / "out")
    refused = _release(root / "one.toml")
    assert refused.returncode == 2
    assert "text 'calib' changed (sha256" in refused.stderr.strip().splitlines()[-1]
    assert _snapshot(root / "out") == before


def _manifested(tmp_path, settings, source, data=()):
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "manifest.json").write_text(__import__("json").dumps({
        "settings": settings_dict(settings), "source": source, "data": list(data)}))
    return folder


def test_resume_changes_names_each_input_that_differs(tmp_path):
    gguf = PIPELINES["gguf"].settings
    settings = gguf(types=("q8_0",), imatrix="none")
    source = {"id": "norallm/normistral-11b-long", "revision": "a" * 40}
    folder = _manifested(tmp_path, settings, source, [{"name": "nob", "sha256": "1" * 64}])
    assert resume_changes(folder, "gguf", settings, source, {"nob": "1" * 64}) == []
    assert resume_changes(folder, "gguf", dataclasses.replace(settings, mix_tokens=4096),
                          source, {}) == ["gguf.mix_tokens: 2048 -> 4096"]
    moved = {**source, "revision": "b" * 40}
    assert resume_changes(folder, "gguf", settings, moved, {}) == [
        f'source revision: "{"a" * 40}" -> "{"b" * 40}"']
    assert resume_changes(folder, "gguf", settings, source, {"nob": "2" * 64}) == [
        "text 'nob' changed (sha256 111111111111 -> 222222222222)"]
    # a settings field newer than the artifact, left at its default, is no change
    (folder / "manifest.json").write_text(__import__("json").dumps({
        "settings": {k: v for k, v in settings_dict(settings).items() if k != "mix_tokens"},
        "source": source, "data": []}))
    assert resume_changes(folder, "gguf", settings, source, {}) == []
    assert resume_changes(folder, "gguf", dataclasses.replace(settings, mix_tokens=4096),
                          source, {}) == ["gguf.mix_tokens: null -> 4096"]


# a value other than the default for each settings field whose doubled or negated default is
# not one (strings, lists, and numbers with rules of their own)
OTHER = {"types": ["q8_0"], "imatrix": "nob.imatrix", "calib": "nob-train", "pre": "tekken",
         "mix_sensitivity": "proxy", "precision": "fp32", "provider": "cpu",
         "int4_algo": "rtn", "accuracy_level": 1, "compute_dtype": "fp32", "ctx": ["64"],
         "kv_type": "q8_0", "device": "cpu", "group_size": 64, "bits": 8, "damp": 0.05,
         "eval_langs": ["sme"], "langs": ["sme"]}


# where one section's default is another's OTHER value
OTHER_IN = {("mlx", "group_size"): 32, ("mlx", "dtype"): "float16"}


def _other(field, section: str = ""):
    if (section, field.name) in OTHER_IN:
        return OTHER_IN[section, field.name]
    if field.name in OTHER:
        return OTHER[field.name]
    if isinstance(field.default, bool):
        return not field.default
    if isinstance(field.default, int | float):
        return field.default * 2 if field.default else 1
    raise AssertionError(f"give {field.name} a value in OTHER")


def test_every_settings_field_a_recipe_documents_reaches_its_setting(tmp_path):
    """What a user sees: each key of a recipe's pipeline and bench sections, set to another
    value than its default, is the value the artifact (or the bench) is made with."""
    recipe = tmp_path / "r.toml"
    reached = 0
    for section, cls in (*((k, PIPELINES[k].settings)
                           for k in ("gguf", "gptq", "onnx", "bnb", "mlx")),
                         ("bench", BenchSettings)):
        for field in dataclasses.fields(cls):
            if field.name not in RECIPE_SCHEMA[section]:
                continue  # [release] langs for every eval_langs; bnb's modes, below
            if field.name == "provider":
                continue  # cpu is its default; cuda needs fp16 (reached: the GPU recipe)
            value = _other(field, section)
            assert value != field.default, (section, field.name)
            recipe.write_text(f'[release]\nname = "r"\nmodel = "@stand-in"\n[{section}]\n'
                              f"{field.name} = {json.dumps(value)}\n")
            loaded = load_recipe(recipe)
            got = (bench_settings(loaded) if section == "bench" else next(
                s for _, (kind, s, *_) in plan_artifacts(loaded).items() if kind == section))
            want = tuple(value) if isinstance(value, list) else value
            assert getattr(got, field.name) == want, (section, field.name)
            reached += 1
    assert reached > 50
    recipe = tmp_path / "r.toml"
    recipe.write_text('[release]\nname = "r"\nmodel = "@stand-in"\nlangs = ["nob"]\n'
                      '[gguf]\ntypes = ["q4_k_m-mix"]\nmix_sensitivity = "proxy"\n'
                      'mix_tokens = 512\nimatrix_ctx = 256\neval_ctx = 128\n'
                      '[bnb]\nmodes = ["nf4", "int8"]\ncompute_dtype = "fp32"\n')
    planned = plan_artifacts(load_recipe(recipe))
    gguf = planned["r-gguf"][1]
    assert (gguf.mix_sensitivity, gguf.mix_tokens, gguf.imatrix_ctx, gguf.eval_ctx) == (
        "proxy", 512, 256, 128)
    assert gguf.eval_langs == ("nob",)  # from [release]
    assert planned["r-bnb-nf4"][1].compute_dtype == "fp32"
    recipe.write_text('[release]\nname = "r"\nmodel = "@stand-in"\n[gguf]\nmix_token = 5\n')
    with pytest.raises(SettingsError, match="unknown key gguf.mix_token; did you mean "
                                            "gguf.mix_tokens"):
        load_recipe(recipe)


def test_the_revision_is_pinned_and_recorded(tmp_path, tiny_model, monkeypatch):
    """`revision` reaches the hub download, and the commit it resolved to is the source."""
    import huggingface_hub

    from kvant.model import model_source

    commit = "c" * 40
    snapshot = tmp_path / "snapshots" / commit
    snapshot.parent.mkdir()
    snapshot.symlink_to(tiny_model, target_is_directory=True)
    asked = []

    def download(repo_id, revision=None, **kwargs):
        asked.append((repo_id, revision))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    path, source = model_source("norallm/normistral-11b-long", "v1.0")
    assert asked == [("norallm/normistral-11b-long", "v1.0")]
    assert source == {"id": "norallm/normistral-11b-long", "revision": commit,
                      "requested_revision": "v1.0"}
    assert path == snapshot
    with pytest.raises(SettingsError, match="applies to a hub id"):
        model_source(str(tiny_model), "v1.0")
    local = run_kvant("export", "gguf", "--model", str(tiny_model), "--revision", "v1.0",
                      "--out", str(tmp_path / "x"))
    assert local.returncode == 2 and "applies to a hub id" in local.stderr
    assert not (tmp_path / "x").exists()


def test_a_failing_rehearsal_table_does_not_hide_the_error_that_stopped_the_run(
        tmp_path, cache_dir, monkeypatch):
    """The rehearsal writes its table of the steps it ran even when a step failed; if that
    write fails too, the user still sees the first error."""
    import json

    from kvant.app import release
    from kvant.errors import KvantError

    model = tmp_path / "synth"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    monkeypatch.setattr(release, "_rehearsal_model", lambda *a, **k: (
        model, {"shape": "normistral-11b-long"}))

    def stopped(*args, **kwargs):
        raise KvantError("the step that failed")

    def broken(*args, **kwargs):
        raise RuntimeError("the rehearsal table could not be written")

    monkeypatch.setattr(release, "_build", stopped)
    monkeypatch.setattr(release, "write_rehearsal", broken)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text((REPO / "recipes" / "stand-in.toml").read_text().replace(
        'out = "out/release/normistral-stand-in"', f'out = "{tmp_path / "release"}"'))
    with pytest.raises(KvantError, match="the step that failed"):
        release.run_release(recipe, cache_dir=cache_dir, rehearse=1)


def test_a_push_that_fails_midway_leaves_the_repo_untouched(tmp_path, monkeypatch):
    """Every file of a repo goes up in one commit: an upload that fails on the third file
    commits nothing (a fake HfApi that holds what a commit would have published)."""
    import huggingface_hub

    from kvant.app import release

    committed: dict[str, list[str]] = {}

    class FailingHub:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo, exist_ok=True, private=True):
            committed.setdefault(repo, [])

        def _add(self, repo, path, sent):
            if len(sent) == 2:
                raise OSError("connection reset on the third file")
            sent.append(path)

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kwargs):
            self._add(repo_id, path_in_repo, committed[repo_id])  # a commit each

        def create_commit(self, repo_id, operations, commit_message="", **kwargs):
            sent: list[str] = []
            for op in operations:
                self._add(repo_id, op.path_in_repo, sent)
            committed[repo_id] += sent  # all or nothing

    monkeypatch.setattr(huggingface_hub, "HfApi", FailingHub)
    files = []
    for name in ("a.gguf", "b.gguf", "README.md", "manifest.json"):
        (tmp_path / name).write_text(name)
        files.append({"repo": "ORG/mini-gguf", "path": name, "local": tmp_path / name})
    with pytest.raises(OSError, match="third file"):
        release._push(files, "token", public=False)
    assert committed == {"ORG/mini-gguf": []}


def test_the_published_recipe_is_the_one_that_ran():
    """`make demo` passes --calib: the release's recipe.toml must name that text (by file
    name and sha256, never the publisher's folder), not the recipe file's own calib."""
    import tomllib

    from kvant.app.recipe import effective_recipe
    from kvant.files import sha256_file

    text = (REPO / "recipes" / "stand-in.toml").read_text()
    written = tomllib.loads(text)
    ran = effective_recipe(text, str(CALIB_FILE))
    published = tomllib.loads(ran)
    assert written["release"]["calib"] != CALIB_FILE.name
    assert published["release"].pop("calib") == CALIB_FILE.name
    written["release"].pop("calib")
    assert published == written
    assert str(CALIB_FILE.parent) not in ran and sha256_file(CALIB_FILE) in ran
    assert effective_recipe(text, None) == text
    mixed = tomllib.loads(effective_recipe(text, "nob-train:0.7,eng:0.3"))
    assert mixed["release"]["calib"] == "nob-train:0.7,eng:0.3"
