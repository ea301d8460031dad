"""`kvant release` on a reduced stand-in recipe: artifacts, cards, index, checksums, upload."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest

from kvant.app.recipe import load_recipe
from kvant.app.release import run_release
from kvant.artifact import read_manifest, verify_artifact
from kvant.errors import SettingsError
from kvant.files import sha256_file
from tests.conftest import CALIB_FILE, UD_DIR, run_kvant

RECIPE = """
[release]
name = "mini"
model = "@stand-in"
out = "{out}"
langs = ["nob", "sme"]
eval_tokens = 256

[gguf]
types = ["q8_0", "q4_k_m"]
imatrix = "none"

[gptq]
samples = 16
seqlen = 128

[bnb]
modes = ["int8"]

[onnx]
precision = "int4"
int4_algo = "gptq"
block_size = 128

[bench]
ctx = [64]
quality_tokens = 256
quality_ctx = 128
repeats = 1
n_new = 4
depth_ctx = 1536
max_attempts = 1

[eval]
tasks = ["kvant_cloze_nob"]
limit = 6
"""
FOLDERS = ("mini-gguf", "mini-gptq-4bit", "mini-bnb-int8", "mini-onnx-int4")


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("release")
    recipe = root / "mini.toml"
    recipe.write_text(RECIPE.format(out=root / "out"))
    result = run_kvant("--no-progress", "release", str(recipe), "--calib", str(CALIB_FILE),
                       env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "out", recipe, result.stdout


def test_every_artifact_built_benched_and_verified(release):
    out, _, _ = release
    for folder in FOLDERS:
        assert verify_artifact(out / folder) == [], folder
        manifest = read_manifest(out / folder)
        assert manifest["validation"]["bench"], folder  # bench results in the manifest
        card = (out / folder / "README.md").read_text()
        assert "\n## Benchmark\n" in card and "![frontier.png](frontier.png)" in card
        for name in manifest["validation"]["bench"]:
            assert f"| {name} |" in card
        listed = {f["path"] for f in manifest["files"]}
        assert {"frontier.png", "decode.png", "memory.png", "README.md"} <= listed


def test_index_card_and_root_checksums(release):
    import hashlib

    out, recipe, _ = release
    index = (out / "README.md").read_text()
    results = json.loads((out / "bench" / "results.json").read_text())
    for name in results["targets"]:
        if name != "reference-bf16":
            assert f"| {name} |" in index
    for gb in (8, 12, 16, 24):
        assert f"- **{gb} GB**: " in index
    # the long-context picks: the stand-in fits every budget at its trained 32,768 tokens
    # with an f16 cache
    long = index.split("At 32,768 tokens", 1)[1].split("![frontier]", 1)[0]
    assert long.count(", f16 KV cache") == 4
    # and what each pick measured at depth: the release's depth study on held-out text
    depth = json.loads((out / "bench" / "depth.json").read_text())
    picked = {line.split("**: ", 1)[1].split(",", 1)[0] for line in long.splitlines()
              if line.startswith("- **")}
    assert set(depth) == picked and long.count("; at depth: mean KLD ") == 4
    for by_lang in depth[next(iter(picked))].values():
        assert set(by_lang) == {"nob", "sme"}
        assert all(r["tokens"] == 1536 for r in by_lang.values())
    assert "bench/depth.json" in (out / "SHA256SUMS").read_text()
    # the recipe that ran: --calib in it, named by the file's name and hash, not its path
    published = tomllib.loads((out / "recipe.toml").read_text())
    written = tomllib.loads(recipe.read_text())
    assert published["release"].pop("calib") == CALIB_FILE.name
    assert published["release"].pop("out") == "out"  # the publisher's folder, by name
    written["release"].pop("out")
    assert published == written  # the mini recipe has no calib of its own
    assert str(CALIB_FILE.parent) not in (out / "recipe.toml").read_text()
    assert sha256_file(CALIB_FILE) in (out / "recipe.toml").read_text()
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, path = line.split("  ", 1)
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == digest


def test_eval_scores_every_file_and_its_drift_is_on_the_index_card(release):
    out, _, _ = release
    data = json.loads((out / "eval" / "results.json").read_text())
    bench = json.loads((out / "bench" / "results.json").read_text())["targets"]
    # every target of the bench and the bf16 model, on identical requests
    assert set(data["models"]) - {data["reference"]} == set(bench) - {"reference-bf16"}
    assert data["reference"] in data["models"] and data["reference"] not in data["drift"]
    assert len({m["requests"] for m in data["models"].values()}) == 1
    assert data["models"][data["reference"]]["requests"] == 6 * 4  # 6 documents, 4 choices
    index = (out / "README.md").read_text()
    assert "task drift vs bf16" in index and "## Task scores" in index
    for name, drift in data["drift"].items():
        d = drift["kvant_cloze_nob"]["acc"]
        assert d["delta"] == d["value"] - d["reference"]
        row = next(line for line in index.splitlines() if line.startswith("| mini-")
                   and f"| {name} |" in line)
        shown = f"{100 * d['relative']:+.1f}% (1 tasks" if d["relative"] is not None else "-"
        assert shown in row, (name, row)
    # the published index lists the eval summary, never lm-eval's per-sample logs (text)
    sums = (out / "SHA256SUMS").read_text()
    assert "eval/results.json" in sums and "samples_" not in sums


def test_which_to_pick_passes_over_a_file_worse_on_a_task():
    from kvant.app.release_cards import recommendations, task_drift

    targets = {n: {"quality": {"nob": {"mean_kld": kld}}} for n, kld in (("a", 0.1), ("b", 0.2))}
    predicted = {"a": 1e9, "b": 1e9}
    worse = {"t": {"acc": {"value": 0.2, "reference": 0.5, "delta": -0.3, "relative": -0.6,
                           "delta_stderr": 0.05}}}
    noise = {"t": {"acc": {"value": 0.45, "reference": 0.5, "delta": -0.05, "relative": -0.1,
                           "delta_stderr": 0.05}}}
    assert task_drift(worse)["worse"] == ["t acc"] and task_drift(noise)["worse"] == []
    assert recommendations(targets, predicted)[0] == (8, "a")
    assert recommendations(targets, predicted, {"a": task_drift(noise)})[0] == (8, "a")
    assert recommendations(targets, predicted, {"a": task_drift(worse)})[0] == (8, "b")
    # worse everywhere: still a pick, the most faithful
    both = {"a": task_drift(worse), "b": task_drift(worse)}
    assert recommendations(targets, predicted, both)[0] == (8, "a")


def test_eval_section_is_checked(tmp_path):
    bad = tmp_path / "bad.toml"
    for section, match in (('tasks = "x"', "eval.tasks must be a list"),
                           ('tasks = ["x"]\nlimit = 0', "eval.limit must be a whole number"),
                           ('tasks = ["x"]\ninclude_path = ["/nowhere"]',
                            "include_path folder '/nowhere' does not exist")):
        bad.write_text(f'[release]\nname = "x"\nmodel = "@stand-in"\n[eval]\n{section}\n')
        with pytest.raises(SettingsError, match=match):
            load_recipe(bad)
    assert run_kvant("release", str(bad)).returncode == 2


def test_long_context_picks_take_the_most_precise_cache_that_fits():
    from kvant.app.release_cards import long_context_picks

    quality = {"small": {"quality": {"nob": {"mean_kld": 0.001}}},
               "faithful": {"quality": {"nob": {"mean_kld": 0.0001}}}}
    peaks = {"small": {"f16": 7e9, "q8_0": 6e9, "q4_0": 5e9},
             "faithful": {"f16": 13e9, "q8_0": 11e9, "q4_0": 9.5e9}}
    # 8 GB: only the small file fits (with f16); 12 GB: the faithful one with q8_0 (its f16
    # needs 13); 16 and 24 GB: the faithful one with f16
    assert long_context_picks(quality, peaks) == [
        (8, "small", "f16"), (12, "faithful", "q8_0"), (16, "faithful", "f16"),
        (24, "faithful", "f16")]
    peaks["small"] = {"f16": 9e9, "q8_0": 8.5e9, "q4_0": 7.9e9}
    assert long_context_picks(quality, peaks)[0] == (8, "small", "q4_0")
    peaks["small"] = {"f16": 9e9}
    assert long_context_picks(quality, peaks)[0] == (8, None, None)


def test_depth_cost_sets_a_quantized_cache_beside_f16():
    from kvant.app.release_cards import depth_cost

    def rows(kld, drift, late):
        return {"nob": {"mean_kld": kld, "ppl_drift_pct": drift, "tokens": 3000, "buckets": {
            "0-1024": {"kld": kld / 2}, "1024-4096": {"kld": late}, "4096-16384": None}}}

    depth = {"Q4_K_M": {"f16": rows(0.002, 0.5, 0.003), "q4_0": rows(0.01, 2.0, 0.02)}}
    text = depth_cost(depth, "Q4_K_M", "q4_0")
    assert "mean KLD 0.010000, perplexity drift +2.00%, positions 1,024 to 3,000 KLD 0.020000" \
        in text and "(with an f16 cache: 0.002000, +0.50%, 0.003000)" in text
    assert "with an f16 cache" not in depth_cost(depth, "Q4_K_M", "f16")
    assert depth_cost(depth, "Q8_0", "f16") == ""


def _planned(stdout: str) -> list[tuple[str, str]]:
    """(repo, path) of every `would upload REPO: PATH (N bytes)` line."""
    lines = [line for line in stdout.splitlines() if line.startswith("would upload ")]
    return [(line.split(": ", 1)[0].removeprefix("would upload ").split(" (")[0],
             line.split(": ", 1)[1].rsplit(" (", 1)[0]) for line in lines]


def test_push_dry_run_lists_every_file_and_no_text(release):
    out, _, stdout = release
    planned = _planned(stdout)
    for folder in FOLDERS:
        files = sorted(p.relative_to(out / folder).as_posix()
                       for p in (out / folder).rglob("*") if p.is_file())
        assert sorted(path for repo, path in planned if repo == f"ORG/{folder}") == files
    assert ("ORG/mini-kvant", "README.md") in planned
    assert not [path for _, path in planned if path.endswith((".txt", ".conllu"))]
    assert stdout.strip().splitlines()[-1] == f"report: {out / 'bench' / 'report.md'}"


def test_upload_is_an_allow_list_and_refuses_the_texts(release, tmp_path):
    from kvant.app.release_cards import upload_plan
    from kvant.artifact import ArtifactWriter
    from kvant.errors import ArtifactError

    out, _, _ = release
    shutil.copytree(out / "mini-bnb-int8", tmp_path / "mini-bnb-int8")
    (tmp_path / "mini-bnb-int8" / ".env").write_text("HF_TOKEN=hf_secret\n")
    (tmp_path / "mini-bnb-int8" / "nob.ud-test.txt").write_text("Ein setning.\n")
    plan, left_out = upload_plan(tmp_path, "ORG", "mini", ["mini-bnb-int8"])
    planned = {p["path"] for p in plan if p["repo"] == "ORG/mini-bnb-int8"}
    listed = {f["path"] for f in read_manifest(out / "mini-bnb-int8")["files"]}
    assert planned == listed | {"manifest.json", "SHA256SUMS"}
    assert {"mini-bnb-int8/.env", "mini-bnb-int8/nob.ud-test.txt"} <= set(left_out)
    # a text that an artifact itself lists is refused outright
    with ArtifactWriter(tmp_path / "texty", fmt="test") as art:
        (art.dir / "nob.ud-test.txt").write_text("Ein setning.\n")
    with pytest.raises(ArtifactError, match="may not be republished"):
        upload_plan(tmp_path, "ORG", "mini", ["texty"])


def test_push_verifies_every_checksum_before_the_first_byte(release, cache_dir, monkeypatch,
                                                            tmp_path):
    from kvant.app import release as release_module
    from kvant.app.release_cards import verify_release
    from kvant.errors import ArtifactError

    out, recipe, stdout = release
    assert "would upload ORG/mini-gguf (private): " in stdout  # private unless --public
    assert verify_release(out, list(FOLDERS)) == []
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with (copy / "mini-onnx-int4" / "README.md").open("a") as card:
        card.write("tampered\n")
    (copy / "bench" / "report.md").write_text("edited\n")
    assert verify_release(copy, list(FOLDERS)) == [
        "mini-onnx-int4: checksum mismatch README.md", "checksum mismatch bench/report.md"]
    # and run_release checks before it pushes anything
    pushed = []
    monkeypatch.setattr(release_module, "_push", lambda *args: pushed.append(args))
    monkeypatch.setattr(release_module, "verify_release",
                        lambda root, folders: verify_release(copy, folders))
    with pytest.raises(ArtifactError, match="not pushing: mini-onnx-int4: checksum mismatch"):
        release_module.run_release(recipe, cache_dir=cache_dir, data_dir=UD_DIR,
                                   calib=str(CALIB_FILE), push_org="ORG", token="t")
    assert pushed == []


def test_reference_is_never_a_pick(release):
    from kvant.app.release_cards import recommendations

    out, _, _ = release
    index = (out / "README.md").read_text()
    picks = [line for line in index.splitlines() if line.startswith("- **")]
    assert picks and not any("reference" in line for line in picks)
    results = json.loads((out / "bench" / "results.json").read_text())
    targets = results["targets"]
    # even when only the reference would fit, it is not offered: it is not in the release
    assert recommendations(targets, {}) == [(gb, "none fits") for gb in (8, 12, 16, 24)]
    assert "reference-bf16" in targets


def test_killed_release_resumes_from_finished_artifacts(release, cache_dir):
    out, recipe, _ = release
    gguf_file = out / "mini-gguf" / "kvant-stand-in-Q8_0.gguf"
    before = gguf_file.stat().st_mtime_ns
    shutil.rmtree(out / "mini-bnb-int8")
    (out / "mini-gptq-4bit" / "model.safetensors").write_bytes(b"torn")  # a broken one
    def weights(folder):
        return {f["path"]: f["sha256"] for f in read_manifest(folder)["files"]
                if f["path"].endswith(".safetensors")}

    gptq_weights = weights(out / "mini-gptq-4bit")
    keys = {n: e["quality_key"] for n, e in json.loads(
        (out / "bench" / "results.json").read_text())["targets"].items()}
    evals = json.loads((out / "eval" / "results.json").read_text())["models"]
    root, _ = run_release(recipe, cache_dir=cache_dir, data_dir=UD_DIR, calib=str(CALIB_FILE))
    after = json.loads((out / "bench" / "results.json").read_text())["targets"]
    # the task scores of a kept file are kept (same weights, tasks and lm-eval); a rebuilt
    # file's are measured again
    evals_after = json.loads((out / "eval" / "results.json").read_text())["models"]
    assert evals_after["kvant-stand-in-Q8_0"] == evals["kvant-stand-in-Q8_0"]
    assert (evals_after["mini-gptq-4bit"]["key"] == evals["mini-gptq-4bit"]["key"]) \
        == (weights(out / "mini-gptq-4bit") == gptq_weights)
    # the card carries the numbers measured on the artifact as it now is: its key is the
    # rebuilt files' digest (equal to the old one only where the rebuild is byte-identical)
    same_bytes = weights(out / "mini-gptq-4bit") == gptq_weights
    assert (after["mini-gptq-4bit"]["quality_key"] == keys["mini-gptq-4bit"]) == same_bytes
    assert read_manifest(out / "mini-gptq-4bit")["validation"]["bench"]["mini-gptq-4bit"][
        "quality_key"] == after["mini-gptq-4bit"]["quality_key"]
    assert after["kvant-stand-in-Q8_0"]["quality_key"] == keys["kvant-stand-in-Q8_0"]
    assert verify_artifact(out / "mini-bnb-int8") == []
    assert verify_artifact(out / "mini-gptq-4bit") == []  # rebuilt, not trusted
    # the ONNX model made from the GPTQ weights was rebuilt with them, not kept
    made_from = read_manifest(out / "mini-onnx-int4")["validation"]["int4_from"]
    assert made_from == {"folder": "mini-gptq-4bit", "weights_sha256": {
        Path(p).name: h for p, h in weights(out / "mini-gptq-4bit").items()}}
    # the GGUF folder was finished: kept as it was (only its card took the new bench)
    assert gguf_file.stat().st_mtime_ns == before
    assert verify_artifact(out / "mini-gguf") == []


def test_recipe_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[release]\nname = "x"\nmodel = "@stand-in"\n[gguf]\ntypez = ["q8_0"]\n')
    with pytest.raises(SettingsError, match="unknown key gguf.typez; did you mean gguf.types"):
        load_recipe(bad)
    bad.write_text('[relase]\nname = "x"\n')
    with pytest.raises(SettingsError, match="unknown section \\[relase\\]"):
        load_recipe(bad)
    result = run_kvant("release", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "not found" in result.stderr
    # an ONNX int4 from GPTQ needs the recipe's 4-bit GPTQ at its block size
    from kvant.app.recipe import plan_artifacts

    bad.write_text(RECIPE.format(out=tmp_path / "o").replace("block_size = 128",
                                                             "block_size = 32"))
    with pytest.raises(SettingsError, match="no \\[gptq\\] with bits = 4 and group_size = 32"):
        plan_artifacts(load_recipe(bad))


@pytest.mark.slow  # a whole release on synthetic weights
def test_rehearsal_runs_every_step_on_synthetic_weights_and_publishes_nothing(tmp_path,
                                                                              cache_dir):
    recipe = tmp_path / "mini.toml"
    recipe.write_text(RECIPE.format(out=tmp_path / "out"))
    result = run_kvant("--no-progress", "release", str(recipe), "--calib", str(CALIB_FILE),
                       "--rehearse", "2", "--work", "0.5", env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path / "out-rehearsal-2l"
    assert not (tmp_path / "out").exists()  # never the release's own folder
    data = json.loads((root / "rehearsal.json").read_text())
    assert data["finished"] and data["layers"] == 2 and data["full_layers"] == 4
    names = [s["step"] for s in data["steps"]]
    # one reference for the whole release, computed once before every pipeline
    assert names[0] == "reference" and names.count("reference") == 1
    for expected in ("gguf convert bf16", "gguf quantize q4_k_m", "gguf score q8_0",
                     "gptq-4bit-g128 quantize", "gptq-4bit-g128 score", "bnb-int8 quantize",
                     "onnx-int4-b128 build", "onnx-int4-b128 score",
                     "eval kvant-stand-in-Q4_K_M", "cards"):
        assert expected in names, expected
    assert any(n.startswith("bench speed") for n in names)
    for s in data["steps"]:
        assert s["peak_rss_mib"] > 50 and s["wall_s"] >= 0
        assert s["full_wall_s"] >= s["wall_s"]  # 4 layers touch more than 2
    # the docs' tables come from the run: a row per step (bench speed at its largest
    # context), and the README's groups with the verdicts of their largest step
    table = json.loads((root / "table.json").read_text())
    shown = [r[0] for r in table["rows"]]
    assert [n for n in names if not n.startswith("bench speed")] == \
        [n for n in shown if not n.startswith("bench speed")]
    needs = {r[0]: r for r in json.loads((root / "needs.json").read_text())["rows"]}
    reference = next(s for s in data["steps"] if s["step"] == "reference")
    assert needs["the bf16 reference"][2] == f"{reference['full_predicted_gib']:.1f} GiB"
    assert needs["the bf16 reference"][3:] == list(reference["machines"].values())
    # the quality paths ran, on random weights: marked, warned, and not on any card
    for folder in FOLDERS:
        manifest = read_manifest(root / folder)
        assert any("rehearsal" in w for w in manifest["warnings"]), folder
    again = run_kvant("release", str(recipe), "--rehearse", "2", "--push", "someorg")
    assert again.returncode == 2 and "never pushed" in again.stderr
    assert run_kvant("release", str(recipe), "--work", "0.5").returncode == 2


def test_the_needs_table_names_a_step_that_does_not_fit_beside_a_larger_one_that_does():
    """A group's largest plan can fit (mostly mapped file pages) while a smaller one of it
    does not (anonymous memory): the README's cell must say the one that does not."""
    from kvant.app.rehearsal import MACHINES, needs_table

    cpu, gpu = MACHINES
    mapped = {"step": "bench speed reference-bf16 @8192", "full_predicted_gib": 25.8,
              "machines": {cpu: "fits: 5.0 GiB anonymous + 20.8 GiB of mapped file", gpu: "fits"}}
    anonymous = {"step": "bench speed x-onnx-int4 @8192", "full_predicted_gib": 24.0,
                 "machines": {cpu: "needs 29 GB RAM", gpu: "fits"}}
    small = {"step": "bench speed x-Q4_K_M @8192", "full_predicted_gib": 11.0,
             "machines": {cpu: "fits", gpu: "fits"}}
    for row in (mapped, anonymous, small):  # what the results table beside it reads
        row.update(peak_rss_mib=1000.0, wall_s=1.0, full_wall_s=40.0)
    data = {"full_layers": 40, "layers": 1, "work": 1, "steps": [mapped, anonymous, small],
            "tolerance_pct": 15.0, "within_tolerance": True}
    (row,) = needs_table(data)["rows"]
    assert row[:3] == ["the bench", "no", "25.8 GiB"]
    assert row[3] == "bench speed x-onnx-int4 @8192: needs 29 GB RAM"
    assert row[4] == "fits"  # the largest step's verdict where every step fits


def test_no_file_of_the_release_names_a_folder_of_the_machine_that_made_it(release,
                                                                          tiny_model):
    """Cards, manifests, results, configs and recipes name artifacts, models and texts by
    their names and hashes: never the checkout, the home folder or the temp folder."""
    import tempfile

    from tests.conftest import REPO

    out, _, _ = release
    folders = [str(Path(tempfile.gettempdir())), str(Path.home()), str(REPO)]
    text_files = [f for f in out.rglob("*") if f.is_file() and f.suffix in (
        ".json", ".md", ".toml", ".txt", ".csv", ".Modelfile", ".jinja", "")]
    assert any(f.name == "SHA256SUMS" for f in text_files) and len(text_files) > 20
    leaks = {}
    for file in text_files:
        text = file.read_text(encoding="utf-8", errors="replace")
        found = [f for f in folders if f in text]
        if found:
            leaks[str(file.relative_to(out))] = found
    assert leaks == {}


def test_mlx_is_picked_for_a_mac_only():
    from kvant.app.release_cards import long_context_picks, recommendations

    quality = {"nob": {"mean_kld": 0.01}}
    targets = {"mlx": {"backend": "mlx", "quality": {"nob": {"mean_kld": 0.001}}},
               "gguf": {"backend": "llama.cpp", "quality": quality},
               "gptq": {"backend": "torch", "quality": {"nob": {"mean_kld": 0.005}}}}
    predicted = dict.fromkeys(targets, 5e9)
    assert recommendations(targets, predicted)[0] == (8, "gptq")
    assert recommendations(targets, predicted, mac=True)[0] == (8, "mlx")
    del targets["mlx"]["quality"]  # the best a Mac runs, MLX or GGUF
    assert recommendations(targets, predicted, mac=True)[0] == (8, "gguf")
    targets["mlx"]["quality"] = {"nob": {"mean_kld": 0.001}}
    long = {n: {"f16": 5e9} for n in targets}
    assert long_context_picks(targets, long)[0] == (8, "gptq", "f16")
