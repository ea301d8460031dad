"""Synthetic real-size checkpoints and the memory planner."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvant.errors import SettingsError
from kvant.plan.kinds import kinds, weight_bytes
from kvant.plan.kv import kv_bytes
from kvant.plan.peaks import predict
from kvant.plan.sizes import GIB
from kvant.synth import SHAPES
from tests.conftest import CALIB_FILE, UD_DIR

NM = SHAPES["normistral-11b-long"]


@pytest.fixture(scope="module")
def synth_one_layer(tmp_path_factory, shared_data):
    """`kvant synth --layers 1` in a fresh process, with its peak RSS."""
    out = tmp_path_factory.mktemp("synth") / "nm-1layer"
    exe = os.path.join(os.path.dirname(sys.executable), "kvant")
    result = subprocess.run([exe, "--no-progress", "synth", "--layers", "1", "--out", str(out),
                             "--train-text", str(CALIB_FILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    # the process's own high-water mark (VmHWM), recorded in the manifest
    peak = json.loads((out / "manifest.json").read_text())["validation"]["peak_rss_mib"]
    return out, result.stdout, peak


def test_synthetic_checkpoint_has_normistrals_exact_shapes(synth_one_layer):
    from kvant.model import model_info, read_safetensors_header, weight_files

    out, stdout, peak_mib = synth_one_layer
    assert stdout.strip() == str(out)
    # 1.45 GB of weights written; RSS stays near the imports plus one 64 MiB row block
    assert peak_mib < 1024, peak_mib
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"], config["vocab_size"],
            config["max_position_embeddings"], config["num_hidden_layers"]) == (
        5120, 14336, 32, 8, 128, 51200, 32768, 1)
    assert config["kvant_synthetic"] is True and config["tie_word_embeddings"] is False
    headers = {}
    for file in weight_files(out):
        headers.update(read_safetensors_header(file))
    from dataclasses import replace

    expected = dict(replace(NM, n_layers=1).tensors())
    assert {k: tuple(v["shape"]) for k, v in headers.items()} == expected
    info = model_info(out)
    assert info.synthetic and info.n_params == replace(NM, n_layers=1).n_params()
    tok = json.loads((out / "tokenizer.json").read_text())
    n_entries = len(tok["model"]["vocab"]) + sum(
        t["id"] >= len(tok["model"]["vocab"]) for t in tok["added_tokens"])
    assert n_entries == 51200 and tok["pre_tokenizer"]["pretokenizers"][2]["pattern"] == {
        "Regex": ".{1,24}"}
    assert json.loads((out / "manifest.json").read_text())["settings"]["synthetic"] is True


def test_full_shape_is_11_4b_parameters():
    assert abs(NM.n_params() - 11.43e9) < 0.01e9


def test_quality_measurements_refuse_synthetic_weights(synth_one_layer, cache_dir, tmp_path):
    from kvant.quantize.gptq import GPTQSettings
    from kvant.quantize.gptq_pipeline import run

    out = synth_one_layer[0]
    with pytest.raises(SettingsError, match="synthetic \\(random\\) weights"):
        run(out, tmp_path / "g", GPTQSettings(calib=str(CALIB_FILE)), source={},
            cache_dir=cache_dir, data_dir=UD_DIR)


@pytest.fixture(scope="module")
def synth_gguf(synth_one_layer, cache_dir, tmp_path_factory):
    from kvant.export import gguf_pipeline
    from kvant.export.gguf import GGUFSettings

    settings = GGUFSettings(types=("bf16", "q4_k_m"), imatrix="none")
    out = tmp_path_factory.mktemp("sgguf") / "gguf"
    return gguf_pipeline.run(synth_one_layer[0], out, settings, source={"id": "synthetic"},
                             cache_dir=cache_dir, data_dir=UD_DIR).out


def test_gguf_export_of_synthetic_converts_but_scores_nothing(synth_gguf):
    from kvant.artifact import read_manifest

    manifest = read_manifest(synth_gguf)
    files = manifest["validation"]["files"]
    assert "mean_kld" not in files["q4_k_m"]
    assert 4.5 < files["q4_k_m"]["bits_per_weight"] < 6.5
    assert any("synthetic" in w for w in manifest["warnings"])


def test_the_plans_weights_and_kv_cache_match_the_engines_own_accounting_at_real_width(
        synth_one_layer, synth_gguf):
    """At NorMistral's width (one layer, GQA 32/8 heads of 128), not the stand-in's: the
    plan's bf16 weights against the checkpoint's bytes, and its KV cache against what
    llama.cpp reports holding for the same cached tokens."""
    import llama_cpp

    from kvant.model import read_config, weight_files
    from kvant.plan.kinds import kind, shape_of
    from kvant.runtimes.llamacpp import LlamaCppRuntime

    shape = shape_of(read_config(synth_one_layer[0]))
    on_disk = sum(f.stat().st_size for f in weight_files(synth_one_layer[0]))
    assert abs(weight_bytes(shape, kinds()["bf16"]) / on_disk - 1) < 0.01
    tokens = 256
    gguf_file = next(synth_gguf.glob("*Q4_K_M.gguf"))
    for kv in ("f16", "q8_0"):
        runtime = LlamaCppRuntime(gguf_file, n_ctx=2 * tokens, all_logits=False, kv_type=kv)
        try:
            runtime.llm.eval(list(range(5, 5 + tokens)))
            held = llama_cpp.llama_state_seq_get_size(runtime.llm.ctx, 0)
        finally:
            runtime.close()
        planned = kv_bytes(shape, kind("gguf-q4_k_m"), tokens, kv)
        assert abs(planned / held - 1) < 0.05, (kv, planned, held)


def test_plan_predictions_grow_with_context():
    pred = predict(NM, [4096, 32768])
    assert pred["gguf-q4_k_m"][4096] < 8 * GIB < pred["bf16"][4096]
    for name in pred:  # more context never needs less memory
        assert pred[name][32768] > pred[name][4096]


def test_plan_kinds_follow_the_recorded_settings():
    from kvant.plan.kinds import kind

    # GPTQ: smaller groups store more scales; each group size gets its own bits per weight
    assert kind("gptq-4bit-g32").linear_bpw > kind("gptq-4bit-g128").linear_bpw > 4
    assert kind("gptq-8bit-g-1").linear_bpw == 8
    assert kind("onnx-int4-b128").linear_bpw < kind("onnx-int4-b32").linear_bpw
    assert kind("bnb-nf4-dq").linear_bpw < kind("bnb-nf4").linear_bpw
    # a GGUF type outside the table is planned from the file's own bits per weight
    assert kind("gguf-q2_k") is None
    assert kind("gguf-q2_k", file_bpw=3.0).linear_bpw == 3.0
    assert kind("something-else") is None


def test_the_plan_predicts_each_gguf_step_at_real_width(synth_one_layer, cache_dir, tmp_path):
    """The release's GGUF steps on one real-width layer, each measured (kvant.recorder) and
    predicted by kvant.plan from the shapes alone: within the rehearsal's 15%."""
    from kvant.app.rehearsal import TOLERANCE_PCT
    from kvant.export import gguf_pipeline
    from kvant.export.gguf import GGUFSettings
    from kvant.memory import ram_bytes
    from kvant.model import read_config
    from kvant.plan.kinds import shape_of
    from kvant.plan.sizes import MIB
    from kvant.plan.steps import step_peak
    from kvant.recorder import recording

    out = synth_one_layer[0]
    settings = GGUFSettings(types=("q8_0",), imatrix="none", eval_langs=("nob",),
                            eval_tokens=256)
    with recording() as steps:
        gguf_pipeline.run(out, tmp_path / "gguf", settings, source={"id": "rehearsal"},
                          cache_dir=cache_dir, data_dir=UD_DIR, rehearsal=True)
    assert [s["step"] for s in steps] == ["reference", "gguf convert bf16",
                                          "gguf quantize q8_0", "gguf score q8_0",
                                          "gguf tokenizer report"]
    shape = shape_of(read_config(out))
    for record in steps:
        predicted = step_peak(record, shape, ram_bytes(), record["start_rss_mib"]) / MIB
        error = 100 * (predicted / record["peak_rss_mib"] - 1)
        assert abs(error) <= TOLERANCE_PCT, (record, predicted)


def test_the_torch_mix_sensitivity_is_timed_and_planned_at_real_width(synth_one_layer,
                                                                       cache_dir, tmp_path):
    """What a rehearsal measures of the torch sensitivity (kvant.export.gguf_pipeline.
    _rehearse_torch) on one real-width layer: its peak within the plan's 15%, its first
    evaluation timed inside the step, and at 40 layers on this CPU over the time budget, so
    the plan says what auto does here instead (the uniform file ships, no -MIX)."""
    from dataclasses import replace

    from kvant.app.rehearsal import TOLERANCE_PCT, rows
    from kvant.data import get_text
    from kvant.export.gguf import GGUFSettings
    from kvant.export.gguf_convert import convert
    from kvant.export.gguf_pipeline import _rehearse_torch
    from kvant.memory import ram_bytes
    from kvant.model import read_config
    from kvant.plan.kinds import shape_of
    from kvant.recorder import recording

    out = synth_one_layer[0]
    base = tmp_path / "bf16.gguf"
    convert(out, base, "bf16")
    settings = GGUFSettings(types=("q4_k_m-mix",), imatrix="none", mix_tokens=512,
                            eval_ctx=512, mix_time_budget=3600)
    with recording() as steps:
        _rehearse_torch(settings, out, base, None, get_text(CALIB_FILE, cache_dir), tmp_path,
                        None, "cpu", ("q4_k_m-mix",))
    assert [s["step"] for s in steps] == ["reference", "gguf mix sensitivity torch"]
    record = steps[1]
    estimate = record["estimate"]
    # 9 tensors (7 matrices, token_embd, output) x q3_k..q8_0 without an importance matrix
    assert (record["tensors"], record["types"], estimate["evaluations"]) == (9, 5, 45)
    # the timed pieces ran inside the step, after the model was loaded
    assert estimate["quantize_s"] + estimate["first_s"] < record["wall_s"]
    shape = shape_of(read_config(out))
    (row,) = [r for r in rows(steps, shape, replace(shape, n_layers=40), ram_bytes())
              if r["step"] == "gguf mix sensitivity torch"]
    assert abs(row["error_pct"]) <= TOLERANCE_PCT, row
    # 40 layers: 282 tensors x 5 types, a forward running on average half of 40 layers: on
    # 2 cores over the hour's budget on every CPU measured (9 h on a 2-core Xeon, 2.4-2.7 h on
    # 2 cores of an EPYC), so the budget is the bound, not a multiple tuned to one machine
    assert row["full_wall_s"] > settings.mix_time_budget
    assert row["machines"]["24 GB CPU-only"].endswith("auto ships the uniform file, no -MIX")
    assert "-MIX" not in row["machines"]["24 GB GPU + 32 GB RAM"]  # not measured there


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_bitsandbytes_quantizes_tensor_by_tensor_at_real_width(synth_one_layer, tmp_path,
                                                               mode):
    """One real-width layer quantized by the streaming writer in a fresh process: its peak
    within the plan's 15%; and that plan, carried to 40 layers, is under the 16 GB goal (the
    old load-then-save held the mapped bf16 model: 35-40 GB)."""
    from kvant.app.rehearsal import TOLERANCE_PCT
    from kvant.memory import ram_bytes
    from kvant.model import read_config
    from kvant.plan.kinds import shape_of
    from kvant.plan.sizes import MIB
    from kvant.plan.steps import step_peak

    out = synth_one_layer[0]
    script = (
        "import sys, json\nfrom pathlib import Path\nimport torch, transformers\n"
        "from kvant.quantize.bnb import BnbSettings\n"
        "from kvant.quantize.bnb_pipeline import quantize_bnb\n"
        "from kvant.recorder import recording, step\n"
        "with recording() as log:\n"
        f"    with step('bnb-{mode} quantize', kind='bnb-{mode}'):\n"
        f"        quantize_bnb(Path(sys.argv[1]), Path(sys.argv[2]), BnbSettings(mode='{mode}'))\n"
        "print(json.dumps(log[0]))\n")
    target = tmp_path / mode
    target.mkdir()
    result = subprocess.run([sys.executable, "-c", script, str(out), str(target)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    shape = shape_of(read_config(out))
    predicted = step_peak(record, shape, ram_bytes(), record["start_rss_mib"]) / MIB
    assert abs(100 * (predicted / record["peak_rss_mib"] - 1)) <= TOLERANCE_PCT, record
    full = step_peak(record, NM, ram_bytes(), 1200)
    assert full < 16 * 10**9 and full < 2 * NM.n_params() / 2, full


def test_the_streamed_reference_is_planned_at_real_width(synth_one_layer, cache_dir,
                                                         tmp_path, monkeypatch):
    """The reference one layer at a time on one real-width layer: its peak within the plan's
    15%; carried to 40 layers it fits the 24 GB CPU-only machine, which the whole-model
    reference does not (the issue's 22-27 GB)."""
    from dataclasses import replace

    from kvant.app.rehearsal import MACHINES, TOLERANCE_PCT, rows
    from kvant.data import get_text
    from kvant.memory import ram_bytes
    from kvant.model import read_config
    from kvant.plan.kinds import shape_of
    from kvant.recorder import recording, step
    from kvant.runtimes.reference import STREAM_ENV, reference_logits
    from kvant.scoring import eval_windows

    out = synth_one_layer[0]
    wins = eval_windows(out, {"nob": get_text("nob", cache_dir, UD_DIR)}, 1024, 512)
    monkeypatch.setenv(STREAM_ENV, "1")
    with recording() as steps:
        with step("reference", kind="reference", ctx=512):
            reference_logits(out, wins, tmp_path / "ref")
    assert steps[0]["streamed"] is True and steps[0]["tokens"] == 1024
    shape = shape_of(read_config(out))
    (row,) = rows(steps, shape, replace(shape, n_layers=40), ram_bytes())
    assert abs(row["error_pct"]) <= TOLERANCE_PCT, row
    assert row["full_predicted_gib"] * 2**30 < 0.9 * MACHINES["24 GB CPU-only"][0]
    assert row["machines"]["24 GB CPU-only"] == "fits"


_FILE_PAGES = """
import sys
from kvant.runtimes.hf import TorchRuntime
runtime = TorchRuntime(sys.argv[1], dtype="bfloat16")
runtime.logits(list(range(100, 612)))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["RssFile"].split()[0]) * 1024, int(status["RssAnon"].split()[0]) * 1024)
"""


def test_the_benchs_bf16_rows_run_on_mapped_pages_at_real_width(synth_one_layer, cache_dir,
                                                                tmp_path):
    """The bench's rows of the bf16 folder on one real-width layer. transformers keeps the
    weights as pages of the mapped safetensors (reclaimable), which the plan counts as mapped;
    each row's peak is within the rehearsal's 15%; and at 40 layers their anonymous part fits
    the 24 GB CPU-only machine, the rest re-read from the file as RAM runs short."""
    from dataclasses import replace

    from kvant.app.rehearsal import TOLERANCE_PCT, rows
    from kvant.bench.run import run_bench
    from kvant.bench.settings import BenchSettings
    from kvant.memory import ram_bytes
    from kvant.model import read_config
    from kvant.plan.kinds import shape_of
    from kvant.plan.steps import step_mapped
    from kvant.recorder import recording

    out = synth_one_layer[0]
    shape = shape_of(read_config(out))
    mapped = step_mapped({"step": "bench quality reference-bf16", "kind": "bf16"}, shape,
                         ram_bytes())
    result = subprocess.run([sys.executable, "-c", _FILE_PAGES, str(out)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    file_pages, anonymous = map(int, result.stdout.split()[-2:])
    # every page the plan calls mapped is a file page, the embedding's table is not resident,
    # and what is anonymous (the imports, a window's work) is not the weights
    assert 0.95 * mapped <= file_pages <= mapped + 256 * 2**20, (file_pages, mapped)
    assert anonymous < mapped / 2, anonymous

    settings = BenchSettings(langs=("nob",), ctx=("512",), quality_tokens=512, repeats=1,
                             peer_checks=False, device="cpu", max_attempts=1)
    with recording() as steps:
        run_bench([], out, settings, tmp_path / "bench", cache_dir=cache_dir,
                  data_dir=UD_DIR, rehearsal=True)
    bench = [s for s in steps if s["step"].startswith("bench ")]
    assert [s["step"] for s in bench] == ["bench quality reference-bf16",
                                          "bench speed reference-bf16 @512"]
    for row in rows(bench, shape, replace(shape, n_layers=40), ram_bytes()):
        assert abs(row["error_pct"]) <= TOLERANCE_PCT, row
        assert row["machines"]["24 GB CPU-only"].startswith("fits"), row


def test_a_task_eval_of_the_bf16_folder_is_planned_in_the_dtype_it_scores_in(
        synth_one_layer, cache_dir, tmp_path):
    """`kvant eval`'s step on one real-width layer of the bf16 folder: KvantLM scores it in
    the reference's dtype (float32 where it fits, as here: a converted copy beside the mapped
    pages), and the step's peak is within the rehearsal's 15% of the plan (the plan had it as
    bf16 pages, 47% under the 1-layer rehearsal's measurement). At 40 layers the dtype is
    chosen anew: bfloat16 on the 24 GB CPU-only machine, where the step then fits on mapped
    pages."""
    from dataclasses import replace

    from kvant.app.lmeval import run_eval
    from kvant.app.rehearsal import TOLERANCE_PCT, rows
    from kvant.memory import ram_bytes
    from kvant.model import read_config
    from kvant.plan.kinds import shape_of
    from kvant.recorder import recording

    out = synth_one_layer[0]
    with recording() as steps:
        run_eval([], out, ["kvant_cloze_nob"], tmp_path / "eval", cache_dir=cache_dir,
                 data_dir=UD_DIR, limit=4)
    (record,) = steps
    assert record["dtype"] == "float32" and record["task_eval"] is True
    shape = shape_of(read_config(out))
    (row,) = rows(steps, shape, replace(shape, n_layers=40), ram_bytes())
    assert abs(row["error_pct"]) <= TOLERANCE_PCT, row
    assert row["machines"]["24 GB CPU-only"].startswith("fits"), row
