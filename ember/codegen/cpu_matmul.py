"""C source of the CPU backend's matrix-multiply kernels, one set of functions per weight type.

For each wtype in MATMUL_WTYPES the rendered source defines

    void ember_mm_<wtype>(int ith, int nth, int64_t T, int64_t N, int64_t K,
                          const float *x, int64_t x_row, const void *w, int64_t w_row,
                          float *y, int64_t y_row, void *scratch, int *next,
                          ember_barrier *bar);
    void ember_dequant_row_<wtype>(const void *row, float *out, int64_t K);
    int64_t ember_mm_<wtype>_scratch(int64_t T, int64_t K);
    static void ember_mm_<wtype>_rows(int64_t T, int64_t n0, int64_t n1, int64_t K,
                                      const <a> *a, int64_t a_row, const void *w, int64_t w_row,
                                      float *y, int64_t y_row);

ember_mm_<wtype>_rows is what ember_mm_<wtype> does with one chunk, weight rows [n0, n1), on T
activation rows already in the kernel's form (matmul_activation): f32 rows for a float wtype,
for a quantized one the rows ember_mm_quantize_<act>_local makes (uint8_t); it takes no
scratch and no barrier, so a caller with its own work list (mul_mat_id: one list over all
experts) calls it directly, with the same bits as ember_mm_<wtype>.

y[t, n] = sum_k x[t, k] * w[n, k]; strides are in bytes. ember_mm_* is called by all nth threads
of an OpenMP team; the quantized ones quantize x into the scratch and wait once at the team's
barrier *bar (not when T = 1 and the row's 8-bit form fits 32 KiB), the float ones never. The caller barriers
before y is read or the scratch is reused. Threads share w's rows in chunks (a multiple of 16
rows) through the work block next (EMBER_WORK_INTS ints the caller zeroed; common.h): each
streams through its own region of chunks, then helps with the others', so a thread the OS
holds back delays the others by one chunk at most; with next NULL thread ith takes every nth
chunk. Stack: up to 64 KiB per thread (packed f32 panels) or
32 KiB (one quantized activation row).

Numerics: the bits of y[t, n] depend only on row t of x and row n of w, never on T, on the other
rows, on the tiling or on nth (GEMV and GEMM paths agree bit for bit). The path is chosen by the
compiler's macros: AVX2+FMA+F16C, NEON on aarch64 (SDOT with +dotprod; with +i8mm, SMMLA tiles
of two activation rows by two weight rows for T > 1), else portable C; AVX2 and portable differ
in the last bits, NEON keeps the portable arithmetic and so its bits.

The sources expect common.h to be included first; each carries the shared helpers behind an
include guard, so any number of them may be concatenated into one file (matmul_common_source()
is that guarded block alone, for a caller that wants it placed explicitly).
matmul_scratch_bytes is authoritative; ember_mm_<wtype>_scratch returns the same number.

Imports jinja2, the dtype table and the template bytecode cache (ember.codegen.renderer); compiling
and running is the backend's business.
"""
from __future__ import annotations

import functools

import jinja2

from ember.codegen.renderer import template_bytecode_cache
from ember.ir.dtypes import dtype

MATMUL_WTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q6_k",
                 "q4_1", "q5_1", "q2_k", "q3_k", "q5_k", "iq4_nl", "iq4_xs", "mxfp4", "nvfp4")

_FLOAT_PARAMS = {
    "f32": {"ctype": "float", "to_f32": "v", "load8": "_mm256_loadu_ps(p)"},
    "f16": {"ctype": "ember_f16", "to_f32": "ember_f16_to_f32(v)",
            "load8": "_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p))"},
    "bf16": {"ctype": "ember_bf16", "to_f32": "ember_bf16_to_f32(v)",
             "load8": "_mm256_castsi256_ps(_mm256_slli_epi32("
                      "_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16))"},
}
# Activation layout used by each quantized weight type: q32 = blocks of 32 with an f32 scale
# (llama.cpp's q8_0 idea), q256 = blocks of 256 with an f32 scale and 16-value sums (q8_K).
_ACTIVATIONS = {"q8_0": "q32", "q4_0": "q32", "q5_0": "q32", "q4_k": "q256", "q6_k": "q256",
                "q4_1": "q32", "q5_1": "q32", "iq4_nl": "q32", "mxfp4": "q32", "nvfp4": "q32",
                "q2_k": "q256", "q3_k": "q256", "q5_k": "q256", "iq4_xs": "q256"}
# The formats read through a block decoder into int8 codes (matmul/codes32.c.j2 for 32-value
# blocks, matmul/codes256.c.j2 for 256-value super-blocks): whether a value has an additive
# min term, whether a 32-value block carries two scales (nvfp4's 16-value sub-blocks), whether
# the 32-value codes are signed (maddubs then needs the sign moved onto x), and the offset a
# 256-value format's AVX2 decoder adds to its codes to make them unsigned (q3_k: -4..3 -> 0..7,
# taken back through the activations' 16-value sums; 0: codes used as they are).
_DECODED = {"q4_1": {"has_min": True, "two_scales": False, "signed_codes": False},
            "q5_1": {"has_min": True, "two_scales": False, "signed_codes": False},
            "iq4_nl": {"has_min": False, "two_scales": False, "signed_codes": True},
            "mxfp4": {"has_min": False, "two_scales": False, "signed_codes": True},
            "nvfp4": {"has_min": False, "two_scales": True, "signed_codes": True},
            "q2_k": {"has_min": True, "code_offset": 0}, "q3_k": {"has_min": False, "code_offset": 4},
            "q5_k": {"has_min": True, "code_offset": 0}, "iq4_xs": {"has_min": False, "code_offset": 0}}
# Tile shapes of the AVX2 path (performance only: results do not depend on them): gemv_c weight
# rows per T=1 tile (with gemv_loop, through the GEMV loop ember_mm_<wtype>_gemv of q8_0, q4_0,
# q5_0, which prefetches gemv_pf "group": the rows gemv_pf_groups groups ahead, or "row": each
# row's own stream), gemm_r x gemm_c tiles for T > 1 over blocks of gemm_tb activation rows; with
# gemm_decode (q4_0, q5_0) the weight rows of a chunk are first decoded to their 8-bit codes.
# Chosen by measurement on AVX2 (Zen 4): a decode step streams every weight from DRAM, where
# q8_0 reads fastest one row at a time and q5_0 (bound by its bit unpacking) gains from 4 rows
# at once; tall GEMM tiles share the weights' decoding among 8 activation rows; decoded codes
# need no sharing, and 4 x 2 keeps the accumulators in registers. The 32-value formats read
# through a decoder (matmul/codes32.c.j2) run 2 weight rows per GEMV tile: a row's f32 chain
# (one or two dependent fmas per 32 values) is latency-bound alone, two chains overlap (four
# run out of registers); the fused 256-value ones (matmul/codes256.c.j2) have enough integer
# work per super-block to hide their chain, and one row at a time keeps every operand in
# registers (measured on Zen 3: two or four rows were slower). Their AVX2 GEMV, and q4_k's and
# q6_k's (matmul/gemv_rows.c.j2), takes the rows one at a time and reduces 8 rows' lanes
# together, so gemv_c only shapes the tile it falls back to.
_TILES = {
    "q8_0": {"gemv_c": 1, "gemv_loop": False, "gemv_pf": "row", "gemv_pf_groups": 0, "gemm_r": 8, "gemm_c": 2, "gemm_tb": 32, "gemm_decode": False},
    "q4_0": {"gemv_c": 4, "gemv_loop": True, "gemv_pf": "group", "gemv_pf_groups": 2, "gemm_r": 4, "gemm_c": 2, "gemm_tb": 32, "gemm_decode": True},
    "q5_0": {"gemv_c": 4, "gemv_loop": True, "gemv_pf": "group", "gemv_pf_groups": 2, "gemm_r": 4, "gemm_c": 2, "gemm_tb": 32, "gemm_decode": True},
    "q4_k": {"gemv_c": 1, "gemv_loop": False, "gemv_pf": "row", "gemv_pf_groups": 0, "gemm_r": 8, "gemm_c": 1, "gemm_tb": 32, "gemm_decode": False},
    "q6_k": {"gemv_c": 1, "gemv_loop": False, "gemv_pf": "row", "gemv_pf_groups": 0, "gemm_r": 8, "gemm_c": 1, "gemm_tb": 32, "gemm_decode": False},
    **{w: {"gemv_c": 2 if _ACTIVATIONS[w] == "q32" else 1, "gemv_loop": False, "gemv_pf": "row",
           "gemv_pf_groups": 0, "gemm_r": 4,
           "gemm_c": 2 if _ACTIVATIONS[w] == "q32" else 1, "gemm_tb": 32, "gemm_decode": False}
       for w in _DECODED},
}


@functools.lru_cache(maxsize=None)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("ember.codegen", "templates/cpu"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        bytecode_cache=template_bytecode_cache(),
    )


def _check(wtype: str) -> str:
    if wtype not in MATMUL_WTYPES:
        raise ValueError(f"no CPU matmul kernel for weight type {wtype!r}; "
                         f"known: {', '.join(MATMUL_WTYPES)}")
    return wtype


@functools.lru_cache(maxsize=None)
def matmul_common_source() -> str:
    """The helpers every matmul source shares, behind an include guard (optional to call)."""
    return _environment().get_template("matmul/common.c.j2").render()


@functools.lru_cache(maxsize=None)
def matmul_source(wtype: str) -> str:
    """C source defining ember_mm_<wtype>, ember_dequant_row_<wtype>, ember_mm_<wtype>_scratch."""
    _check(wtype)
    env = _environment()
    if wtype in _FLOAT_PARAMS:
        body = env.get_template("matmul/float.c.j2").render(wtype=wtype, **_FLOAT_PARAMS[wtype])
    else:
        dt = dtype(wtype)
        tiles = _TILES[wtype]
        body = env.get_template("matmul/quant.c.j2").render(
            wtype=wtype, block=dt.block_size, block_bytes=dt.block_bytes, act=_ACTIVATIONS[wtype],
            max_r=max(tiles["gemm_r"], 1), max_c=max(tiles["gemm_c"], tiles["gemv_c"]), **tiles,
            **_DECODED.get(wtype, {}))
    return matmul_common_source() + "\n" + body


def matmul_activation(wtype: str) -> str | None:
    """The form ember_mm_<wtype>_rows takes its activation rows in: None (f32 rows), "q32" or
    "q256" (rows quantized by ember_mm_quantize_<act>_local, matmul_scratch_bytes(wtype, 1, K)
    bytes each)."""
    _check(wtype)
    return None if wtype in _FLOAT_PARAMS else _ACTIVATIONS[wtype]


def _align64(n: int) -> int:
    return (n + 63) // 64 * 64


def matmul_scratch_bytes(wtype: str, T: int, K: int) -> int:
    """Bytes of scratch ember_mm_<wtype> needs for T activation rows of K values."""
    _check(wtype)
    if wtype in _FLOAT_PARAMS:
        return 0
    if _ACTIVATIONS[wtype] == "q32":
        return T * _align64(K + 4 * (K // 32))
    return T * _align64(K + 4 * (K // 256) + 2 * (K // 16))


# One activation row up to this many quantized bytes is quantized by each thread on its own
# stack (EMBER_MM_LOCAL_ROW in matmul/common.c.j2): a T = 1 call then touches no scratch.
LOCAL_ROW_BYTES = 32768


def matmul_uses_scratch(wtype: str, T: int, K: int) -> bool:
    """Whether ember_mm_<wtype> writes its scratch for T rows of K values (a caller need not
    order two calls around a scratch they do not use)."""
    size = matmul_scratch_bytes(wtype, T, K)
    return size > 0 and not (T == 1 and size <= LOCAL_ROW_BYTES)


def standalone_source(wtypes=MATMUL_WTYPES) -> str:
    """A whole C file with the kernels of wtypes and, for each, an entry point that opens its own
    OpenMP team, for tests and benchmarks (the graph codegen calls the kernels from its own
    parallel region instead):

        void ember_mm_<wtype>_run(int nth, <the arguments of ember_mm_<wtype> after nth, but
                                  next and bar>);
    (chunks shared through a counter).
    """
    common_h, _, _ = _environment().loader.get_source(_environment(), "common.h")
    parts = [common_h]
    for wtype in wtypes:
        parts.append(matmul_source(wtype))
        parts.append(_RUN_TEMPLATE.replace("WTYPE", _check(wtype)))
    return "\n".join(parts)


_RUN_TEMPLATE = """
void ember_mm_WTYPE_run(int nth, int64_t T, int64_t N, int64_t K, const float *x, int64_t x_row,
                        const void *w, int64_t w_row, float *y, int64_t y_row, void *scratch) {
    int next[EMBER_WORK_INTS] = {0};
    ember_barrier bar = {0};
#pragma omp parallel num_threads(nth)
    ember_mm_WTYPE(omp_get_thread_num(), omp_get_num_threads(), T, N, K, x, x_row, w, w_row,
                   y, y_row, scratch, next, &bar);
}
"""
