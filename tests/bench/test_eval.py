"""`kvant eval` through the installed CLI: lm-eval's tasks on three kinds of artifact and the
bf16 folder, identical requests, lm-eval's accuracy equal to a hand count of its own log."""

from __future__ import annotations

import json

import pytest

from tests.conftest import UD_DIR, run_kvant

TASKS = "kvant_cloze_nob,kvant_complete_nob"
LIMIT = 12


@pytest.fixture(scope="module")
def evaluated(tiny_model, gguf_artifact, bnb_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "eval"
    q4 = next(gguf_artifact.glob("*-Q4_K_M.gguf"))
    result = run_kvant("--no-progress", "eval", str(q4), str(bnb_artifacts["nf4"]),
                       "--reference", str(tiny_model), "--tasks", TASKS, "--limit",
                       str(LIMIT), "--out", str(out), "--device", "cpu",
                       env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(out / "report.md")
    return out, q4


def _samples(out, name, task):
    path = out / "lm-eval" / name / f"samples_{task}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_model_answers_the_same_requests(evaluated, tiny_model, bnb_artifacts):
    out, q4 = evaluated
    data = json.loads((out / "results.json").read_text())
    names = [tiny_model.name, q4.stem, bnb_artifacts["nf4"].name]
    assert list(data["models"]) == names and data["reference"] == tiny_model.name
    for task in TASKS.split(","):
        asked = [[row["arguments"] for row in _samples(out, n, task)] for n in names]
        assert len(asked[0]) == LIMIT and asked[1:] == [asked[0]] * 2, task
    for name in names:  # lm-eval's own files, in its schema
        own = json.loads((out / "lm-eval" / name / "results.json").read_text())
        assert set(own["results"]) >= set(TASKS.split(",")) and "configs" in own
    assert (out / "report.md").is_file() and (out / "drift.png").stat().st_size > 1000


def test_accuracy_is_the_hand_count_of_the_log_and_drift_its_difference(evaluated,
                                                                       tiny_model):
    out, q4 = evaluated
    data = json.loads((out / "results.json").read_text())
    counted = {}
    for name in data["models"]:
        rows = _samples(out, name, "kvant_cloze_nob")
        # the choice lm-eval picked is the one with the highest log-likelihood
        right = sum(max(range(len(r["resps"])), key=lambda i: r["resps"][i][0][0])
                    == r["target"] for r in rows)
        counted[name] = right / len(rows)
        acc = data["models"][name]["results"]["kvant_cloze_nob"]["acc"]
        assert acc["value"] == pytest.approx(counted[name]), name
        assert acc["stderr"] > 0
    d = data["drift"][q4.stem]["kvant_cloze_nob"]["acc"]
    assert d["delta"] == pytest.approx(counted[q4.stem] - counted[tiny_model.name])
    assert d["reference"] == pytest.approx(counted[tiny_model.name])
    assert d["delta_stderr"] >= max(data["models"][q4.stem]["results"]["kvant_cloze_nob"]
                                    ["acc"]["stderr"], 0)


def test_eval_refuses_what_it_cannot_run(tiny_model, tmp_path):
    bad = run_kvant("eval", str(tiny_model), "--reference", str(tiny_model), "--tasks",
                    "kvant_clozee", "--out", str(tmp_path / "e"),
                    env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert bad.returncode == 2 and "unknown lm-eval task 'kvant_clozee'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    bad = run_kvant("eval", str(tiny_model), "--tasks", "kvant_cloze_nob", "--limit", "0")
    assert bad.returncode == 2 and "--limit 0" in bad.stderr


def test_lm_evals_own_command_line_runs_an_artifact_as_kvant_eval_does(evaluated, tmp_path):
    """`kvant lm-eval` is lm-eval's CLI with `kvant` registered (no lm-eval release discovers
    installed backends yet): the same requests get the same answers and accuracy as
    `kvant eval` gave the same file, and lm-eval's results table is on stdout."""
    out, q4 = evaluated
    own = tmp_path / "lm-eval-out"
    result = run_kvant("lm-eval", "--model", "kvant", "--model_args", f"artifact={q4}",
                       "--tasks", "kvant_cloze_nob", "--limit", str(LIMIT), "--output_path",
                       str(own), "--log_samples", env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kvant_cloze_nob" in result.stdout and "acc" in result.stdout
    (results,) = own.rglob("results_*.json")
    (samples,) = own.rglob("samples_kvant_cloze_nob_*.jsonl")
    acc = json.loads(results.read_text())["results"]["kvant_cloze_nob"]["acc,none"]
    kept = json.loads((out / "results.json").read_text())["models"][q4.stem]
    assert acc == pytest.approx(kept["results"]["kvant_cloze_nob"]["acc"]["value"])
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    before = _samples(out, q4.stem, "kvant_cloze_nob")
    assert [lm_eval_args(r) for r in rows] == [lm_eval_args(r) for r in before]
    assert [lm_eval_lls(r) for r in rows] == [lm_eval_lls(r) for r in before]


def lm_eval_args(row: dict) -> list:
    """A logged request's arguments: lm-eval's CLI logs them as {"gen_args_N": {"arg_M"}},
    simple_evaluate's samples as lists."""
    found = row["arguments"]
    return [list(a.values()) for a in found.values()] if isinstance(found, dict) else found


def lm_eval_lls(row: dict) -> list[float]:
    """A logged request's log-likelihoods (lm-eval's CLI logs them as strings)."""
    return [float(choice[0][0]) for choice in row["resps"]]


def test_lm_evals_command_line_refuses_a_missing_artifact_with_kvants_error(tmp_path):
    bad = run_kvant("lm-eval", "--model", "kvant", "--model_args",
                    f"artifact={tmp_path / 'nothing.gguf'}", "--tasks", "kvant_cloze_nob",
                    "--limit", "2", env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines()[-1].startswith("kvant: error: ")
    assert "nothing.gguf" in bad.stderr.strip().splitlines()[-1]


def test_eval_without_a_reference_reports_the_scores_and_says_why_no_drift(evaluated,
                                                                           tmp_path):
    """Task scores need no reference: without one nothing is fetched, the scores are those
    the same file got beside its reference, and one line says that the drift is left out."""
    out, q4 = evaluated
    alone = tmp_path / "alone"
    result = run_kvant("--no-progress", "eval", str(q4), "--tasks", "kvant_cloze_nob",
                       "--limit", str(LIMIT), "--out", str(alone),
                       env={"KVANT_DATA_DIR": str(UD_DIR), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "without their drift" in result.stderr
    data = json.loads((alone / "results.json").read_text())
    assert data["reference"] is None and data["drift"] == {}
    kept = json.loads((out / "results.json").read_text())["models"][q4.stem]
    acc = data["models"][q4.stem]["results"]["kvant_cloze_nob"]["acc"]["value"]
    assert acc == pytest.approx(kept["results"]["kvant_cloze_nob"]["acc"]["value"])
    assert "no reference was given" in (alone / "report.md").read_text()


def test_lm_evals_default_cuda_device_falls_back_to_the_cpu_here(tiny_model):
    """lm-eval's CLI hands every model its --device default (cuda): on a machine without
    CUDA the model runs on the CPU, with a warning, as lm-eval's HFLM does."""
    import torch

    from kvant.app.lmeval import KvantLM

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs cuda")
    lm = KvantLM(str(tiny_model), device="cuda")  # the bf16 folder: its dtype asks the device
    try:
        assert lm.where == "cpu"
        logprob, _ = lm.score([1, 500], [600, 700])  # the reference's dtype, on the CPU
        assert logprob < 0
    finally:
        lm.close()


def test_a_model_is_scored_again_when_its_dtype_changes_and_only_then(micro_model, cache_dir,
                                                                      tmp_path, monkeypatch):
    """A resumed eval reuses a model's scores only when they were made the same way: the
    dtype a bf16 folder is scored in (float32 where it fits, else bfloat16) changes them."""
    import kvant.app.lmeval as lmeval

    def run():
        lmeval.run_eval([], micro_model, ["kvant_cloze_nob"], tmp_path / "eval",
                        cache_dir=cache_dir, data_dir=UD_DIR, limit=2)
        entry = tmp_path / "eval" / "lm-eval" / micro_model.name / lmeval.KVANT_ENTRY
        return json.loads(entry.read_text())["key"], entry.stat().st_mtime_ns

    first = run()
    assert run() == first  # the same dtype: kept, not scored again
    monkeypatch.setattr(lmeval, "reference_dtype", lambda *_: "bfloat16")
    again = run()
    assert again[0] != first[0] and again[1] != first[1]
