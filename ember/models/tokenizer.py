"""Tokenizers built from GGUF metadata, giving the same token ids as llama.cpp.

`Tokenizer.from_gguf(path)` reads only the file's header (ember.models.gguf_file, no tensor data); `Tokenizer.from_metadata(meta)` takes
the `tokenizer.ggml.*` keys as a mapping. Two algorithms are supported, chosen by
`tokenizer.ggml.model`: "llama" (SentencePiece-style score merging: llama-2, gemma, gemma3;
`ember.models.tokenizers.spm`) and "gpt2" (byte-level BPE with a pre-tokenizer regex: qwen2,
llama-3; `ember.models.tokenizers.bpe`). This module holds what both share, following
llama.cpp's llama-vocab.cpp: special-token ids and flags, splitting out special tokens before
the algorithm runs, end-of-generation tokens, and turning ids back into bytes.
Imports the standard library, NumPy and the `ember.models.tokenizers` modules.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ember.errors import EmberError
from ember.models.tokenizers.bpe import BPEModel, pre_tokenizer, unicode_to_byte
from ember.models.gguf_file import open_gguf
from ember.models.tokenizers.spm import spm_tokenize

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_SPACE_MARK = "\u2581"  # SentencePiece's visible space

# Tokens llama.cpp recognises by their text: llama-vocab.cpp, llama_vocab::impl::load.
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PRE_TEXTS = (
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
    "<|code_prefix|>", "<|prefix|>",
)
_FIM_SUF_TEXTS = (
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
    "<|code_suffix|>", "<|suffix|>",
)
_FIM_MID_TEXTS = (
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
    "<|code_middle|>", "<|middle|>",
)
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))


def _as_str(token: object) -> str:
    if isinstance(token, bytes):
        return token.decode("utf-8", errors="surrogateescape")
    return str(token)


def _check_types(meta: Mapping[str, object], source: str) -> None:
    """Each tokenizer.ggml.* key of the type llama.cpp reads it as (a list of strings, a numeric
    array, an integer id, a flag), else an EmberError naming the file and the key: the wrong
    type once escaped as a TypeError from deep inside the tokenizer."""
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

    def numeric_array(kind: str):
        def ok(v):
            if isinstance(v, np.ndarray):
                return v.ndim == 1 and v.dtype.kind in kind
            numbers = (int, float) if "f" in kind else (int,)
            return isinstance(v, list) and all(isinstance(x, numbers) and not isinstance(x, bool) for x in v)
        return ok

    rules = {
        "tokenizer.ggml.model": ("a string", lambda v: isinstance(v, str)),
        "tokenizer.ggml.pre": ("a string", lambda v: isinstance(v, str)),
        "tokenizer.ggml.tokens": ("an array of strings", _is_string_list),
        "tokenizer.ggml.merges": ("an array of strings", _is_string_list),
        "tokenizer.ggml.scores": ("an array of numbers", numeric_array("fiu")),
        "tokenizer.ggml.token_type": ("an array of integers", numeric_array("iu")),
    }
    for key, value in meta.items():
        if key in rules:
            what, ok = rules[key]
        elif key.endswith("_token_id"):
            what, ok = "an integer token id", is_int
        elif key.startswith("tokenizer.ggml.add_"):
            what, ok = "a bool", lambda v: isinstance(v, (bool, np.bool_))
        else:
            continue
        if not ok(value):
            shown = f"an array of {len(value)}" if isinstance(value, (list, np.ndarray)) else repr(value)[:60]
            raise EmberError(f"{source}: metadata {key!r} must be {what}, not {shown}")
    scores = meta.get("tokenizer.ggml.scores")
    if scores is not None and not np.all(np.isfinite(np.asarray(scores, dtype=np.float64))):
        raise EmberError(f"{source}: metadata 'tokenizer.ggml.scores' holds non-finite values")


def _is_string_list(v: object) -> bool:
    # map with the builtin: a vocabulary of 262,144 strings checked at C speed
    return isinstance(v, list) and all(map(isinstance, v, itertools.repeat(str)))


def _as_list(values: object, kind: type) -> list:
    if hasattr(values, "tolist"):  # NumPy arrays from the GGUF reader: one fast conversion
        return values.astype(kind).tolist()
    return [kind(v) for v in values]


class Tokenizer:
    """Text <-> token ids for one vocabulary. Build with `from_gguf` or `from_metadata`."""

    def __init__(self, meta: Mapping[str, object], source: str = "<metadata>", n_vocab: int | None = None):
        """source: the file the metadata comes from (named by every error); n_vocab: the
        model's vocabulary size, which the token list must match."""
        _check_types(meta, source)
        model = meta.get("tokenizer.ggml.model")
        if model not in ("llama", "gpt2"):
            raise EmberError(
                f"{source}: tokenizer.ggml.model {model!r} is not supported (\"llama\" = SentencePiece, \"gpt2\" = BPE)"
            )
        self.kind = "spm" if model == "llama" else "bpe"
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None or len(tokens) == 0:
            raise EmberError(f"{source}: GGUF metadata has no tokenizer.ggml.tokens")
        if n_vocab is not None and len(tokens) != n_vocab:
            # a shorter list once failed with an IndexError mid-generation, text already printed
            raise EmberError(f"{source}: tokenizer.ggml.tokens has {len(tokens)} tokens, the model's "
                             f"vocabulary {n_vocab}")
        self.tokens: list[str] = list(tokens) if set(map(type, tokens)) == {str} else \
            [t if t.__class__ is str else _as_str(t) for t in tokens]
        n = len(self.tokens)
        scores = meta.get("tokenizer.ggml.scores")
        self.scores: list[float] = _as_list(scores, float) if scores is not None else [0.0] * n
        types = meta.get("tokenizer.ggml.token_type")
        self.types: list[int] = _as_list(types, int) if types is not None else [NORMAL] * n
        if len(self.scores) < n or len(self.types) < n:
            raise EmberError(f"{source}: tokenizer.ggml.scores / token_type are shorter than tokenizer.ggml.tokens")

        # one C-level pass; only a vocabulary with a duplicate is walked again, to name it
        self.piece_to_id: dict[str, int] = dict(zip(self.tokens, range(n)))
        if len(self.piece_to_id) != n:
            seen: dict[str, int] = {}
            for i, text in enumerate(self.tokens):
                if text in seen:
                    raise EmberError(f"{source}: duplicate token {text!r} in the vocabulary: ids {seen[text]} and {i}")
                seen[text] = i

        self._types = np.asarray(self.types)      # the sets below, found at C speed
        self._control = set(np.flatnonzero(self._types == CONTROL).tolist())
        pre_name = meta.get("tokenizer.ggml.pre")
        self.pre = str(pre_name) if pre_name is not None else None
        self._pre = pre_tokenizer(pre_name) if self.kind == "bpe" else None
        self._read_flags(meta, pre_name)
        self._read_special_ids(meta)
        self._special_order = self._build_special_order()
        self._special_set = frozenset(self._special_order)
        self._bpe = (
            BPEModel(self.piece_to_id, [_as_str(m) for m in meta.get("tokenizer.ggml.merges", [])], self._pre)
            if self.kind == "bpe" else None
        )
        self._byte_ids = self._build_byte_ids()
        self._pieces: dict[int, bytes] = {}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, object], source: str = "<metadata>",
                      n_vocab: int | None = None) -> "Tokenizer":
        return cls(meta, source, n_vocab)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        return cls(open_gguf(path).metadata, str(path))

    # -- metadata -----------------------------------------------------------------------------

    def _read_flags(self, meta: Mapping[str, object], pre_name: object) -> None:
        if self.kind == "spm":
            self.add_bos, self.add_space_prefix = True, True
        else:
            self.add_bos = pre_name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")
            self.add_space_prefix = False
        self.add_eos = False
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", self.add_bos))
        self.add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", self.add_eos))
        self.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", self.add_space_prefix))

    def _read_special_ids(self, meta: Mapping[str, object]) -> None:
        n = len(self.tokens)
        defaults = {"bos": 1, "eos": 2, "unk": 0} if self.kind == "spm" else {"bos": 11, "eos": 11}

        def special(name: str, key: str | None = None) -> int | None:
            value = meta.get(key or f"tokenizer.ggml.{name}_token_id")
            if value is not None and 0 <= int(value) < n:
                return int(value)
            default = defaults.get(name)
            return default if default is not None and default < n else None

        def by_text(current: int | None, texts: Iterable[str]) -> int | None:
            if current is not None:
                return current
            found = [self.piece_to_id[t] for t in texts if t in self.piece_to_id]
            if not found:
                return None
            self._control.add(min(found))  # llama.cpp forces these to control tokens
            return min(found)

        self.bos_id = special("bos")
        self.eos_id = special("eos")
        self.unk_id = special("unk", "tokenizer.ggml.unknown_token_id")
        self.pad_id = special("padding")
        self.eot_id = by_text(special("eot"), _EOT_TEXTS)
        self.eom_id = by_text(special("eom"), _EOM_TEXTS)
        # FIM prefix/suffix/middle ids are not kept: only the control flag they get matters here
        by_text(special("fim_pre"), _FIM_PRE_TEXTS)
        by_text(special("fim_suf"), _FIM_SUF_TEXTS)
        by_text(special("fim_mid"), _FIM_MID_TEXTS)
        fim = [  # these three end generation
            by_text(special("fim_pad"), _FIM_PAD_TEXTS),
            by_text(special("fim_rep"), _FIM_REP_TEXTS),
            by_text(special("fim_sep"), _FIM_SEP_TEXTS),
        ]
        if self.add_bos and self.bos_id is None:
            raise EmberError("tokenizer.ggml.add_bos_token is true, but the BOS token is not set")
        if self.add_eos and self.eos_id is None:
            raise EmberError("tokenizer.ggml.add_eos_token is true, but the EOS token is not set")

        eog = {i for i in fim if i is not None}
        for text in _EOG_TEXTS:
            if text in self.piece_to_id:
                eog.add(self.piece_to_id[text])
                self._control.add(self.piece_to_id[text])
        eog.update(i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None)
        # o200k_harmony / solar-open: "<|end|>" ends a message, not the generation
        texts = {self.tokens[i] for i in eog}
        if "<|end|>" in texts and (
            {"<|return|>", "<|call|>"} <= texts or {"<|calls|>", "<|flush|>"} <= texts
        ):
            eog.discard(self.piece_to_id["<|end|>"])
        self.eog_ids = frozenset(eog)

    def _build_special_order(self) -> list[int]:
        """Control, user-defined and unknown tokens, longest text first (llama.cpp's order)."""
        special_types = (USER_DEFINED, UNKNOWN, CONTROL)
        ids = list(set(np.flatnonzero(np.isin(self._types, special_types)).tolist()) | self._control)
        # by UTF-8 length, as llama.cpp compares std::string sizes; its sort is unstable, so
        # the order among equal lengths is ours (by id); it matters only for overlapping texts
        ids.sort(key=lambda i: (-len(self.tokens[i].encode("utf-8", errors="surrogateescape")), i))
        return ids

    def _build_byte_ids(self) -> list[int | None]:
        """Token for each byte value: `<0xXX>` (SPM byte fallback) or, failing that, the byte itself."""
        out: list[int | None] = []
        for b in range(256):
            tok = self.piece_to_id.get(f"<0x{b:02X}>")
            if tok is None and b < 0x80:
                tok = self.piece_to_id.get(chr(b))
            out.append(tok if tok is not None else self.unk_id)
        return out

    # -- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def is_eog(self, token_id: int) -> bool:
        """True for tokens that end generation: EOS, EOT and those llama.cpp lists by text."""
        return token_id in self.eog_ids

    def is_control(self, token_id: int) -> bool:
        return token_id in self._control

    # -- encode -------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`. `add_special` adds BOS/EOS as the model asks; `parse_special`
        turns control-token text such as "<start_of_turn>" into its id (user-defined tokens
        are always matched verbatim, as in llama.cpp)."""
        fragments = self._split_special(text, parse_special) if text else []
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        prev_special = True  # SPM: the first fragment gets the space prefix
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            elif self.kind == "spm":
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                out.extend(spm_tokenize(
                    frag.replace(" ", _SPACE_MARK), self.piece_to_id, self.scores, self._byte_ids.__getitem__
                ))
                prev_special = False
            else:
                out.extend(self._bpe.tokenize(frag))
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _split_special(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special-token texts out of `text`, longest token first, as llama.cpp's
        tokenizer_st_partition does; returns raw-text pieces and token ids in order."""
        chars = set(text)
        pairs = {text[i:i + 2] for i in range(len(text) - 1)}
        fragments: list[str | int] = [text]
        for tok in self._special_order:
            if not parse_special and (tok in self._control or self.types[tok] == UNKNOWN):
                continue
            piece = self.tokens[tok]
            # cheap filters before the substring search: most of 6000 specials are absent
            if (piece[:2] not in pairs) if len(piece) > 1 else (piece not in chars):
                continue
            if piece not in text:
                continue
            split: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or piece not in frag:
                    split.append(frag)
                    continue
                parts = frag.split(piece)
                for k, part in enumerate(parts):
                    if k:
                        split.append(tok)
                    if part:
                        split.append(part)
            fragments = split
        return fragments

    # -- decode -------------------------------------------------------------------------------

    def token_to_piece(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes of one token, for streaming; may be part of a UTF-8 sequence. With
        `skip_special`, control and unknown tokens give b"" (llama.cpp's special=False)."""
        if skip_special and (token_id in self._control or self.types[token_id] == UNKNOWN):
            return b""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._piece(token_id)
            self._pieces[token_id] = piece
        return piece

    def _piece(self, token_id: int) -> bytes:
        text = self.tokens[token_id]
        kind = self.types[token_id]
        if token_id in self._control or kind in (UNKNOWN, USER_DEFINED):
            return text.encode("utf-8", errors="surrogateescape")
        if kind == BYTE:
            return bytes([int(text[3:5], 16)])
        if kind != NORMAL:
            return b""  # unused and undefined tokens render as nothing, as in llama.cpp
        if self.kind == "spm":
            return text.replace(_SPACE_MARK, " ").encode("utf-8", errors="surrogateescape")
        to_byte = unicode_to_byte()
        return b"".join(
            bytes([to_byte[ch]]) if ch in to_byte else ch.encode("utf-8", errors="surrogateescape")
            for ch in text
        )

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of a token sequence; bytes are joined first, so split UTF-8 sequences reunite.
        With an SPM space prefix, the space `encode` put before the text and after each special
        token is removed again, so decode(encode(text)) == text."""
        chunks: list[bytes] = []
        strip_space = self.add_space_prefix
        for tok in ids:
            tok = int(tok)
            piece = self.token_to_piece(tok, skip_special)
            if tok in self._special_set:
                strip_space = self.add_space_prefix
            else:
                if strip_space and piece.startswith(b" "):
                    piece = piece[1:]
                strip_space = False
            chunks.append(piece)
        return b"".join(chunks).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, eot={self.eot_id})"
        )
