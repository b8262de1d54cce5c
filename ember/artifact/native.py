"""The native runtime: what a cpu artifact records so that C code without Python can run it, and
building that C code (ember/artifact/native/*.c) into the artifact's `ember-run` command.

A cpu artifact's step entry carries `abi` (step_abi): the order, types and storage shapes of the
inputs and outputs of its library's entry point, which outputs update an input in place, the
constants (by name: a GGUF tensor or one of the artifact's .npy files, with their byte sizes;
an IR literal's bytes in hex)
and the arena size. The manifest's `native` block (native_fields) holds what the runtime needs
of the model beyond the GGUF: the sliding window, and the tokenizer's flags and special-token
ids as ember.models.tokenizer derives them, and for byte-level BPE the pre-tokenizer as the
names of the C matchers of its regexes (the C tokenizer reads the vocabulary and the merges
itself from the memory-mapped GGUF, and runs the SPM or BPE algorithm in C).

The C sources are plain C11 + POSIX (mmap, dlopen): the same files build for x86-64 here and
for aarch64 with a cross compiler (build_runtime's cc). May import ir, codegen, backends, models.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from ember.artifact.format import FORMAT_VERSION, ArtifactError
from ember.backends.base import host_storage
from ember.backends.cpu.compiler import find_compiler
from ember.models.tokenizers.bpe import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, pre_tokenizer

SOURCE_DIR = Path(__file__).with_name("native")
# The pre-tokenizer regexes of ember.models.tokenizers.bpe that bpe.c has a matcher for, by the
# matcher's name (DEFAULT_PATTERNS: punctuation, gpt2, numbers, digits3; starcoder's: number, gpt2).
SPLIT_NAMES = {
    LLAMA3_PATTERN: "llama3", QWEN2_PATTERN: "qwen2", GPT2_PATTERN: "gpt2",
    r"\p{N}": "number", r"\p{N}+": "numbers", r"[0-9][0-9][0-9]": "digits3",
    r"[\p{P}\$\+<=>\^~\|]+": "punctuation",
}
SOURCES = ("runtime.c", "json.c", "gguf.c", "sha256.c", "tokenizer.c", "bpe.c", "sampler.c", "verified.c",
           "ember_run.c")
RUNTIME_FILE = "ember-run"
FLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-format-truncation")
LIBS = ("-ldl", "-lm", "-lpthread")


def step_abi(program) -> dict:
    """How a CpuProgram's entry point is called: inputs [name, numpy dtype, storage shape],
    outputs [numpy dtype, storage shape, index of the input it updates in place or -1],
    constants [name, bytes] (a literal: [None, bytes, its bytes in hex]), arena bytes."""
    graph = program.graph
    in_place = program.in_place or {}
    inputs = [[n.name, *_storage(n.type)] for n in graph.inputs]
    outputs = [[*_storage(n.type), in_place.get(k, -1)] for k, n in enumerate(graph.outputs)]
    consts = []
    for node in program.constants:
        data = np.asarray(graph.constant_data(node))
        if node.attr("value") is not None:
            # a literal (a few values: rope frequency factors) lives in the IR text only, which
            # the runtime does not parse: its bytes come along in the abi
            consts.append([None, int(data.nbytes), np.ascontiguousarray(data).tobytes().hex()])
        else:
            consts.append([node.name, int(data.nbytes)])
    return {"inputs": inputs, "outputs": outputs, "consts": consts, "arena": int(program.plan.peak_bytes)}


def _storage(t) -> list:
    shape, dtype = host_storage(t)
    return [np.dtype(dtype).name, [int(d) for d in shape]]


def native_fields(model) -> dict:
    """The manifest's `native` block (see the module docstring)."""
    from ember.models.tokenizer import Tokenizer
    hp = model.hparams
    tok = Tokenizer.from_metadata(model.tokenizer, str(model.path), model.n_vocab)
    return {
        "arch": model.arch,
        "n_vocab": int(hp.n_vocab),
        "sliding_window": int(hp.sliding_window) if hp.uses_swa else 0,
        "recurrent": bool(model.recurrent_layers),
        "tokenizer": tokenizer_fields(tok),
    }


def tokenizer_fields(tok) -> dict:
    """The native block's `tokenizer`: what the C tokenizer takes from ember.models.tokenizer
    rather than deriving it again from the GGUF's metadata."""
    from ember.models.tokenizer import CONTROL
    extra_control = sorted(i for i in tok._control if tok.types[i] != CONTROL)
    fields = {
        "kind": tok.kind,
        "bos": -1 if tok.bos_id is None else int(tok.bos_id),
        "eos": -1 if tok.eos_id is None else int(tok.eos_id),
        "unk": -1 if tok.unk_id is None else int(tok.unk_id),
        "add_bos": bool(tok.add_bos),
        "add_eos": bool(tok.add_eos),
        "add_space_prefix": bool(tok.add_space_prefix),
        "extra_control": [int(i) for i in extra_control],
        "eog": sorted(int(i) for i in tok.eog_ids),
    }
    if tok.kind == "bpe":
        fields.update(pre_split_fields(tok.pre))
    return fields


def pre_split_fields(pre: str | None) -> dict:
    """What bpe.c needs of a BPE pre-tokenizer (tokenizer.ggml.pre): `pre_split`, the names of its
    C matchers for the regexes ember.models.tokenizers.bpe applies, in order (None when one of
    them has no matcher: the runtime then refuses the artifact in one line), and ignore_merges."""
    splitter = pre_tokenizer(pre)
    names = [SPLIT_NAMES.get(pattern) for pattern in splitter.patterns]
    return {"pre": pre, "pre_split": None if None in names else names, "ignore_merges": splitter.ignore_merges}


def build_runtime(out: Path, cc: str | None = None, flags: tuple[str, ...] = ()) -> Path:
    """Compile the native runtime's sources into the executable out (cc: a C compiler, e.g. a
    cross compiler; default the host's)."""
    compiler = cc or find_compiler()
    sources = [str(SOURCE_DIR / name) for name in SOURCES]
    version = f"-DEMBER_FORMAT_VERSION={FORMAT_VERSION}"      # the format this ember writes
    cmd = [compiler, *FLAGS, version, *flags, "-I", str(SOURCE_DIR), *sources, "-o", str(out), *LIBS]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["(no output)"])[0]
        raise ArtifactError(f"compile: building the native runtime with {compiler} failed: {first}")
    return Path(out)
