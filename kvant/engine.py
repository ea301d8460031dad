"""Text generation with NorMistral's exact tokens: the one core `kvant generate` and
`kvant serve` share.

Why not llama-cpp-python's own completion path (`Llama.create_completion`): its stream decodes
each new token on its own, and NorMistral's decoder strips one leading space per decode call
and turns "\\n " into "\\n", so a token-by-token stream would lose every space between words.
Here the continuation is decoded together with the end of the prompt at every step and only
the new characters are sent: a newline followed by a space-prefixed token comes out as the
model's text does ("\\nGod", not "\\n God"). Sampling itself is llama.cpp's (through
`Llama.generate`, which also reuses the KV cache of a shared prompt prefix).

The chat format for the base model is plain dialogue text, documented on every card:

    {system}                      (if given, then a blank line)
    Bruker: {user}
    Assistent: {assistant}
    Bruker: {user}
    Assistent:

and generation stops where the model starts the next turn (``CHAT_STOP``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvant.errors import SettingsError
from kvant.model import pick_device
from kvant.plan.kv import KV_TYPES, require_kv_type
from kvant.registry import unknown_key_message
from kvant.runtimes import open_runtime
from kvant.runtimes.reference import reference_dtype
from kvant.runtimes.targets import Target, targets, verify
from kvant.tokenization import exact_tokenizer

USER, ASSISTANT = "Bruker", "Assistent"
CHAT_STOP = (f"\n{USER}:", f"\n{ASSISTANT}:")
_ANCHOR = 16  # prompt tokens decoded with the continuation (enough for any merge context)


class ContextError(SettingsError):
    """A prompt that does not fit the context (the server answers it with a 400)."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0 (the default), else llama.cpp's
    top-k, top-p and temperature samplers with ``seed`` (random when None)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise SettingsError(f"sampling temperature {self.temperature}, top-p {self.top_p}, "
                                f"top-k {self.top_k}: use temperature >= 0, 0 < top-p <= 1 "
                                "and top-k >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def stated_context(target: Target) -> int:
    """The context an artifact states it was made for (what its export wrote)."""
    if target.backend == "llama.cpp":
        from kvant.gguf_header import read_header  # the metadata only

        fields = read_header(target.path).fields
        for key, value in fields.items():
            if key.endswith(".context_length"):
                return int(value)
    for name in ("config.json", "genai_config.json"):
        path = target.path / name
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            found = config.get("max_position_embeddings") or config.get("model", {}).get(
                "context_length")
            if found:
                return int(found)
    raise SettingsError(f"'{target.path}' does not state its context length")


def _text(content) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts only)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" for p in content):
            raise SettingsError("only text message parts are supported: NorMistral reads text")
        return "".join(str(p.get("text", "")) for p in content)
    raise SettingsError("a message's content must be a string or a list of text parts")


def chat_prompt(messages: list[dict]) -> str:
    """The plain dialogue text of ``messages`` (see the module's doc), ending with the
    assistant's turn to speak.

    >>> chat_prompt([{"role": "user", "content": "Hei!"}])
    'Bruker: Hei!\\nAssistent:'
    """
    if not messages:
        raise SettingsError("messages is empty: send at least one message")
    blocks = []
    for message in messages:
        role, content = message.get("role"), _text(message.get("content", "")).strip()
        if role in ("system", "developer"):
            blocks.append(content + "\n")
        elif role == "user":
            blocks.append(f"{USER}: {content}")
        elif role == "assistant":
            blocks.append(f"{ASSISTANT}: {content}")
        else:
            raise SettingsError(f"message role '{role}' is not supported; use system, user "
                                "or assistant")
    return "\n".join([*blocks, f"{ASSISTANT}:"])


# The same dialogue as a Jinja chat template (GGUF `tokenizer.chat_template`, for llama-server
# --jinja and LM Studio), written as NorMistral's normalizer would leave the text: a space
# before the whole text and after every newline, none before a newline, because those clients
# tokenize without the normalizer. Not reproduced: NFKC, and more than two spaces before a
# newline inside a message (Jinja has no regex; each replace pass removes one).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set c = message['content'] | trim | replace('\\n', '\\n ') | replace(' \\n', '\\n')"
    " | replace(' \\n', '\\n') -%}"
    "{{- ' ' if loop.first else '\\n ' -}}"
    "{%- if message['role'] == 'user' -%}" + USER + ": {{ c }}"
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT + ": {{ c }}"
    "{%- else -%}{{ c }}{{ '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ' if messages | length == 0 else '\\n ' }}"
    + ASSISTANT + ":{%- endif -%}"
)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop sequence."""
    return max((i for s in stops for i in range(1, len(s)) if text.endswith(s[:i])), default=0)


class Completion:
    """One continuation: iterate for its text pieces; then ``finish_reason`` ("stop": end of
    text or a stop sequence; "length": ``max_new_tokens`` or the context) and ``n_new``."""

    def __init__(self, engine: Engine, ids: list[int], max_new_tokens: int,
                 stop: tuple[str, ...], sampling: Sampling):
        self.engine, self.ids, self.max_new_tokens = engine, ids, max_new_tokens
        self.stop, self.sampling = tuple(s for s in stop if s), sampling
        self.finish_reason: str | None = None
        self.n_new = 0
        self.cancelled = threading.Event()
        """Set from any thread to stop after the current token (a client that went away)."""

    def __iter__(self) -> Iterator[str]:
        with self.engine.lock:  # one llama.cpp context: requests queue here
            yield from self._pieces()

    def _pieces(self) -> Iterator[str]:
        decode = self.engine.decode
        anchor = self.ids[-_ANCHOR:]
        if not decode(anchor) and len(anchor) < len(self.ids):
            anchor = self.ids  # the anchor decodes to nothing: keep the whole prompt
        prefix = decode(anchor)
        new: list[int] = []
        text, shown = "", 0
        self.finish_reason = "length"
        for token in self.engine.tokens(self.ids, self.sampling):
            if self.cancelled.is_set():
                self.finish_reason = "cancelled"
                break
            if token == self.engine.eos_id:
                self.finish_reason = "stop"
                break
            new.append(token)
            self.n_new = len(new)
            text = decode(anchor + new)[len(prefix):]
            if not text.endswith("\ufffd"):  # else half a character: wait for the rest
                hits = [i for i in (text.find(s, max(0, shown - len(s))) for s in self.stop)
                        if i >= 0]
                if hits:
                    text = text[:max(min(hits), shown)]
                    self.finish_reason = "stop"
                    break
                safe = len(text) - _held_back(text, self.stop)
                if safe > shown:
                    yield text[shown:safe]
                    shown = safe
            if len(new) >= self.max_new_tokens:
                break
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        if len(text) > shown:
            yield text[shown:]


class Engine:
    """One artifact opened for generation: its runtime, NorMistral's exact tokenizer from the
    artifact itself, and the context it runs with.

    ``n_ctx``: the context to allocate (default: the artifact's stated context, at most
    4,096, as llama-server's default; the KV cache grows with it). ``kv_type``: the KV cache
    precision (kvant.plan.KV_CACHES; llama.cpp: f16, q8_0 about half its memory, q4_0 about
    a quarter).
    """

    def __init__(self, artifact: Path, device: str = "cpu", n_ctx: int = 0, threads: int = 0,
                 check: bool = True, kv_type: str = "f16"):
        if kv_type not in KV_TYPES:
            raise SettingsError(unknown_key_message("KV cache type", kv_type, KV_TYPES))
        found = targets(Path(artifact))
        if len(found) != 1:
            raise SettingsError(f"'{artifact}' holds {len(found)} models; pass one .gguf file")
        self.target = found[0]
        require_kv_type(self.target.backend, kv_type)
        verify(self.target, check)
        self.tokenizer = exact_tokenizer(self.target.path)
        self.trained_context = stated_context(self.target)
        if n_ctx > self.trained_context:
            raise SettingsError(f"--ctx {n_ctx:,} is past the {self.trained_context:,} tokens "
                                "the model was trained for; pass a smaller --ctx")
        self.n_ctx = n_ctx or min(self.trained_context, 4096)
        self.eos_id = self.tokenizer.token_to_id("</s>")
        self.name = self.target.path.stem if self.target.path.suffix == ".gguf" else \
            self.target.path.name
        self.lock = threading.Lock()
        self.device = pick_device(device, self.target.backend)
        self.threads, self.kv_type = threads, kv_type
        self.runtime = None

    def load(self) -> None:
        """Open the runtime with ``n_ctx`` (done on first use; a server does it at start)."""
        if self.runtime is None:
            # a plain checkpoint computes in float32 where it fits with room (the stand-in),
            # as llama.cpp and ONNX Runtime do, so their greedy texts agree; else bfloat16
            dtype = (reference_dtype(self.target.path, self.device)
                     if self.target.fmt == "bf16" else "bfloat16")
            self.runtime = open_runtime(self.target, self.device, self.threads,
                                        n_ctx=self.n_ctx, all_logits=False,
                                        kv_type=self.kv_type, dtype=dtype)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def tokens(self, ids: list[int], sampling: Sampling) -> Iterator[int]:
        """Token ids after ``ids``, greedy or sampled, from the runtime's own decoding loop."""
        self.load()
        return self.runtime.sample(ids, sampling)

    def complete(self, prompt: str | list[int], max_new_tokens: int,
                 stop: tuple[str, ...] = (), sampling: Sampling = Sampling()) -> Completion:
        """A continuation of ``prompt`` (text, tokenized exactly, with <s>; or token ids as
        they are). A prompt that leaves no room is refused; ``max_new_tokens`` is cut to the
        room left (the completion then ends with finish_reason "length")."""
        if max_new_tokens < 1:
            raise SettingsError(f"max_tokens {max_new_tokens}: ask for at least 1 token")
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise SettingsError("the prompt is empty: send some text")
        if len(ids) >= self.n_ctx:
            if self.n_ctx < self.trained_context:
                raise ContextError(f"the prompt is {len(ids):,} tokens and the context is "
                                   f"{self.n_ctx:,}; shorten the prompt or pass a larger "
                                   f"--ctx (up to {self.trained_context:,})")
            raise ContextError(f"the prompt is {len(ids):,} tokens and the model was trained "
                               f"for {self.trained_context:,}; shorten the prompt")
        return Completion(self, ids, min(max_new_tokens, self.n_ctx - len(ids)), stop,
                          sampling)

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None
