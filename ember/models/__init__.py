"""Model definitions written with the IR builder, and loading them from GGUF files.

    model = load_model("gemma-3-270m-q4_k_m.gguf")
    graph = model.build_step(n_tokens=8, n_kv=64, n_outputs=1)
    graph = model.build_step(8, 64, 1, cache=KVCacheTypes.of("q8_0", "q8_0"))   # a q8_0 KV cache

`ARCHITECTURES` maps a GGUF `general.architecture` to the function that builds its step graph
(the contract is in ember/models/common.py).
"""
from __future__ import annotations

import dataclasses
import os
from types import MappingProxyType
from typing import Callable

from ember.ir.graph import Graph
from ember.models import gemma3, gemma4, granite_hybrid, llama, mamba2, qwen2, qwen3
from ember.models import qwen3next, qwen35, qwen35moe
from ember.models import falcon_h1, jamba, lfm2, nemotron_h
from ember.models.common import Model, StepGraph, build_qkv  # noqa: F401
from ember.models.gguf_file import GGUFFile, ModelFileError, open_gguf  # noqa: F401
from ember.models.hparams import HParams, check_layer_tensors
from ember.models.kv_cache import CACHE_TYPE_NAMES, F16_CACHE, KVCacheTypes  # noqa: F401

# arch -> build_step(model, n_tokens, n_kv, n_outputs, n_kv_swa=None, cache=F16_CACHE)
ARCHITECTURES: dict[str, Callable[..., Graph]] = {
    "llama": llama.build_step,
    "qwen2": qwen2.build_step,
    "qwen3": qwen3.build_step,
    "gemma3": gemma3.build_step,
    "gemma4": gemma4.build_step,
    "mamba2": mamba2.build_step,
    "granitehybrid": granite_hybrid.build_step,
    "qwen3next": qwen3next.build_step,
    "qwen35": qwen35.build_step,
    "qwen35moe": qwen35moe.build_step,
    "lfm2": lfm2.build_step,
    "lfm2moe": lfm2.build_step,
    "nemotron_h": nemotron_h.build_step,
    "falcon-h1": falcon_h1.build_step,
    "jamba": jamba.build_step,
}


def load_model(path: str | os.PathLike) -> Model:
    """Open a GGUF file and check that ember can run it: a supported architecture, sound
    hyper-parameters, every tensor the graph needs (right shape) and no tensor it would ignore."""
    file = GGUFFile(path)
    arch = file.architecture
    if arch not in ARCHITECTURES:
        raise ModelFileError(f"{file.path}: architecture {arch!r} is not supported; supported: "
                             f"{', '.join(sorted(ARCHITECTURES))}")
    hp = HParams.from_metadata(file.metadata, str(file.path))
    check_layer_tensors(hp, file.tensor_infos, str(file.path))
    if hp.n_vocab == 0 and "token_embd.weight" in file:
        hp = dataclasses.replace(hp, n_vocab=file.tensor_infos["token_embd.weight"].shape[0])
    tokenizer = MappingProxyType({k: v for k, v in file.metadata.items() if k.startswith("tokenizer.")})
    model = Model(arch, hp, file, tokenizer, ARCHITECTURES[arch])
    used = set(model.build_step(1, 1, 1).constants)
    unused = sorted(set(file.tensor_infos) - used)
    if unused:
        listed = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        raise ModelFileError(f"{file.path}: ember's {arch} graph does not use tensor(s) {listed}; "
                             "the file holds a variant ember does not support")
    return model
