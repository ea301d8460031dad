"""`kvant serve` through real clients over loopback: the official openai package, plain HTTP
for llama-server's /tokenize, and a GGUF's chat template rendered as llama-cpp-python does."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvant.data import EVAL_SETS, get_text, paragraphs
from tests.conftest import UD_DIR, run_kvant

PROMPT = "Engelsk: Good morning.\nBokmål:"  # the card's translation prompt


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """create_app served by uvicorn in a thread of the test process."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def gguf_file(gguf_artifact) -> Path:
    return gguf_artifact / "tiny-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def engine(gguf_file):
    from kvant.engine import Engine

    engine = Engine(gguf_file, n_ctx=1024)
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    from kvant.app.serve import create_app

    running = Server(create_app(engine))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_completion_equals_kvant_generate(client, engine, gguf_file):
    model = client.models.list().data[0].id
    assert model == "tiny-Q4_K_M"
    done = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
    generated = run_kvant("generate", str(gguf_file), "--prompt", PROMPT, "--max-new-tokens",
                          "24")
    assert generated.returncode == 0, generated.stderr
    assert done.choices[0].text == generated.stdout[:-1]  # generate ends with a newline
    assert done.choices[0].text.strip(), "the completion is empty"
    assert done.usage.prompt_tokens == len(engine.encode(PROMPT))
    assert done.usage.completion_tokens == 24 and done.choices[0].finish_reason == "length"
    # the card's use: stop at the newline, as `kvant generate --stop-at-newline` does
    line = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0,
                                     stop=["\n"])
    stopped = run_kvant("generate", str(gguf_file), "--prompt", PROMPT, "--max-new-tokens",
                        "24", "--stop-at-newline")
    assert line.choices[0].text == stopped.stdout[:-1]
    assert "\n" not in line.choices[0].text
    # streamed, the pieces add up to the same text
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=24,
                                       temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason == "length"


def test_sampling_is_seeded_and_not_greedy(client):
    def sample(seed):
        return client.completions.create(model="tiny-Q4_K_M", prompt="Det var en gang",
                                         max_tokens=32, temperature=1.0, seed=seed
                                         ).choices[0].text

    greedy = client.completions.create(model="tiny-Q4_K_M", prompt="Det var en gang",
                                       max_tokens=32, temperature=0).choices[0].text
    first = sample(7)
    assert sample(7) == first
    assert {sample(8), sample(9), first} - {greedy}, "sampling at temperature 1 gave greedy text"


def test_chat_uses_the_documented_dialogue_format(client):
    messages = [{"role": "system", "content": "Du svarer kort."},
                {"role": "user", "content": "Hva heter hovedstaden i Norge?"}]
    chat = client.chat.completions.create(model="tiny-Q4_K_M", messages=messages,
                                          max_tokens=24, temperature=0)
    plain = client.completions.create(
        model="tiny-Q4_K_M", max_tokens=24, temperature=0, stop=["\nBruker:", "\nAssistent:"],
        prompt="Du svarer kort.\n\nBruker: Hva heter hovedstaden i Norge?\nAssistent:")
    assert chat.choices[0].message.content == plain.choices[0].text.lstrip(" ")
    assert chat.choices[0].finish_reason == plain.choices[0].finish_reason
    stream = client.chat.completions.create(model="tiny-Q4_K_M", messages=messages,
                                            max_tokens=24, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == chat.choices[0].message.content


def test_tokenize_gives_the_hf_ids_on_every_held_out_paragraph(server, tiny_model, cache_dir):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    for lang in EVAL_SETS:
        units = paragraphs(get_text(lang, cache_dir, UD_DIR).read())
        docs = ["\n\n".join(units[i:i + 5]) for i in range(0, len(units), 5)]
        for unit in units + docs:
            status, got = post(f"{server.url}/tokenize", {"content": unit})
            assert status == 200 and got["tokens"] == hf.encode(unit).ids, (lang, unit[:60])
        status, back = post(f"{server.url}/detokenize", {"tokens": hf.encode(docs[0]).ids})
        assert back["content"] == hf.decode(hf.encode(docs[0]).ids), lang
    status, bare = post(f"{server.url}/tokenize", {"content": "Hei", "add_special": False})
    assert bare["tokens"] == hf.encode("Hei", add_special_tokens=False).ids


def test_concurrent_streams_queue_and_each_equals_its_lone_run(client):
    prompts = [f"{word} var det en gang" for word in ("Nå", "Her", "Der", "Så")]

    def stream(prompt):
        chunks = list(client.completions.create(model="tiny-Q4_K_M", prompt=prompt,
                                                max_tokens=20, temperature=0, stream=True))
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(stream, prompts))
    alone = [stream(p) for p in prompts]
    assert together == alone
    assert all(finish == "length" for _, finish in together)


def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(server, engine):
    url = f"{server.url}/v1/completions"
    long_prompt = " ".join(["ord"] * (engine.n_ctx + 10))
    cases = [(b'{"prompt": "Hei", ', 400, "invalid_json"),
             ({"model": "gpt-4", "prompt": "Hei"}, 404, "model_not_found"),
             ({"prompt": long_prompt}, 400, "context_length_exceeded"),
             ({"prompt": "Hei", "max_tokens": -1}, 400, "invalid_value"),
             ({"prompt": "Hei", "temperature": -0.5}, 400, "invalid_value"),
             ({"prompt": "Hei", "n": 2}, 400, "invalid_value"),
             # token-id prompts are range-checked as /detokenize's ids are, never handed to
             # the runtime (the old server passed them on)
             ({"prompt": [1, engine.tokenizer.get_vocab_size()]}, 400, "invalid_value"),
             ({"prompt": [1, -3]}, 400, "invalid_value")]
    for body, status, code in cases:
        got_status, got = post(url, body)
        assert (got_status, got["error"]["code"]) == (status, code), body
        assert got["error"]["message"]
    status, chat = post(f"{server.url}/v1/chat/completions",
                        {"messages": [{"role": "narrator", "content": "Hei"}]})
    assert status == 400 and "role" in chat["error"]["message"]
    status, ok = post(url, {"prompt": "Hei", "max_tokens": 2, "temperature": 0})
    assert status == 200 and ok["usage"]["completion_tokens"] == 2


class _FailingEngine:
    """An engine whose tokenizer breaks: what a bug inside an engine looks like to the app."""

    name, n_ctx = "broken", 1024

    def encode(self, text, add_special=True):
        raise RuntimeError("tokenizer exploded")


def test_an_unexpected_failure_is_a_500_in_openais_shape_and_the_server_keeps_serving():
    from kvant.app.serve import create_app

    running = Server(create_app(_FailingEngine()))
    try:
        status, got = post(f"{running.url}/tokenize", {"content": "Hei"})
        assert status == 500
        assert got["error"]["type"] == "server_error"
        assert got["error"]["code"] == "internal_error"
        assert "tokenizer exploded" in got["error"]["message"]
        with urllib.request.urlopen(f"{running.url}/health", timeout=30) as response:
            assert response.status == 200
    finally:
        running.stop()


class _Scripted:
    """Stands in for the model where what is tested is the server's scheduling, not text:
    `count` pieces of `piece`, each after `delay` s, through kvant.engine.Completion
    (so it holds the engine's lock while it generates, as a real one does); a `fail_after`
    piece count raises inside the generation."""

    name, n_ctx, eos_id = "scripted", 100_000, -1

    def __init__(self, piece: str, count: int, delay: float = 0.0, fail_after: int | None = None):
        from types import SimpleNamespace

        self.piece, self.count, self.delay, self.fail_after = piece, count, delay, fail_after
        self.lock = threading.Lock()
        self.tokenizer = SimpleNamespace(get_vocab_size=lambda: 100)
        self.made = []

    def complete(self, prompt, max_new_tokens, stop=(), sampling=None):
        from kvant.engine import Completion

        engine = self

        class Pieces(Completion):
            def _pieces(self):
                self.finish_reason = "length"
                for i in range(min(max_new_tokens, engine.count)):
                    if self.cancelled.is_set():
                        self.finish_reason = "cancelled"
                        return
                    if engine.fail_after is not None and i == engine.fail_after:
                        raise RuntimeError("the engine fell over")
                    time.sleep(engine.delay)
                    self.n_new = i + 1
                    yield engine.piece

        made = Pieces(self, [1, 2, 3], max_new_tokens, stop, sampling)
        self.made.append(made)
        return made


def _stalled_stream(url: str, body: dict) -> socket.socket:
    """A streaming request from a client that never reads its response (a small receive
    buffer, so the server's sends block as soon as the kernel's buffers are full)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _health(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
        return json.loads(response.read())


def test_a_client_that_never_reads_holds_up_neither_the_next_request_nor_health():
    """The old server held the engine's lock while a response streamed: a client that
    stopped reading 24 MB into its stream kept every later request (and the threads they
    pinned) waiting."""
    from kvant.app.serve import create_app

    engine = _Scripted("ord " * 4096, count=1500)  # 1,500 x 16 KiB: far past socket buffers
    running = Server(create_app(engine))
    stalled = _stalled_stream(running.url, {"prompt": "Hei", "max_tokens": 1500,
                                            "stream": True})
    try:
        _wait(lambda: engine.made and engine.made[0].finish_reason == "length", 30,
              "the stalled client's generation did not finish into its buffer")
        started = time.monotonic()
        assert _health(running.url)["status"] == "ok"
        status, got = post(f"{running.url}/v1/completions", {"prompt": "Hei", "max_tokens": 3})
        assert status == 200 and got["usage"]["completion_tokens"] == 3
        assert time.monotonic() - started < 10
    finally:
        stalled.close()
        running.stop()


def test_a_disconnect_cancels_its_generation():
    from kvant.app.serve import create_app

    engine = _Scripted("ord ", count=100_000, delay=0.01)  # 1,000 s if nobody stops it
    running = Server(create_app(engine))
    try:
        sock = _stalled_stream(running.url, {"prompt": "Hei", "max_tokens": 100_000,
                                             "stream": True})
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        sock.close()
        _wait(lambda: engine.made[0].finish_reason == "cancelled", 15,
              "the stream's generation went on after its client left")
        assert engine.made[0].n_new < 2000
        # a plain (not streamed) request whose client leaves is cancelled too
        host, port = running.url.removeprefix("http://").split(":")
        plain = socket.create_connection((host, int(port)))
        data = json.dumps({"prompt": "Hei", "max_tokens": 100_000}).encode()
        plain.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: " + str(len(data)).encode()
                      + b"\r\n\r\n" + data)
        _wait(lambda: len(engine.made) == 2 and engine.made[1].n_new > 0, 15, "not started")
        plain.close()
        _wait(lambda: engine.made[1].finish_reason == "cancelled", 15,
              "the request's generation went on after its client left")
        assert _health(running.url)["generating"] is False
    finally:
        running.stop()


def test_a_full_queue_is_a_503_with_retry_after_and_health_still_answers():
    from kvant.app.serve import create_app

    engine = _Scripted("ord ", count=100_000, delay=0.01)
    running = Server(create_app(engine, max_queue=1))
    socks = []
    try:
        body = {"prompt": "Hei", "max_tokens": 100_000, "stream": True}
        socks.append(_stalled_stream(running.url, body))  # generating
        _wait(lambda: _health(running.url)["generating"], 15, "the first did not start")
        socks.append(_stalled_stream(running.url, body))  # waiting: the queue is full
        _wait(lambda: _health(running.url)["waiting"] == 1, 15, "the second did not queue")
        request = urllib.request.Request(f"{running.url}/v1/completions",
                                         data=json.dumps({"prompt": "Hei"}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "2"
        error = json.loads(refused.value.read())["error"]
        assert (error["type"], error["code"]) == ("server_error", "server_busy")
        assert _health(running.url)["status"] == "ok"
    finally:
        for sock in socks:
            sock.close()
        running.stop()


def test_a_failure_midway_through_a_stream_is_an_error_event_then_done():
    from kvant.app.serve import create_app

    running = Server(create_app(_Scripted("ord ", count=10, fail_after=3)))
    try:
        request = urllib.request.Request(
            f"{running.url}/v1/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"prompt": "Hei", "max_tokens": 10, "stream": True}).encode())
        with urllib.request.urlopen(request, timeout=30) as response:
            events = [line.removeprefix("data: ") for line in response.read().decode()
                      .split("\n\n") if line]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["ord "] * 3
        assert chunks[-1]["error"]["type"] == "server_error"
        assert "the engine fell over" in chunks[-1]["error"]["message"]
        status, got = post(f"{running.url}/v1/completions", {"prompt": "Hei", "max_tokens": 2})
        assert status == 200 and got["choices"][0]["text"] == "ord ord "
    finally:
        running.stop()


def test_with_an_api_key_the_docs_and_schema_are_off():
    from kvant.app.serve import create_app

    for key, expected in ((None, 200), ("sekret", 404)):
        running = Server(create_app(_Scripted("x", 1), api_key=key))
        try:
            for path in ("/docs", "/openapi.json"):
                try:
                    with urllib.request.urlopen(running.url + path, timeout=10) as response:
                        status = response.status
                except urllib.error.HTTPError as error:
                    status = error.code
                assert status == expected, (key, path)
        finally:
            running.stop()


def test_chat_template_in_the_file_writes_what_normistral_normalizes(gguf_file, tiny_model):
    """The GGUF's tokenizer.chat_template, rendered the way llama-cpp-python renders a file's
    template, gives exactly the text NorMistral's own normalizer makes of the dialogue."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from tokenizers import Tokenizer

    llm = llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    llm.close()
    normalizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).normalizer
    messages = [{"role": "system", "content": "Svar kort.\nBruk bokmål."},
                {"role": "user", "content": "Hva er dette?\n\nEt dikt:\nRoser er røde"},
                {"role": "assistant", "content": "Et dikt om roser."},
                {"role": "user", "content": "  Skriv et til.  "}]
    rendered = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")(
        messages=messages).prompt
    plain = ("Svar kort.\nBruk bokmål.\n\nBruker: Hva er dette?\n\nEt dikt:\nRoser er røde\n"
             "Assistent: Et dikt om roser.\nBruker: Skriv et til.\nAssistent:")
    assert rendered == normalizer.normalize_str(plain)


def _non_loopback_address() -> str | None:
    """An address of this machine other than loopback (none on a machine without one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: it picks a route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def _start_serving(gguf_file, port, *extra, env=None):
    exe = Path(sys.executable).with_name("kvant")
    return subprocess.Popen([str(exe), "serve", str(gguf_file), "--port", str(port),
                             "--ctx", "512", *extra], stderr=subprocess.PIPE, text=True,
                            env=env)


def test_serve_command_binds_loopback_and_requires_the_api_key(gguf_file, tmp_path):
    import os

    port = _free_port()
    key_file = tmp_path / "key"
    key_file.write_text("sekret\n")
    proc = _start_serving(gguf_file, port, "--api-key-file", str(key_file))
    try:
        banner = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}/v1" in banner and "API key required" in banner
        assert "warning" not in banner
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        deadline = time.monotonic() + 60
        while True:
            try:
                status, got = post(url, body)
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline and proc.poll() is None, "no server"
                time.sleep(0.2)
        assert status == 401 and got["error"]["code"] == "invalid_api_key"
        status, got = post(url, body, {"Authorization": "Bearer sekret"})
        assert status == 200 and got["usage"]["completion_tokens"] <= 4
        # the bind itself, not the banner: this machine's other address does not answer
        other = _non_loopback_address()
        if other is not None:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((other, port), timeout=5).close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    refused = run_kvant("serve", str(gguf_file.parent))
    # a GGUF artifact holds one file per type: serve wants one of them
    assert refused.returncode == 2 and "models; pass one .gguf file" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    # the key from the environment; an empty one is refused in one line
    port = _free_port()
    proc = _start_serving(gguf_file, port, env={**os.environ, "KVANT_API_KEY": "from-env"})
    try:
        assert "API key required" in proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    key_file.write_text("\n")
    empty = run_kvant("serve", str(gguf_file), "--api-key-file", str(key_file))
    assert empty.returncode == 2 and "gives an empty key" in empty.stderr


def test_binding_beyond_loopback_without_a_key_warns(gguf_file):
    other = _non_loopback_address()
    if other is None:
        pytest.skip("this machine has no address but loopback")
    port = _free_port()
    proc = _start_serving(gguf_file, port, "--host", other)
    try:
        warning = proc.stderr.readline()
        assert warning.startswith("kvant: warning:") and "no API key" in warning
        assert f"http://{other}:{port}/v1" in proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
