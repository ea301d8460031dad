"""ONNX export on the stand-in: each precision built, loaded in onnxruntime, within tolerance."""

from __future__ import annotations

import json

import pytest

from kvant.artifact import read_manifest, verify_artifact
from kvant.errors import SettingsError
from kvant.export.onnx import ONNXSettings
from kvant.export.onnx_pipeline import EXACT_TOKENIZER
from kvant.runtimes.onnx import og_model
from tests.conftest import CALIB_FILE, UD_DIR, run_kvant


def _validation(out):
    return read_manifest(out)["validation"]


def test_files_and_genai_config(onnx_artifacts):
    for out in onnx_artifacts.values():
        assert verify_artifact(out) == []
        for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json",
                     EXACT_TOKENIZER):
            assert (out / name).is_file(), name
        decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
        assert (decoder["num_key_value_heads"], decoder["head_size"]) == (1, 128)
        assert "past_key_names" in decoder["inputs"]  # KV cache
    for name, kind in (("fp32", "onnx-fp32"), ("fp16", "onnx-fp16"),
                       ("int4-b32", "onnx-int4-b32"), ("int4-b128", "onnx-int4-b128")):
        assert read_manifest(onnx_artifacts[name])["kinds"] == {name: kind}
    cuda = json.loads((onnx_artifacts["fp16"] / "genai_config.json").read_text())
    assert "cuda" in json.dumps(cuda["model"]["decoder"]["session_options"])


def test_fp32_matches_transformers_and_generates_identically(onnx_artifacts):
    v = _validation(onnx_artifacts["fp32"])
    assert v["max_abs_logit_diff"] < 1e-3
    assert v["mean_kld"] < 1e-6 and v["top1_agreement_pct"] > 99.9
    assert v["greedy_identical"] is True


def test_fp16_close_and_int4_within_bounds(onnx_artifacts):
    fp16 = _validation(onnx_artifacts["fp16"])
    assert fp16["mean_kld"] < 1e-4 and fp16["top1_agreement_pct"] > 98
    for name in ("int4-b32", "int4-b128"):
        v = _validation(onnx_artifacts[name])
        assert 0 < v["mean_kld"] < 0.02 and v["top1_agreement_pct"] > 75
        assert all(abs(d["delta_ppl_pct"]) < 10 for d in v["per_language"].values())


def test_int4_block_size_trades_scales_for_little_accuracy(onnx_artifacts):
    # with k_quant's scale search (the default) block 128 loses little to block 32 on the
    # stand-in; 32 keeps more scales
    b32 = _validation(onnx_artifacts["int4-b32"])["mean_kld"]
    b128 = _validation(onnx_artifacts["int4-b128"])["mean_kld"]
    assert abs(b32 - b128) < 0.25 * max(b32, b128)
    size = {n: (onnx_artifacts[n] / "model.onnx.data").stat().st_size
            for n in ("int4-b32", "int4-b128")}
    assert size["int4-b32"] > size["int4-b128"]  # more scales


def test_default_int4_quantizer_beats_round_to_nearest(onnx_artifacts, tiny_model, cache_dir,
                                                       tmp_path):
    """The default (k_quant, lm_head in int8) against the builder's round-to-nearest, same
    block size and accuracy level, on the same held-out text."""
    from kvant.export.onnx_pipeline import run

    rtn = run(tiny_model, tmp_path / "rtn", ONNXSettings(precision="int4", int4_algo="rtn",
                                                         eval_tokens=1024),
              source={"id": "tiny"}, cache_dir=cache_dir, data_dir=UD_DIR).out
    default, plain = _validation(onnx_artifacts["int4-b32"]), _validation(rtn)
    assert read_manifest(onnx_artifacts["int4-b32"])["settings"]["int4_algo"] == "k_quant_last"
    assert default["mean_kld"] < 0.5 * plain["mean_kld"]
    assert default["top1_agreement_pct"] > plain["top1_agreement_pct"]


def test_shipped_tokenizer_never_crashes_and_fidelity_is_recorded(onnx_artifacts):
    og_tok = _validation(onnx_artifacts["int4-b32"])["og_tokenizer"]
    assert set(og_tok) == {"nob", "nno", "sme", "dan", "swe"}
    for lang, f in og_tok.items():
        assert f["og_crashes"] == 0, lang
        assert f["og_aligned_pct"] > 90, lang


def test_exact_tokenizer_is_the_source_tokenizer(onnx_artifacts, tiny_model):
    exact = json.loads((onnx_artifacts["fp32"] / EXACT_TOKENIZER).read_text())
    assert exact == json.loads((tiny_model / "tokenizer.json").read_text())
    shipped = json.loads((onnx_artifacts["fp32"] / "tokenizer.json").read_text())
    chunk = shipped["pre_tokenizer"]["pretokenizers"][2]["pattern"]["Regex"]
    assert chunk == r"[\s\S]{1,24}(?![\x80-\xBF])"
    import onnxruntime_genai as og

    tok = og.Tokenizer(og_model(onnx_artifacts["fp32"]))
    # a word whose 24-byte cut falls inside "å" crashes the original split; not this one
    assert len(tok.encode(" familjerådgivningsbyrå")) > 1


def test_settings_errors_and_cli(tiny_model, tmp_path, onnx_artifacts):
    with pytest.raises(SettingsError, match="did you mean 'cuda'"):
        ONNXSettings(provider="cudaa")
    with pytest.raises(SettingsError, match="fp16 is built for --provider cuda or dml"):
        ONNXSettings(precision="fp16")
    bad = run_kvant("export", "onnx", "--model", str(tiny_model), "--out", str(tmp_path / "x"),
                    "--precision", "int8")
    assert bad.returncode == 2 and "unknown precision 'int8'" in bad.stderr
    again = run_kvant("export", "onnx", "--model", str(tiny_model), "--out",
                      str(onnx_artifacts["fp32"]))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_built_for_the_trained_context(tiny_model, tmp_path, cache_dir):
    """A config that says 1,024,000 positions: GenAI's max_length and the rotary caches are
    built for NorMistral-11b-long's trained 32,768 instead."""
    import shutil

    from kvant.export.onnx_pipeline import run
    from tests.conftest import UD_DIR

    model = tmp_path / "normistral-11b-long"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config,
                                                   "max_position_embeddings": 1_024_000}))
    out = run(model, tmp_path / "onnx", ONNXSettings(eval_langs=("nob",), eval_tokens=256),
              source={"id": str(model)}, cache_dir=cache_dir, data_dir=UD_DIR).out
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == 32768
    assert genai["search"]["max_length"] <= 32768
    manifest = read_manifest(out)
    assert manifest["validation"]["context_length"] == 32768
    assert any("1,024,000" in w for w in manifest["warnings"])
    assert json.loads((model / "config.json").read_text())["max_position_embeddings"] == 1_024_000


def test_int4_from_the_gptq_checkpoint(gptq_artifact, onnx_artifacts, tiny_model, tmp_path,
                                       cache_dir):
    """`--int4-algo gptq`: the builder's pre-quantized path on Kvant's GPTQ artifact, through
    the console script. Its logits follow the GPTQ checkpoint's (its weights were taken, not
    re-quantized), it scores no worse than the builder's own k_quant_last at the same block
    size and bytes, and the GPTQ weights it came from are recorded by checksum."""
    from kvant.files import sha256_file
    from tests.conftest import logits_of, reference_for

    out = tmp_path / "int4-gptq"
    result = run_kvant("--no-progress", "export", "onnx", "--model", str(tiny_model), "--out",
                       str(out), "--int4-algo", "gptq", "--gptq", str(gptq_artifact),
                       "--block-size", "128", "--eval-tokens", "1024",
                       env={"KVANT_DATA_DIR": str(UD_DIR)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert verify_artifact(out) == []
    made = _validation(out)
    assert made["int4_from"] == {"folder": gptq_artifact.name, "weights_sha256": {
        "model.safetensors": sha256_file(gptq_artifact / "model.safetensors")}}
    own = _validation(onnx_artifacts["int4-b128"])
    assert made["mean_kld"] <= own["mean_kld"], (made["mean_kld"], own["mean_kld"])
    size = {n: (p / "model.onnx.data").stat().st_size
            for n, p in (("gptq", out), ("own", onnx_artifacts["int4-b128"]))}
    assert size["gptq"] <= 1.01 * size["own"], size
    # closer to the GPTQ checkpoint than the builder's own int4 is: the GPTQ weights are in it
    from kvant.scoring import drift

    wins, _ = reference_for(tiny_model, ("nob",), 512, 256, cache_dir, tmp_path / "ref")
    gptq = logits_of(gptq_artifact, wins["nob"])
    ours, theirs = (drift(gptq, logits_of(p, wins["nob"]), wins["nob"]).mean_kld
                    for p in (out, onnx_artifacts["int4-b128"]))
    assert ours < 0.5 * theirs, (ours, theirs)


def test_int4_from_gptq_lean_build_writes_the_builders_own_bytes(gptq_artifact, tmp_path):
    """The lm_head quantized in the builder's own graph (kvant.export.onnx_builder, which
    spares the whole-graph copy) gives the same graph and weight bytes as the builder's own
    route through MatMulNBitsQuantizer, and no float MatMul is left."""
    import onnx

    from kvant.export.onnx_pipeline import build

    settings = ONNXSettings(precision="int4", int4_algo="gptq", block_size=128)
    outs, facts = {}, {}
    for lean in (True, False):
        outs[lean] = tmp_path / f"lean-{lean}"
        outs[lean].mkdir()
        facts[lean] = build(gptq_artifact, outs[lean], settings, tmp_path, lean=lean)
    # the in-place route ran (equal bytes alone would not tell it from the builder's own)
    assert facts[True]["quantized_in_place"] == ["/lm_head/MatMul"]
    assert "quantized_in_place" not in facts[False]
    for name in ("model.onnx", "model.onnx.data"):
        assert (outs[True] / name).read_bytes() == (outs[False] / name).read_bytes(), name
    graph = onnx.load(outs[True] / "model.onnx", load_external_data=False).graph
    assert not [n.name for n in graph.node if n.op_type == "MatMul"]
    head = next(n for n in graph.node if n.name == "/lm_head/MatMul_Q8")
    assert {a.name: a.i for a in head.attribute}["bits"] == 8


def test_int4_from_gptq_refuses_what_it_cannot_build_from(gptq_artifact, tiny_model, tmp_path):
    """Each wrong --gptq is one line naming the fix, exit 2, before any work."""
    base = ("export", "onnx", "--model", str(tiny_model), "--out", str(tmp_path / "x"),
            "--int4-algo", "gptq")
    cases = [((), "pass --gptq DIR"),
             (("--gptq", str(gptq_artifact)), "pass --block-size 128"),
             (("--gptq", str(tiny_model), "--block-size", "128"), "is not a GPTQ checkpoint"),
             (("--gptq", str(gptq_artifact), "--block-size", "128", "--precision", "fp32"),
              "--int4-algo gptq builds int4 models")]
    for extra, message in cases:
        bad = run_kvant(*base, *extra)
        assert bad.returncode == 2 and message in bad.stderr, (extra, bad.stderr[-500:])
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "x").exists()


def test_int4_from_gptq_on_widths_unlike_the_stand_ins(odd_model, tmp_path):
    """The odd-width stand-in (hidden 576, heads of 64, SwiGLU 1,536): GPTQ at group 64 (128
    does not divide 576) and the ONNX int4 built from it, as a user runs both. Its cached
    greedy decode agrees with its own full-sequence argmax and it stays near bf16."""
    gptq, onnx = tmp_path / "odd-gptq", tmp_path / "odd-onnx"
    env = {"KVANT_DATA_DIR": str(UD_DIR)}
    made = run_kvant("--no-progress", "quantize", "gptq", "--model", str(odd_model), "--out",
                     str(gptq), "--group-size", "64", "--samples", "16", "--seqlen", "128",
                     "--eval-tokens", "512", "--calib", str(CALIB_FILE), "--device", "cpu",
                     env=env)
    assert made.returncode == 0, made.stderr[-2000:]
    built = run_kvant("--no-progress", "export", "onnx", "--model", str(odd_model), "--out",
                      str(onnx), "--int4-algo", "gptq", "--gptq", str(gptq), "--block-size",
                      "64", "--eval-tokens", "512", env=env)
    assert built.returncode == 0, built.stderr[-2000:]
    v = _validation(onnx)
    assert v["int4_from"]["folder"] == "odd-gptq"
    assert v["greedy_identical"] is True
    assert 0 < v["mean_kld"] < 0.01 and v["top1_agreement_pct"] > 90, v
    decoder = json.loads((onnx / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_key_value_heads"], decoder["head_size"]) == (3, 64)


def test_genai_takes_a_long_prompt_in_batches_with_the_next_tokens_unchanged(onnx_artifacts,
                                                                              eval_text):
    """A prompt over two of GenAI's prefill batches continues as the plain session's argmax
    of the whole sequence says, token by token, and as one forward of the prompt does."""
    import numpy as np

    from kvant.runtimes.onnx import PREFILL_BATCH, GenaiRuntime, OrtRuntime, append
    from kvant.tokenization import tokenize

    path = onnx_artifacts["fp32"]
    ids = tokenize(path, eval_text.path.read_text(encoding="utf-8"))[:2 * PREFILL_BATCH + 277]
    runtime = GenaiRuntime(path)
    batched = list(runtime.greedy(ids, max_length=len(ids) + 6))  # PREFILL_BATCH a forward
    generator = runtime._generator(len(ids) + 6)
    append(generator, ids, batch=len(ids))
    whole = []
    for _ in range(6):
        generator.generate_next_token()
        whole.append(int(generator.get_next_tokens()[0]))
    logits = OrtRuntime(path).logits(ids + batched)
    teacher = [int(np.argmax(row)) for row in logits[len(ids) - 1:-1]]
    assert len(batched) == 6 and batched == teacher == whole


_PREFILL_PEAK = """
import sys
import numpy as np
from kvant.memory import peak_rss_mib
from kvant.runtimes.onnx import GenaiRuntime, append
runtime = GenaiRuntime(sys.argv[1])
ids = list(np.random.default_rng(0).integers(100, runtime._vocab_size(), int(sys.argv[2])))
generator = runtime._generator(len(ids) + 1)
before = peak_rss_mib()
append(generator, ids, batch=int(sys.argv[3]))
print(peak_rss_mib() - before)
"""


def test_genai_prefill_in_batches_holds_a_batchs_logits_not_the_contexts(onnx_artifacts):
    """One forward of 8,192 tokens holds GenAI's float32 logits of every position (8,192 x
    the stand-in's 4,096 entries x 4 bytes = 128 MiB, more with its copies); the runtime's
    batches of 512 hold one batch's (8 MiB). Each measured in a fresh process, as the bench's
    speed rows are."""
    import subprocess
    import sys

    from kvant.plan.peaks import PREFILL_BATCH

    def grown_mib(batch: int) -> float:
        out = subprocess.run([sys.executable, "-c", _PREFILL_PEAK,
                              str(path), str(ctx), str(batch)],
                             capture_output=True, text=True, check=True, timeout=300)
        return float(out.stdout.split()[-1])

    path, ctx = onnx_artifacts["int4-b128"], 8192
    whole, batched = grown_mib(ctx), grown_mib(PREFILL_BATCH)
    logits_mib = ctx * json.loads((path / "config.json").read_text())["vocab_size"] * 4 / 2**20
    assert whole > logits_mib
    assert batched < whole - 0.8 * logits_mib


def test_the_runtime_keeps_to_the_context_it_is_opened_with(onnx_artifacts, tiny_model,
                                                            eval_text):
    """`serve --ctx`, the bench's contexts and the plan open ONNX Runtime GenAI with a
    context: a generation stops when prompt and new tokens fill it, as llama.cpp's does."""
    import itertools

    from kvant.runtimes import open_runtime
    from kvant.runtimes.targets import targets
    from kvant.tokenization import exact_tokenizer

    prompt = exact_tokenizer(tiny_model).encode(eval_text.read()[:2000]).ids[:32]
    target = targets(onnx_artifacts["int4-b32"])[0]
    got = {}
    for n_ctx in (0, 40):  # 0: the trained context
        runtime = open_runtime(target, n_ctx=n_ctx)
        try:
            got[n_ctx] = list(itertools.islice(runtime.greedy(prompt), 16))
        finally:
            runtime.close()
    assert len(got[0]) == 16  # the model does not stop by itself within 16 tokens here
    assert got[40] == got[0][:8]


def test_the_genai_tokenizer_rewrites_only_normistrals_chunk_split():
    """Other models' pre-tokenizers (SmolLM2's single ByteLevel, or none) pass through; the
    24-character chunk split inside NorMistral's Sequence becomes the 24-byte one."""
    from kvant.export.onnx_pipeline import OG_SPLIT, og_tokenizer_json

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    for pre in (byte_level, None):
        spec = {"pre_tokenizer": pre, "model": {"type": "BPE"}}
        assert og_tokenizer_json(spec) == spec
    chunks = {"type": "Split", "pattern": {"Regex": ".{1,24}"}, "behavior": "Isolated"}
    spec = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [byte_level, chunks]}}
    rewritten = og_tokenizer_json(spec)["pre_tokenizer"]["pretokenizers"]
    assert rewritten == [byte_level, {**chunks, "pattern": {"Regex": OG_SPLIT}}]
    assert spec["pre_tokenizer"]["pretokenizers"][1] == chunks  # the input is left as it was


def test_int4_from_gptq_of_a_model_with_tied_embeddings(micro_model, cache_dir, tmp_path):
    """SmolLM2 and most small Llamas tie lm_head to the embeddings: the builder shares them
    by default and from a GPTQ checkpoint wrote a graph ONNX Runtime refused to load (an
    int8 lm_head naming an initializer never written). The lm_head is now its own int8
    MatMulNBits, and the model scores against its source."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvant.app.pipelines import PIPELINES
    from kvant.quantize.gptq import GPTQSettings

    torch.manual_seed(0)
    model = tmp_path / "tied"
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, tie_word_embeddings=True, max_position_embeddings=2048)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(micro_model / name, model / name)
    scored = {"eval_tokens": 256, "eval_ctx": 64, "eval_langs": ("nob",)}
    PIPELINES["gptq"].run(model, tmp_path / "gptq", GPTQSettings(
        group_size=32, calib=str(CALIB_FILE), samples=16, seqlen=64, **scored),
        source={"id": "tied"}, cache_dir=cache_dir, data_dir=UD_DIR)
    out = PIPELINES["onnx"].run(model, tmp_path / "onnx", ONNXSettings(
        int4_algo="gptq", block_size=32, **scored), source={"id": "tied"},
        cache_dir=cache_dir, data_dir=UD_DIR, gptq_dir=tmp_path / "gptq").out
    assert verify_artifact(out) == []
    validation = read_manifest(out)["validation"]
    assert validation["quantized_in_place"] == ["/lm_head/MatMul"]
    assert validation["mean_kld"] < 0.01 and validation["top1_agreement_pct"] > 50
