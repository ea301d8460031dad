"""One backend per runtime: transformers (bf16, bnb, GPTQ), llama.cpp (GGUF), ORT GenAI (ONNX).

Each backend loads one artifact and offers the same three things: logits for given token ids
(quality), a timed prefill of n tokens, and a timed greedy decode of n tokens at a depth
(speed). The bench picks the backend from the artifact's manifest, or from the file kind.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvant.errors import ArtifactError


@dataclass(frozen=True)
class Target:
    """One thing to measure: a model folder, one .gguf file, or an ONNX folder."""

    name: str
    path: Path
    backend: str
    """torch, llama.cpp or onnxruntime-genai."""
    fmt: str
    """bf16, bnb, gptq, gguf or onnx: how it was made."""
    size_bytes: int


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()
               and f.suffix in (".safetensors", ".gguf", ".onnx", ".data"))


def targets(path: Path) -> list[Target]:
    """The measurable targets in ``path``: every model file of a GGUF artifact, else one."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        return [Target(path.stem, path, "llama.cpp", "gguf", path.stat().st_size)]
    if not path.is_dir():
        raise ArtifactError(f"'{path}' is neither an artifact folder nor a .gguf file")
    manifest = path / "manifest.json"
    fmt = json.loads(manifest.read_text())["format"] if manifest.is_file() else "bf16"
    if fmt == "gguf" or list(path.glob("*.gguf")) and not (path / "config.json").exists():
        files = [f for f in sorted(path.glob("*.gguf")) if not f.name.endswith("imatrix.gguf")]
        return [Target(f.stem, f, "llama.cpp", "gguf", f.stat().st_size) for f in files]
    if fmt == "onnx" or (path / "genai_config.json").is_file():
        return [Target(path.name, path, "onnxruntime-genai", "onnx", _folder_size(path))]
    if not (path / "config.json").is_file():
        raise ArtifactError(f"'{path}' holds no model Kvant can benchmark (no config.json, "
                            "*.gguf or genai_config.json)")
    return [Target(path.name, path, "torch", "bf16" if fmt == "tiny" else fmt,
                   _folder_size(path))]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class TorchBackend:
    def __init__(self, target: Target, device: str = "cpu", threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        quantized = "quantization_config" in json.loads((target.path / "config.json").read_text())
        kwargs = {"device_map": device} if quantized else {"dtype": torch.bfloat16}
        self.model = AutoModelForCausalLM.from_pretrained(target.path, **kwargs).eval()
        if not quantized:
            self.model.to(device)
        self.device = device

    def logits(self, win: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(torch.tensor([win], device=self.device)).logits[0]
        return out.float().cpu().numpy()

    def prefill(self, ids: list[int]) -> float:
        import torch

        with torch.no_grad():
            _sync(self.device)
            start = time.perf_counter()
            self.model(torch.tensor([ids], device=self.device), use_cache=True)
            _sync(self.device)
        return time.perf_counter() - start

    def decode(self, ids: list[int], n_new: int) -> float:
        import torch

        with torch.no_grad():
            out = self.model(torch.tensor([ids], device=self.device), use_cache=True)
            cache, token = out.past_key_values, out.logits[0, -1].argmax()
            _sync(self.device)
            start = time.perf_counter()
            for _ in range(n_new):
                out = self.model(token.view(1, 1), past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[0, -1].argmax()
            _sync(self.device)
        return time.perf_counter() - start


    def greedy(self, ids: list[int]):
        """Yield greedy next tokens forever (the caller stops), reusing the KV cache."""
        import torch

        with torch.no_grad():
            out = self.model(torch.tensor([ids], device=self.device), use_cache=True)
            while True:
                token = out.logits[0, -1].argmax()
                yield int(token)
                out = self.model(token.view(1, 1), past_key_values=out.past_key_values,
                                 use_cache=True)


class LlamaCppBackend:
    def __init__(self, target: Target, device: str = "cpu", threads: int = 0, n_ctx: int = 0,
                 all_logits: bool = True):
        import llama_cpp

        # Speed runs keep only the last position's logits, as llama-bench does: copying
        # (tokens x vocab) floats out of every prefill would be measured as if it were compute.
        self.llm = llama_cpp.Llama(str(target.path), n_ctx=n_ctx or 4096, n_batch=512,
                                   logits_all=all_logits, verbose=False,
                                   n_gpu_layers=-1 if device.startswith("cuda") else 0,
                                   n_threads=threads or os.cpu_count(),
                                   n_threads_batch=threads or os.cpu_count())

    def logits(self, win: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(win)
        return np.array(self.llm.scores[:len(win)], dtype=np.float32)

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - start

    def _last_logits(self) -> np.ndarray:
        """The newest position's logits straight from llama.cpp (valid with or without
        logits_all; llama-cpp-python's `scores` buffer is only n_batch rows without it)."""
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),))

    def decode(self, ids: list[int], n_new: int) -> float:
        self.llm.reset()
        self.llm.eval(ids)
        token = int(np.argmax(self._last_logits()))
        start = time.perf_counter()
        for _ in range(n_new):
            self.llm.eval([token])
            token = int(np.argmax(self._last_logits()))
        return time.perf_counter() - start

    def greedy(self, ids: list[int]):
        self.llm.reset()
        self.llm.eval(ids)
        while True:
            token = int(np.argmax(self._last_logits()))
            yield token
            self.llm.eval([token])

    def close(self) -> None:
        self.llm.close()


class OnnxBackend:
    def __init__(self, target: Target, device: str = "cpu", threads: int = 0):
        import onnxruntime_genai as og

        from kvant.export.onnx import og_model

        config_path = target.path / "genai_config.json"
        decoder = json.loads(config_path.read_text())["model"]["decoder"]
        self.kv_shape = (decoder["num_key_value_heads"], decoder["head_size"])
        self.target = target
        if device.startswith("cuda"):
            self.model = og.Model(str(target.path))
        else:
            self.model = og_model(target.path)
        self._session = None  # plain onnxruntime, opened on the first logits() call

    def logits(self, win: list[int]) -> np.ndarray:
        from kvant.export.onnx import ort_logits, ort_session

        if self._session is None:
            self._session = ort_session(self.target.path)
        return ort_logits(self._session, [win], self.kv_shape)[0]

    def _generator(self, max_length: int):
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return og.Generator(self.model, params)

    def prefill(self, ids: list[int]) -> float:
        generator = self._generator(len(ids) + 1)
        start = time.perf_counter()
        generator.append_tokens(np.array(ids, dtype=np.int32))
        return time.perf_counter() - start

    def decode(self, ids: list[int], n_new: int) -> float:
        generator = self._generator(len(ids) + n_new)
        generator.append_tokens(np.array(ids, dtype=np.int32))
        start = time.perf_counter()
        for _ in range(n_new):
            generator.generate_next_token()
        return time.perf_counter() - start


    def greedy(self, ids: list[int]):
        generator = self._generator(32768)
        generator.append_tokens(np.array(ids, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])


BACKENDS = {"torch": TorchBackend, "llama.cpp": LlamaCppBackend,
            "onnxruntime-genai": OnnxBackend}


def load(target: Target, device: str = "cpu", threads: int = 0, n_ctx: int = 0,
         all_logits: bool = True):
    """A loaded backend; ``all_logits`` False for speed runs (last position only)."""
    if target.backend == "llama.cpp":
        return LlamaCppBackend(target, device, threads, n_ctx, all_logits)
    return BACKENDS[target.backend](target, device, threads)
