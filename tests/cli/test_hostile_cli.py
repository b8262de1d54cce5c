"""Command-line values outside their meaning (issue 16): each refused with one line naming the
flag, before any model work where it can be, instead of a silent clamp, a NumPy warning or a
ZeroDivisionError. Run in-process through ember.cli.main (the same path as the command)."""
from __future__ import annotations

import pytest
from gguf.constants import GGUFValueType as T

from ember.cli import main

from gguf_parts import entry, read_parts
from tiny_gguf import Spec


def refused(capsys, argv, *fragments):
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("ember: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


@pytest.mark.parametrize("flags, fragment", [
    (["-t", 0], "-t 0: the thread count must be at least 1"),
    (["--top-k", -1], "--top-k -1: must be >= 0"),
    (["--top-p", 2], "--top-p 2.0: must be in (0, 1]"),
    (["--min-p", -1], "--min-p -1.0: must be in [0, 1]"),
    (["--temp", "inf"], "--temp inf: must be finite"),
    (["--repeat-penalty", 0], "--repeat-penalty 0.0: must be finite and > 0"),
    (["-c", 0], "-c 0: the context must be at least 1 token"),
    (["--draft-max", 0], "--draft-max 0: must be at least 1"),
], ids=["threads-0", "top-k", "top-p", "min-p", "temp-inf", "repeat-penalty-0", "ctx-0", "draft-max-0"])
def test_generation_values_are_refused_before_loading(capsys, tmp_path, flags, fragment):
    # the model path does not exist: the refusal must come first
    refused(capsys, ["generate", tmp_path / "absent.gguf", "-p", "x", *flags], fragment)


def test_perplexity_with_a_zero_context_is_one_line(capsys, tmp_path):
    refused(capsys, ["perplexity", tmp_path / "absent.gguf", "-f", tmp_path / "t.txt", "-c", 0], "-c 0")


def test_context_above_the_training_context_is_refused(capsys, tiny_files):
    path = tiny_files[Spec("llama", "q8_0")]      # trained for 256 tokens
    refused(capsys, ["logits", path, "-p", "hi", "-o", "/dev/null", "-c", 512, "-t", 1],
            "n_ctx 512 exceeds the training context", "(256 tokens)")


def test_draft_with_another_vocabulary_of_the_same_size_is_refused(capsys, tiny_files, tmp_path):
    target = tiny_files[Spec("llama", "q8_0")]
    parts = read_parts(target)
    tokens = [f"tok{i}" for i in range(320)]         # 320 tokens, as the target, but others
    draft = parts.set("tokenizer.ggml.tokens", entry(T.ARRAY, tokens, T.STRING)).write(tmp_path / "d.gguf")
    refused(capsys, ["generate", target, "-p", "hi", "-n", 2, "-t", 1, "--spec", f"draft:{draft}"],
            "vocabulary has the target's size but other tokens")


def test_non_finite_logits_are_refused_not_printed(capsys, tmp_path):
    """A weight holding NaN (or hyper-parameters that overflow) once printed <unk><unk> with
    exit 0; the sampler refuses logits that are not finite, naming the step."""
    from tiny_gguf import write_tiny_gguf

    def poison(weights):
        weights["output.weight"] = weights["output.weight"].copy()
        weights["output.weight"][7, :] = float("nan")
        return weights
    path = write_tiny_gguf(tmp_path / "nan.gguf", Spec("llama", "f32"), edit=poison)
    refused(capsys, ["generate", path, "-p", "hello", "-n", 4, "-t", 1, "-c", 64, "--temp", 0],
            "logits after 6 tokens are not finite", "token 7: nan")
