"""The hybrids on OpenCL (PoCL) and Vulkan (lavapipe) against the CPU backend: lfm2, nemotron_h
and falcon-h1 (the f32 tiny_gguf_hybrid files) and the gated-DeltaNet hybrids qwen3next, qwen35
and qwen35moe (the f32 tiny_gguf_delta files: DeltaNet state, MoE through mul_mat_id/top_k, gated
attention with partial rope and qwen35moe's unturned imrope pairs), and jamba (Mamba-1 layers:
the scan with a decay per channel and state entry). The logits of a prompt and of
greedy decode steps, with the short-convolution, Mamba-2 and DeltaNet states carried on the device
path; and, on the device, the prompt decoded one token at a time equals the prompt in one batch
bit for bit (batch-invariant kernels: speculation's identity rests on it). Each backend skips
with its reason where missing. Bound: NMSE <= 1e-6 per step (f32 weights on every side: only the
order of the f32 sums differs; a wrong state or view gives ~1; measured 5e-13 to 3e-9). Cold,
PoCL compiles every kernel of two step graphs per model for a minute or two: only lfm2 and
qwen35moe on Vulkan run by default."""
from __future__ import annotations

import numpy as np
import pytest

from devices import make_backend
from ember.backends import get_backend
from ember.models import load_model
from ember.runtime.session import Session, SessionOptions
from ember.testing import nmse

from tiny_gguf_delta import DELTA_ARCHS, DeltaSpec
from tiny_gguf_hybrid import HYBRID_ARCHS, HybridSpec
from tiny_gguf_jamba import JambaSpec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")    # pyopencl's build-log notes

PROMPT = [1, 17, 260, 300, 42, 9, 33]
DECODE = 4
BOUND = 1e-6
OPTIONS = SessionOptions(n_ctx=64, kv_bucket=32)


def greedy_rows(session: Session) -> list[np.ndarray]:
    """Every prompt row, then the rows of DECODE greedy steps."""
    rows = [session.eval(PROMPT, all_logits=True)]
    for _ in range(DECODE):
        rows.append(session.eval([int(np.argmax(rows[-1][-1]))]))
    return rows


SPECS = {arch: HybridSpec(arch) for arch in HYBRID_ARCHS} | {arch: DeltaSpec(arch) for arch in DELTA_ARCHS} | \
    {"jamba": JambaSpec()}
DEFAULT = {("vulkan", "lfm2"), ("vulkan", "qwen35moe")}
CASES = [pytest.param(name, arch, marks=() if (name, arch) in DEFAULT else pytest.mark.slow,
                      id=f"{name}-{arch}")
         for name in ("opencl", "vulkan") for arch in SPECS]


@pytest.fixture(scope="module")
def cpu(shared_cpu_cache):
    return get_backend("cpu", threads=2, cache_dir=shared_cpu_cache)


@pytest.mark.parametrize("name, arch", CASES)
def test_gpu_matches_the_cpu_backend(tiny_files, backend_cache, cpu, name, arch):
    gpu = make_backend(name, backend_cache)
    model = load_model(tiny_files[SPECS[arch]])
    want = greedy_rows(Session(model, cpu, OPTIONS))
    got = greedy_rows(Session(model, gpu, OPTIONS))
    for step, (g, w) in enumerate(zip(got, want)):
        assert nmse(g, w) <= BOUND, f"{gpu.name} step {step}: NMSE {nmse(g, w):.3g}"
        np.testing.assert_array_equal(np.argmax(g, axis=-1), np.argmax(w, axis=-1))
    session = Session(model, gpu, OPTIONS)          # the 1-token step graph is compiled already
    rows = np.concatenate([session.eval([t], all_logits=True) for t in PROMPT])
    np.testing.assert_array_equal(rows, got[0], err_msg=f"{gpu.name}: decode rows differ from the batch")
