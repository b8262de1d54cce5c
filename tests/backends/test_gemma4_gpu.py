"""gemma4 on OpenCL (PoCL) and Vulkan (lavapipe) against the CPU backend, as
test_hybrid_models_gpu does for the hybrids: the tiny_gguf_gemma4 files (sliding-window and
global layers of two head sizes, shared-KV layers, per-layer embeddings, output scales), the
logits of a prompt and of greedy decode steps (the CPU's tokens fed to the device, so every row
compares the same context), the greedy tokens themselves on the f32 file, and on the device the
prompt decoded one token at a time equal to the prompt in one batch bit for bit (batch-invariant
kernels: speculation's identity rests on it). Then the same over quantized KV caches: q8_0 and
q4_0 (rotated in blocks of 64 and 128) on the tiny file, turbo3 / turbo4 and the mixed q8_0-K +
turbo4-V on the file with heads of 128 and 256. Each backend skips with its reason where missing.

Bounds (NMSE per row block): f32 weights 1e-6 (only the order of the f32 sums differs; a wrong
view or cache gives ~1; measured 2e-9 to 1e-8). nvfp4 weights 5e-3: the CPU rounds the
activations of its nvfp4 matmuls to 8 bits, the GPUs multiply f32 activations (measured 4e-4 to
8e-4). Quantized caches 1e-4: both sides store the same blocks unless the last bits of a K/V value
differ across a rounding step, which moves that value a whole step (measured 2e-13 where none
moved; 1.4e-5 on Vulkan's fourth decode step over the q8_0-K + turbo4-V cache, where one did).
Cold, PoCL compiles every kernel of two step graphs per case for one to two minutes, lavapipe
for ten seconds: only Vulkan on the f32 file runs by default. Greedy speculation over the mixed
quantized cache on Vulkan gives greedy decoding's tokens (slow)."""
from __future__ import annotations

import numpy as np
import pytest

from devices import make_backend
from ember.backends import get_backend
from ember.models import KVCacheTypes, load_model
from ember.runtime.session import Session, SessionOptions
from ember.testing import nmse

from speculation_checks import assert_ngram_speculation_is_greedy
from tiny_gguf_gemma4 import Gemma4Spec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")    # pyopencl's build-log notes

PROMPT = [1, 17, 260, 300, 42, 9, 33]      # past the window of 5
DECODE = 4
OPTIONS = SessionOptions(n_ctx=64, kv_bucket=32)
WEIGHT_BOUND = {"f32": 1e-6, "nvfp4": 5e-3}
CACHE_BOUND = 1e-4
HEADS_128 = 128
CACHES = {"q8_0": (("q8_0", "q8_0"), Gemma4Spec("f32")),
          "q4_0": (("q4_0", "q4_0"), Gemma4Spec("f32")),
          "turbo3": (("turbo3", "turbo3"), Gemma4Spec("f32", head_swa=HEADS_128)),
          "turbo4": (("turbo4", "turbo4"), Gemma4Spec("f32", head_swa=HEADS_128)),
          "q8_0-turbo4": (("q8_0", "turbo4"), Gemma4Spec("f32", head_swa=HEADS_128))}
DEFAULT = {("vulkan", "f32")}


@pytest.fixture(scope="module")
def cpu(shared_cpu_cache):
    return get_backend("cpu", threads=2, cache_dir=shared_cpu_cache)


def greedy_rows(session: Session) -> tuple[list[np.ndarray], list[int]]:
    """Every prompt row, then the rows of DECODE greedy steps; the greedy tokens."""
    rows, tokens = [session.eval(PROMPT, all_logits=True)], []
    for _ in range(DECODE):
        tokens.append(int(np.argmax(rows[-1][-1])))
        rows.append(session.eval(tokens[-1:]))
    return rows, tokens


def forced_rows(session: Session, tokens: list[int]) -> list[np.ndarray]:
    """Every prompt row, then the rows of decoding the given tokens."""
    return [session.eval(PROMPT, all_logits=True)] + [session.eval([t]) for t in tokens]


def assert_matches_the_cpu(model, gpu, cpu, options: SessionOptions, bound: float, same_tokens: bool):
    want, tokens = greedy_rows(Session(model, cpu, options))
    got = forced_rows(Session(model, gpu, options), tokens)
    for step, (g, w) in enumerate(zip(got, want)):
        assert nmse(g, w) <= bound, f"{gpu.name} step {step}: NMSE {nmse(g, w):.3g}"
    if same_tokens:
        assert [int(np.argmax(g[-1])) for g in got[:-1]] == tokens, f"{gpu.name}: greedy tokens differ"
    session = Session(model, gpu, options)          # the 1-token step graph is compiled already
    rows = np.concatenate([session.eval([t], all_logits=True) for t in PROMPT])
    np.testing.assert_array_equal(rows, got[0], err_msg=f"{gpu.name}: decode rows differ from the batch")


def case(name: str, variant: str, default: set):
    return pytest.param(name, variant, marks=() if (name, variant) in default else pytest.mark.slow,
                        id=f"{name}-{variant}")


@pytest.mark.parametrize("name, weight_type", [case(n, w, DEFAULT) for n in ("opencl", "vulkan")
                                               for w in WEIGHT_BOUND])
def test_gpu_matches_the_cpu_backend(tiny_files, backend_cache, cpu, name, weight_type):
    gpu = make_backend(name, backend_cache)
    model = load_model(tiny_files[Gemma4Spec(weight_type)])
    assert_matches_the_cpu(model, gpu, cpu, OPTIONS, WEIGHT_BOUND[weight_type], weight_type == "f32")


@pytest.mark.parametrize("name, cache", [case(n, c, set()) for n in ("opencl", "vulkan") for c in CACHES])
def test_gpu_over_a_quantized_cache_matches_the_cpu_backend(tiny_files, backend_cache, cpu, name, cache):
    gpu = make_backend(name, backend_cache)
    types, spec = CACHES[cache]
    options = SessionOptions(**{**OPTIONS.__dict__, "cache": KVCacheTypes.of(*types)})
    assert_matches_the_cpu(load_model(tiny_files[spec]), gpu, cpu, options, CACHE_BOUND, True)


@pytest.mark.slow
def test_greedy_speculation_over_a_quantized_cache_on_vulkan(tiny_files, backend_cache):
    """Verify steps of several tokens and their rejected tails truncated from the q8_0 / turbo4
    caches (the sliding-window ring's and the global layers') give greedy decoding's tokens."""
    gpu = make_backend("vulkan", backend_cache)
    types, spec = CACHES["q8_0-turbo4"]
    model = load_model(tiny_files[spec])
    session = Session(model, gpu, SessionOptions(n_ctx=32, ubatch=4, kv_bucket=16, cache=KVCacheTypes.of(*types)))
    assert_ngram_speculation_is_greedy(session)
