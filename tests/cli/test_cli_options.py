"""The CLI's common options: every model command takes --backend, -t, -c and --disable (tokenize
accepts them without effect; run checks them against its artifact), a usage error prints the
command's own usage, --debug works before or after the command, and --help says so."""
import subprocess
import sys

import pytest

from ember.cli import build_parser

from tiny_gguf import Spec

MODEL_COMMANDS = ("generate", "chat", "tokenize", "logits", "perplexity", "bench")
COMMON = ("--backend", "--threads", "--ctx-size", "--disable", "--debug")


def ember(*args):
    return subprocess.run([sys.executable, "-m", "ember.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def command_help(name: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.choices)
    return sub.choices[name].format_help()


@pytest.mark.parametrize("name", MODEL_COMMANDS + ("run", "compile"))
def test_help_lists_the_common_options(name):
    text = command_help(name)
    for option in COMMON:
        if name == "compile" and option == "--backend":
            assert "--target" in text       # compile names a target, which picks the backend
            continue
        assert option in text, f"ember {name} --help does not mention {option}"


def test_tokenize_help_says_the_model_options_have_no_effect():
    assert "no effect" in command_help("tokenize")


def test_tokenize_accepts_the_common_options(tiny_files):
    path = tiny_files[Spec("llama", "q8_0")]
    plain = ember("tokenize", path, "-p", "hello world")
    common = ember("tokenize", path, "-p", "hello world", "--backend", "cpu", "-t", 1, "-c", 64,
                   "--disable", "cse", "-q")
    assert plain.returncode == common.returncode == 0, common.stderr
    assert plain.stdout == common.stdout and plain.stdout.startswith("[1, ")


@pytest.mark.parametrize("command", (["tokenize", "m.gguf", "-p", "x", "--bogus"],
                                     ["run", "art", "-p", "x", "--n-gen", "3"],
                                     ["generate", "-p", "x", "--bogus", "1"]),
                         ids=("tokenize", "run", "generate"))
def test_a_usage_error_prints_the_command_usage(command):
    out = ember(*command)
    assert out.returncode == 2
    assert out.stderr.startswith(f"usage: ember {command[0]} ")
    assert "unrecognized arguments: " in out.stderr.splitlines()[-1]


def test_run_refuses_options_the_artifact_fixes():
    out = ember("run", "no-such-artifact", "-p", "x", "--disable", "cse")
    assert out.returncode == 1 and "ember compile --disable" in out.stderr


@pytest.mark.parametrize("where", ("before", "after"))
def test_debug_is_accepted_anywhere(where, tmp_path):
    missing = tmp_path / "missing.ir"
    args = ["--debug", "ir", missing] if where == "before" else ["ir", missing, "--debug"]
    out = ember(*args)
    assert out.returncode != 0 and "Traceback" in out.stderr
    plain = ember("ir", missing)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr and plain.stderr.count("\n") == 1
