"""Kvant artifacts as lm-evaluation-harness models: exact ids, lm-eval's split, every kind."""

from __future__ import annotations

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from kvant.app.lmeval import KvantLM, split_request
from kvant.runtimes import open_runtime
from kvant.runtimes.targets import targets
from kvant.tokenization import exact_tokenizer

PAIRS = [("Hovedstaden i Noreg er", " Oslo."),
         ("Hovedstaden i Noreg er ", "Oslo."),          # the space moves to the continuation
         ("Ho sa:\n", "«Kom hit!»"),                     # the newline rule at the join
         ("", "Dette er ein heil tekst."),                # no context: <s> alone
         ("Sámi: Mun lean", " studeanta."),
         ("Det var en gang en konge som hadde tre døtre", ", og den yngste var den vakreste.")]


def _requests(kind: str, args_list) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in args_list]


def _logp(logits) -> np.ndarray:
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


class Recording:
    """A kvant runtime that remembers every id sequence it is asked for."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def logits(self, ids):
        self.seen.append(list(ids))
        return self.inner.logits(ids)

    def close(self):
        self.inner.close()


def test_the_split_follows_lm_evals_convention_on_exact_ids(tiny_model):
    tok = exact_tokenizer(tiny_model)
    for context, continuation in PAIRS:
        head, tail = split_request(tok, context, continuation)
        # head + tail are exactly the tokenizer's ids of the whole text, <s> first
        assert head + tail == tok.encode(context + continuation).ids
        assert head[0] == tok.token_to_id("<s>") and tail
    # a context's trailing space is the continuation's leading space: same ids either way
    assert split_request(tok, *PAIRS[0]) == split_request(tok, *PAIRS[1])
    head, tail = split_request(tok, "Hovedstaden i Noreg er", " Oslo.")
    assert tok.id_to_token(tail[0]).startswith("\u0120")  # byte-level BPE's space: Ġ
    assert tok.decode(head + tail, skip_special_tokens=True).endswith("er Oslo.")


def test_a_dropped_or_doubled_leading_space_changes_the_ids(tiny_model):
    tok = exact_tokenizer(tiny_model)
    context = "Hovedstaden i Noreg er"
    _, right = split_request(tok, context, " Oslo.")
    _, dropped = split_request(tok, context, "Oslo.")
    _, doubled = split_request(tok, context, "  Oslo.")
    assert right != dropped and right != doubled and dropped != doubled


def test_the_runtime_sees_exactly_the_tokenizers_ids(tiny_model):
    """Every forward is fed context + continuation's exact ids minus the last; the score is
    the continuation's log-probabilities from those logits, and `is_greedy` says whether
    argmax decoding gives the continuation (checked on the model's own greedy tokens)."""
    tok = exact_tokenizer(tiny_model)
    inner = open_runtime(targets(tiny_model)[0], "cpu", dtype="float32")
    runtime = Recording(inner)
    lm = KvantLM(str(tiny_model), runtime=runtime)
    results = lm.loglikelihood(_requests("loglikelihood", PAIRS))
    # one forward per distinct text (the first two pairs are one text, split alike)
    assert len(runtime.seen) == len({c + k for c, k in PAIRS}) == len(PAIRS) - 1
    for (context, continuation), (ll, _) in zip(PAIRS, results, strict=True):
        whole = tok.encode(context + continuation).ids
        assert whole[:-1] in runtime.seen
        n = len(split_request(tok, context, continuation)[1])
        logp = _logp(inner.logits(whole[:-1])[-n:])
        assert ll == pytest.approx(float(logp[np.arange(n), whole[-n:]].sum()), abs=1e-6)
        assert ll < 0
    # the model's own greedy continuation is greedy; a word it would not pick is not
    prompt = tok.encode("Det var en gang").ids
    greedy = []
    for _ in range(4):
        greedy.append(int(inner.logits(prompt + greedy)[-1].argmax()))
    text = tok.decode(prompt + greedy, skip_special_tokens=True)
    head = tok.decode(prompt, skip_special_tokens=True)
    (_, is_greedy), = lm.loglikelihood(_requests("loglikelihood", [(head, text[len(head):])]))
    assert is_greedy
    (_, not_greedy), = lm.loglikelihood(_requests("loglikelihood", [(head, " elefantbrev")]))
    assert not not_greedy
    lm.close()


def test_rolling_loglikelihood_covers_every_token_once(tiny_model):
    """A text longer than max_length: the windows' scores sum to each token's
    log-probability once (lm-eval's rolling windows), and a short text's is one forward's."""
    tok = exact_tokenizer(tiny_model)
    text = ("Det var en gang en konge som hadde tre døtre. Den yngste var den vakreste, "
            "og hun gikk hver dag ned til bekken. ") * 6
    ids = tok.encode(text).ids
    inner = open_runtime(targets(tiny_model)[0], "cpu", dtype="float32")
    runtime = Recording(inner)
    lm = KvantLM(str(tiny_model), runtime=runtime, max_length=len(ids) // 3)
    (rolled,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert len(runtime.seen) >= 3
    scored = sum(len(seen) for seen in runtime.seen)
    assert scored >= len(ids) - 1  # every token after <s> predicted once, some context reread
    whole = KvantLM(str(tiny_model), runtime=Recording(inner), max_length=2 * len(ids))
    (once,) = whole.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    logp = _logp(inner.logits(ids[:-1]))
    assert once == pytest.approx(float(logp[np.arange(len(ids) - 1), ids[1:]].sum()), abs=1e-4)
    # shorter windows see less context, so the sums differ a little; a token scored twice or
    # left out would move the sum by its share (a third of the text per window here)
    assert rolled == pytest.approx(once, rel=0.02)
    inner.close()


def test_bf16_folder_and_bf16_gguf_give_the_same_loglikelihoods(tiny_model, gguf_artifact):
    """The same requests through transformers and through llama.cpp: the same ids (both
    exact) and log-likelihoods within 0.01 nats per token (bf16 weights in both)."""
    gguf = next(gguf_artifact.glob("*-BF16.gguf"))
    tok = exact_tokenizer(tiny_model)
    requests = _requests("loglikelihood", PAIRS)
    ours = KvantLM(str(tiny_model), max_length=256).loglikelihood(requests)
    theirs = KvantLM(str(gguf), max_length=256).loglikelihood(requests)
    for pair, (a, _), (b, _) in zip(PAIRS, ours, theirs, strict=True):
        n = len(split_request(tok, *pair)[1])
        assert abs(a - b) <= 0.01 * n, (pair, a, b)


def test_generation_stops_at_the_tasks_stop_string(tiny_model):
    lm = KvantLM(str(tiny_model), max_length=256)
    (free,) = lm.generate_until(_requests("generate_until", [
        ("Det var en gang", {"until": [], "max_gen_toks": 12})]))
    assert free
    stop = free.strip().split()[0] if free.strip() else free
    (cut,) = lm.generate_until(_requests("generate_until", [
        ("Det var en gang", {"until": [stop], "max_gen_toks": 12})]))
    assert stop not in cut and free.startswith(cut)
    with pytest.raises(Exception, match="decodes greedily"):
        lm.generate_until(_requests("generate_until", [
            ("Det", {"until": [], "do_sample": True, "temperature": 0.7})]))
    lm.close()


def test_the_installed_entry_point_names_the_registered_model():
    """What lm-eval's plugin discovery (PR #4013) reads: an `lm_eval.models` entry point
    `kvant` whose target is the class registered under that name."""
    from importlib.metadata import entry_points

    from lm_eval.api.registry import get_model

    (point,) = [e for e in entry_points(group="lm_eval.models") if e.name == "kvant"]
    assert point.load() is get_model("kvant") is KvantLM



def test_only_kvants_own_tasks_skip_lm_evals_bundled_index(tmp_path, monkeypatch):
    """When every task asked for is Kvant's own, lm-eval's TaskManager indexes the include
    path alone (its 27,000 bundled task files take seconds); any other task keeps them."""
    from lm_eval.tasks import TaskManager

    import kvant.bench.lmtasks as lmtasks
    from kvant.app import lmeval

    built = []

    def record(self, *args, **kwargs):
        built.append(kwargs.get("include_defaults", True))
        raise SystemExit(0)  # as far as the test needs lm-eval to go

    monkeypatch.setattr(TaskManager, "__init__", record)
    monkeypatch.setattr(lmtasks, "build_tasks",
                        lambda folder, *a: folder.mkdir(parents=True, exist_ok=True))
    for tasks, defaults in (("kvant_cloze_nob,kvant_complete_sme", False),
                            ("kvant_cloze_nob,hellaswag", True)):
        built.clear()
        code = lmeval.lm_eval_cli(["run", "--model", "kvant", "--model_args", "artifact=x",
                                   "--tasks", tasks], cache_dir=tmp_path, data_dir=None)
        assert code == 0 and built == [defaults], (tasks, built)
    assert TaskManager.__init__ is record  # lm-eval's own default, put back after the run
    assert lmeval._tasks_argument(["--tasks=a,b"]) == ["a", "b"]
    assert lmeval._tasks_argument(["--limit", "2"]) == []
