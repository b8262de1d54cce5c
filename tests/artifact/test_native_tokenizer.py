"""The native runtime's tokenizer (ember/artifact/native/tokenizer.c, bpe.c) against ember's
Python tokenizer, without compiling an artifact: a small driver (native_tokenize.c) built with
the runtime's tokenizer sources encodes hard texts with byte-level BPE vocabularies under each
pre-tokenizer family ember knows (qwen2, llama-3, gpt-2, starcoder, default), and the ids and
every token's bytes must be ember's. The Unicode classes the C pre-tokenizer matches must be
the `regex` module's (the committed table is regenerated and compared)."""
import json
import subprocess
from pathlib import Path

import gguf
import pytest
from gguf.constants import TokenType

from ember.artifact.native import SOURCE_DIR, pre_split_fields, tokenizer_fields
from ember.artifact.native_unicode import TABLE, table_text
from ember.backends.cpu.compiler import find_compiler
from ember.models.tokenizer import Tokenizer
from ember.models.tokenizers.bpe import PRE_TOKENIZERS, byte_to_unicode

from tiny_gguf import N_VOCAB, bpe_vocab, finish, write_vocab
from tokenizer_texts import BPE_TEXTS, HARD_TEXTS

DRIVER = Path(__file__).with_name("native_tokenize.c")


def encoded(text: str) -> str:
    """text's UTF-8 bytes as GPT-2's byte characters (how a BPE vocabulary spells it)."""
    table = byte_to_unicode()
    return "".join(table[b] for b in text.encode())


def bpe_test_vocab(pre: str | None) -> dict:
    """tiny_gguf's BPE vocabulary plus tokens and merges that tell the pre-tokenizers apart:
    digit groups, a word only ignore_merges finds whole, a pair listed twice, a merge whose
    result is no token (its non-ASCII bytes are dropped, as llama.cpp does), a user-defined token."""
    vocab = bpe_vocab(N_VOCAB)
    pieces = ["12", "123", "ab", " ab", "abab", " xyz", "'s", "\n\n"]
    merges = [f"{encoded('1')} {encoded('2')}", f"{encoded('12')} {encoded('3')}", "a b",
              f"{encoded(' ')} ab", "ab ab", "a b", f"{encoded('é')[0]} {encoded('é')[1]}",
              "' s", f"{encoded(chr(10))} {encoded(chr(10))}"]
    tokens = vocab["tokens"] + [encoded(p) for p in pieces] + ["<user>"]
    types = vocab["types"] + [TokenType.NORMAL] * len(pieces) + [TokenType.USER_DEFINED]
    return dict(vocab, tokens=tokens, types=types, merges=vocab["merges"] + merges, pre=pre)


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("native-tokenize")
    exe = folder / "native_tokenize"
    sources = [str(SOURCE_DIR / name) for name in ("tokenizer.c", "bpe.c", "gguf.c", "json.c")]
    subprocess.run([find_compiler(), "-O1", "-std=gnu11", "-Wall", "-Werror", "-Wno-unused-parameter",
                    "-I", str(SOURCE_DIR), str(DRIVER), *sources, "-o", str(exe)], check=True)
    return exe


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt-2", "starcoder", "default", None])
def test_bpe_ids_and_pieces_are_embers(driver, tmp_path, pre):
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    write_vocab(w, bpe_test_vocab(pre))
    finish(w)
    tokenizer = Tokenizer.from_gguf(path)
    block = tmp_path / "block.json"
    block.write_text(json.dumps(tokenizer_fields(tokenizer)))
    texts = HARD_TEXTS + BPE_TEXTS
    stdin = b"".join(t.encode("utf-8", errors="surrogateescape") + b"\0" for t in texts)
    result = subprocess.run([str(driver), str(path), str(block)], input=stdin, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().split("\n")
    for k, text in enumerate(texts):
        for special, line in ((True, lines[2 * k]), (False, lines[2 * k + 1])):
            want = tokenizer.encode(text, add_special=special, parse_special=special)
            assert [int(i) for i in line.split()] == want, (text, special)
    pieces = lines[2 * len(texts):2 * len(texts) + tokenizer.vocab_size]
    for token, line in enumerate(pieces):
        assert bytes.fromhex("" if line == "-" else line) == tokenizer.token_to_piece(token), token


def test_the_vocabulary_tells_the_pre_tokenizers_apart():
    # the comparison above means something: the families give different ids on these texts
    ids = {}
    for pre in ("qwen2", "llama-bpe", "gpt-2", "default"):
        tokenizer = Tokenizer.from_metadata(_metadata(bpe_test_vocab(pre)))
        ids[pre] = tuple(tuple(tokenizer.encode(t, add_special=False)) for t in BPE_TEXTS)
    assert len(set(ids.values())) == 4


def _metadata(vocab: dict) -> dict:
    meta = {"tokenizer.ggml.model": vocab["model"], "tokenizer.ggml.tokens": vocab["tokens"],
            "tokenizer.ggml.token_type": [int(t) for t in vocab["types"]], "tokenizer.ggml.merges": vocab["merges"],
            "tokenizer.ggml.bos_token_id": vocab["bos"], "tokenizer.ggml.eos_token_id": vocab["eos"]}
    if vocab["pre"]:
        meta["tokenizer.ggml.pre"] = vocab["pre"]
    return meta


def test_every_pre_tokenizer_has_c_matchers():
    for name in PRE_TOKENIZERS:
        assert pre_split_fields(name)["pre_split"], name


def test_the_unicode_table_is_the_regex_modules():
    assert TABLE.read_text() == table_text(), "run: python3 -m ember.artifact.native_unicode"
