"""Byte-level BPE (GGUF `tokenizer.ggml.model = "gpt2"`), as llama.cpp does it.

Text is split into words by the pre-tokenizer regexes named by `tokenizer.ggml.pre`, each
word's UTF-8 bytes are mapped to printable characters (GPT-2's byte-to-unicode table), and the
adjacent pair with the lowest merge rank is merged until none is left. This mirrors llama.cpp's
`llm_tokenizer_bpe_session`, so token ids agree with it. The regexes need Unicode classes
(\\p{L}, \\p{N}) that the standard `re` module lacks, hence the third-party `regex` module.
Imports the standard library and `regex` (on first use).
"""
from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from ember.errors import EmberError

# llama.cpp's spelling of the tokenizer.json patterns: (?i:'s|...) written out as '[sS] etc.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3_PATTERN = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
DEFAULT_PATTERNS = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]")


@dataclass(frozen=True)
class PreTokenizer:
    """How one `tokenizer.ggml.pre` value splits text, with the flags llama.cpp ties to it."""

    patterns: tuple[str, ...]
    ignore_merges: bool = False  # a word that is already a token is not merged (llama-3)


_LLAMA3 = PreTokenizer((LLAMA3_PATTERN,), ignore_merges=True)
_QWEN2 = PreTokenizer((QWEN2_PATTERN,))
_GPT2 = PreTokenizer((GPT2_PATTERN,))
_STARCODER = PreTokenizer((r"\p{N}", GPT2_PATTERN))
_DEFAULT = PreTokenizer(DEFAULT_PATTERNS)

# llama.cpp also ties a `clean_spaces` flag to these names, which tidies " ," to "," when it
# detokenizes a whole sequence; ember's decode is the plain concatenation of pieces instead.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), _QWEN2),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jina-es", "jina-de"), _GPT2),
    **dict.fromkeys(("starcoder", "refact", "codeshell", "exaone", "smollm"), _STARCODER),
}


def pre_tokenizer(name: str | None) -> PreTokenizer:
    if not name:
        return _DEFAULT  # llama.cpp warns and uses its default split
    try:
        return PRE_TOKENIZERS[name]
    except KeyError:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise EmberError(f"unknown BPE pre-tokenizer {name!r} (tokenizer.ggml.pre); known: {known}") from None


@cache
def byte_to_unicode() -> tuple[str, ...]:
    """GPT-2's table: printable bytes map to themselves, the rest to U+0100 onwards."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


@cache
def unicode_to_byte() -> dict[str, int]:
    return {ch: b for b, ch in enumerate(byte_to_unicode())}


@cache
def _compiled(pattern: str):
    try:
        import regex  # imported here so that SPM vocabularies work without it
    except ImportError as e:
        raise EmberError("BPE tokenizers need the `regex` module: pip install regex") from e
    return regex.compile(pattern)


def split_words(text: str, patterns: Sequence[str]) -> list[str]:
    """Apply each pattern in turn to every piece; text between matches stays a piece too."""
    pieces = [text] if text else []
    for pattern in patterns:
        rx = _compiled(pattern)
        out: list[str] = []
        for piece in pieces:
            start = 0
            for m in rx.finditer(piece):
                if m.start() > start:
                    out.append(piece[start:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                start = m.end()
            if start < len(piece):
                out.append(piece[start:])
        pieces = out
    return pieces


class BPEModel:
    """Merges words of byte-encoded text into token ids; one per vocabulary, with a word cache."""

    def __init__(
        self,
        piece_to_id: Mapping[str, int],
        merges: Sequence[str],
        pre: PreTokenizer,
    ):
        self.piece_to_id = piece_to_id
        self.pre = pre
        for pattern in pre.patterns:
            _compiled(pattern)  # fail here, not on the first encode, if `regex` is missing
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            # llama.cpp splits at the first space after the first character
            pos = merge.find(" ", 1)
            if pos < 0:
                continue
            self.ranks.setdefault((merge[:pos], merge[pos + 1:]), rank)
        self._encode_byte = byte_to_unicode()
        self._cache: dict[str, tuple[int, ...]] = {}

    def tokenize(self, text: str) -> list[int]:
        out: list[int] = []
        for word in split_words(text, self.pre.patterns):
            ids = self._cache.get(word)
            if ids is None:
                ids = self._word(word)
                if len(self._cache) < 100_000:
                    self._cache[word] = ids
            out.extend(ids)
        return out

    def _word(self, word: str) -> tuple[int, ...]:
        table = self._encode_byte
        encoded = "".join(table[b] for b in word.encode("utf-8", errors="surrogateescape"))
        lookup = self.piece_to_id.get
        if self.pre.ignore_merges and encoded in self.piece_to_id:
            return (self.piece_to_id[encoded],)

        syms = list(encoded)
        n = len(syms)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[int, int, int, str]] = []
        ranks = self.ranks

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            rank = ranks.get((syms[left], syms[right]))
            if rank is not None:
                heapq.heappush(heap, (rank, left, right, syms[left] + syms[right]))

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            a, b = syms[left], syms[right]
            if not a or not b or a + b != merged:
                continue  # outdated: one side has merged with something else since
            syms[left] = merged
            syms[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])

        ids: list[int] = []
        i = 0
        while i != -1:
            tok = lookup(syms[i])
            if tok is not None:
                ids.append(tok)
            else:
                # llama.cpp looks up each UTF-8 byte of the piece as a one-byte string, so only
                # ASCII characters can be found; the others are dropped, as there.
                ids.extend(lookup(ch) for ch in syms[i] if ord(ch) < 0x80 and ch in self.piece_to_id)
            i = nxt[i]
        return tuple(ids)
