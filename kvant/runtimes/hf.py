"""The torch runtime: transformers checkpoints (bf16, bitsandbytes, GPTQ) on CPU or CUDA."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class TorchRuntime:
    """A transformers model; quantized checkpoints keep the dtype their config chooses."""

    def __init__(self, path: Path, device: str = "cpu", threads: int = 0,
                 dtype: str = "bfloat16"):
        if threads:
            torch.set_num_threads(threads)
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        if "quantization_config" in config:
            self.model = AutoModelForCausalLM.from_pretrained(path, device_map=device)
        elif device.startswith("cuda"):
            # accelerate places what fits on the GPU and offloads the rest to CPU memory
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype), device_map="auto")
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype)).to(device)
        self.model.eval()
        self.device = str(self.model.device) if device.startswith("cuda") else device

    def logits(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            out = self.model(torch.tensor([ids], device=self.device)).logits[0]
        return out.float().cpu().numpy()

    def prefill(self, ids: list[int]) -> float:
        with torch.no_grad():
            _sync(self.device)
            start = time.perf_counter()
            self.model(torch.tensor([ids], device=self.device), use_cache=True)
            _sync(self.device)
        return time.perf_counter() - start

    def decode(self, ids: list[int], n_new: int) -> float:
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

    def greedy(self, ids: list[int]) -> Iterator[int]:
        with torch.no_grad():
            out = self.model(torch.tensor([ids], device=self.device), use_cache=True)
            while True:
                token = out.logits[0, -1].argmax()
                yield int(token)
                out = self.model(token.view(1, 1), past_key_values=out.past_key_values,
                                 use_cache=True)

    def generate(self, ids: list[int], n_new: int) -> list[int]:
        """transformers' own greedy generate (a second opinion on :meth:`greedy`)."""
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids], device=self.device),
                                      max_new_tokens=n_new, min_new_tokens=n_new,
                                      do_sample=False)
        return out[0, len(ids):].tolist()

    def close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
