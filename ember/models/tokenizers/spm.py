"""SentencePiece-style merging (GGUF `tokenizer.ggml.model = "llama"`), as llama.cpp does it.

Start from the UTF-8 characters of the (already space-escaped) text and repeatedly merge the
adjacent pair whose concatenation is a vocabulary piece with the highest score; ties go to the
leftmost pair. A character left alone that is not a piece falls back to its `<0xXX>` byte
tokens. This mirrors llama.cpp's `llm_tokenizer_spm_session`, so token ids agree with it.
Imports only the standard library.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence


def spm_tokenize(
    text: str,
    piece_to_id: Mapping[str, int],
    scores: Sequence[float],
    byte_to_id: Callable[[int], int | None],
) -> list[int]:
    """Token ids for one fragment of text (no special tokens inside it)."""
    if not text:
        return []
    n = len(text)
    # A doubly linked list of symbols; merged-away symbols become "".
    syms = list(text)
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1

    # Heap entries: (-score, left, right, merged length). Python's heap pops the smallest,
    # so negating the score pops the best piece first and, on ties, the leftmost pair.
    heap: list[tuple[float, int, int, int]] = []
    lookup = piece_to_id.get

    def push(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        merged = syms[left] + syms[right]
        tok = lookup(merged)
        if tok is not None:
            heapq.heappush(heap, (-scores[tok], left, right, len(merged)))

    for i in range(1, n):
        push(i - 1, i)

    while heap:
        _, left, right, size = heapq.heappop(heap)
        a, b = syms[left], syms[right]
        # Symbols only grow rightwards, so a stale pair shows as an empty side or a new length.
        if not a or not b or len(a) + len(b) != size:
            continue
        syms[left] = a + b
        syms[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        push(prev[left], left)
        push(left, nxt[left])

    out: list[int] = []
    i = 0
    while i != -1:
        piece = syms[i]
        tok = lookup(piece)
        if tok is not None:
            out.append(tok)
        else:
            for byte in piece.encode("utf-8", errors="surrogateescape"):
                byte_tok = byte_to_id(byte)
                if byte_tok is not None:
                    out.append(byte_tok)
        i = nxt[i]
    return out
