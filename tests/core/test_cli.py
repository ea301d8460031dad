"""One subprocess test per subcommand, through the installed console script."""

from __future__ import annotations

import time

from tests.conftest import CALIB_FILE, EVAL_DIR, UD_DIR, run_kvant


def test_help_is_instant_and_lists_every_subcommand():
    started = time.perf_counter()
    result = run_kvant("--help")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0
    for command in ("tiny", "data", "info"):
        assert f"    {command} " in result.stdout
    assert elapsed < 5  # no torch or transformers import at startup


def test_mistyped_subcommand_and_option_get_suggestions():
    result = run_kvant("tinny")
    assert result.returncode == 2 and "did you mean 'tiny'?" in result.stderr
    result = run_kvant("info", "--jsn")
    assert result.returncode == 2 and "did you mean '--json'?" in result.stderr
    result = run_kvant("info", "x", "--no-progress")  # a global option after the command
    assert result.returncode == 2 and "--no-progress goes before the command" in result.stderr


def test_info(tiny_model):
    result = run_kvant("info", str(tiny_model))
    assert result.returncode == 0, result.stderr
    assert "MistralForCausalLM" in result.stdout
    assert "4 query / 1 KV heads of dim 128" in result.stdout
    assert "ppl_trained_bf16" in result.stdout  # the manifest's validation is shown


def test_info_bad_input_is_one_line_exit_2(tmp_path):
    result = run_kvant("info", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not found" in result.stderr
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    result = run_kvant("info", str(tmp_path))
    assert result.returncode == 2 and "Kvant supports MistralForCausalLM" in result.stderr


def test_data_get_offline(shared_data, tmp_path):
    env = {"KVANT_CACHE_DIR": str(tmp_path), "KVANT_DATA_DIR": str(UD_DIR)}
    result = run_kvant("data", "get", "dan", env=env)
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip()
    assert open(path, "rb").read() == (EVAL_DIR / "dan.ud-test.txt").read_bytes()


def test_tiny_reuses_the_cached_build(tiny_model, cache_dir):
    result = run_kvant("tiny", "--train-text", str(CALIB_FILE), "--data-dir", str(UD_DIR),
                       env={"KVANT_CACHE_DIR": str(cache_dir)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tiny_model)


def test_info_on_a_gguf_file_prints_kvants_lines_alone_and_llama_cpps_log_behind_v(
        gguf_artifact):
    """llama.cpp dumps a file's metadata (80 lines and more) on every load: kept behind -v."""
    q4 = gguf_artifact / "tiny-Q4_K_M.gguf"
    quiet = run_kvant("info", str(q4))
    assert quiet.returncode == 0 and "gguf-q4_k_m" in quiet.stdout
    assert "llama_model_loader" not in quiet.stderr, quiet.stderr[:500]
    loud = run_kvant("-v", "info", str(q4))
    assert "llama_model_loader" in loud.stderr


def test_every_settings_flag_says_what_it_does_and_names_its_choices():
    """Each flag's help is its field's docstring: no flag says only its default, and a flag
    with a fixed set of values names every one."""
    import argparse

    from kvant.app.cli import build_parser
    from kvant.export.gguf import MIX_SENSITIVITY, PRE_TOKENIZERS
    from kvant.export.onnx import INT4_ALGOS, PRECISIONS, PROVIDERS
    from kvant.plan.kv import KV_TYPES
    from kvant.quantize.bnb import MODES

    def actions(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from ((f"{name} {c}", a) for c, a in actions(sub))
            else:
                yield "", action

    found = {}
    for command, action in actions(build_parser()):
        if action.container.title and action.container.title.endswith(" settings"):
            flag = action.option_strings[0]
            assert not action.help.startswith("(default"), (command, flag)
            found[(command.split()[0], flag)] = action.help
    assert len(found) > 60
    choices = {("export", "--mix-sensitivity"): MIX_SENSITIVITY,
               ("export", "--pre"): PRE_TOKENIZERS, ("export", "--precision"): PRECISIONS,
               ("export", "--provider"): PROVIDERS, ("export", "--int4-algo"): INT4_ALGOS,
               ("quantize", "--mode"): MODES, ("bench", "--kv-type"): KV_TYPES}
    for key, values in choices.items():
        for value in values:
            assert value in found[key], (key, value)


def test_timeout_scale_reaches_every_child_and_refuses_nonsense(monkeypatch, capsys):
    from kvant.app.cli import main
    from kvant.machine import TIMEOUT_ENV, child_limit

    monkeypatch.setenv(TIMEOUT_ENV, "1")  # restored after the test
    assert main(["--timeout-scale", "0", "data", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "positive factor" in err[0]
    before = child_limit()
    assert main(["--timeout-scale", "2.5", "data", "list"]) == 0
    assert child_limit() == 2.5 * before
