"""TurboQuant KV-cache formats (turbo3, turbo4) and the Walsh-Hadamard rotations a quantized
cache uses (Zandieh et al., "TurboQuant", arXiv 2504.19874).

One block is one attention head of 128 values. Quantizing keeps the norm n = |x| and rotates
the unit vector u = x / n by R = D2 (H / sqrt(128)) D1 (H the Sylvester Hadamard matrix, D1 and
D2 fixed +-1 sign vectors), which makes every coordinate of y = R u close to N(0, 1/128); each
coordinate becomes the index of its nearest Lloyd-Max centroid for that distribution. The block
stores the corrected norm n / |c| (c: the vector of chosen centroids), so the reconstruction
R^T c * n / |c| has norm n. Byte layouts (little endian):

``turbo4``  128 values / 66 bytes
    ``norm: fp16`` then ``qs: uint8[64]``: byte k holds index 2k in its low nibble and index
    2k + 1 in its high nibble (4-bit indices into CODEBOOK_4).
``turbo3``  128 values / 50 bytes
    ``norm: fp16``, ``ql: uint8[32]``: byte k holds the low 2 bits of indices 4k .. 4k + 3 (index
    4k + i at bits 2i, 2i + 1), then ``qh: uint8[16]``: byte k holds bit 2 of indices 8k .. 8k + 7
    (index 8k + i at bit i); 3-bit indices into CODEBOOK_3.

Every kernel reads the constants below (signs, codebooks, boundaries) from this module, so the
NumPy reference and the generated kernels cannot drift apart. The quantizer is written so a C
kernel can reproduce its bytes exactly: the norms are float64 sums of squares in index order,
the rotation is a float32 butterfly in a fixed order, and ties go to the lower centroid.

Head sizes: a turbo cache holds each attention head as whole 128-value blocks, so the head size
must be a multiple of 128 (Gemma 3 270M: 256). Any other head size (test models use 64) is
refused, not padded: the type of the cache viewed as heads (reshape, attention's type rule, a
quantized tensor type) fails with one line naming the head size and the block size, before
anything is compiled, on the reference and every backend alike. (q8_0 / q4_0 caches likewise
need a multiple of their 32-value block.)

Also here: the orthonormal Hadamard transform llama.cpp applies to Q/K/V when the cache is
quantized (`fwht`, `hadamard_matrix`). Imports NumPy only.
"""
from __future__ import annotations

import math

import numpy as np

BLOCK = 128
SIGMA = 1.0 / math.sqrt(BLOCK)      # the std of one rotated coordinate of a unit vector
BLOCK_BYTES = {3: 50, 4: 66}

# ---- the rotation's sign vectors -----------------------------------------------------------
# Drawn once from default_rng(SIGN_SEED).integers(0, 2, (2, 128)) (bit j of the hex number set:
# sign j is -1) and kept as literals, so a change in NumPy's generators cannot move them; a test
# re-draws and compares.
SIGN_SEED = 42
_SIGN_BITS = (
    "b60daf565b39c444bd07a6b61b95fca6",
    "415a9a9d485aca85c09d7023e953116f",
)


def _signs_from_hex(text: str) -> np.ndarray:
    bits = int(text, 16)
    return np.array([-1.0 if (bits >> j) & 1 else 1.0 for j in range(BLOCK)], np.float32)


def draw_signs(seed: int = SIGN_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The two sign vectors as the seed draws them (what the literals must equal)."""
    bits = np.random.default_rng(seed).integers(0, 2, size=(2, BLOCK))
    return tuple((1.0 - 2.0 * b).astype(np.float32) for b in bits)


def sign_hex(signs: np.ndarray) -> str:
    return format(sum(1 << j for j, s in enumerate(signs) if s < 0), "032x")


SIGNS_D1 = _signs_from_hex(_SIGN_BITS[0])
SIGNS_D2 = _signs_from_hex(_SIGN_BITS[1])
INV_SQRT_BLOCK = np.float32(SIGMA)   # the float32 factor every kernel scales the butterfly by


# ---- Lloyd-Max codebooks for N(0, 1/128) ---------------------------------------------------
def lloyd_max(bits: int, sigma: float = SIGMA, tol: float = 1e-15, max_iter: int = 100000) -> np.ndarray:
    """The 2**bits Lloyd-Max centroids (ascending, float64) of N(0, sigma^2): alternate the
    boundaries (midpoints of neighbours) and the centroids (conditional means of the cells)
    until no centroid moves by more than tol (in units of sigma)."""
    k = 1 << bits
    c = [(-2.0 + 4.0 * (i + 0.5) / k) for i in range(k)]   # unit normal, evenly spread
    for _ in range(max_iter):
        edges = [-math.inf] + [(a + b) / 2 for a, b in zip(c, c[1:])] + [math.inf]
        new = [_cell_mean(lo, hi) for lo, hi in zip(edges, edges[1:])]
        moved = max(abs(a - b) for a, b in zip(new, c))
        c = new
        if moved < tol:
            break
    return np.array(c) * sigma


def _cell_mean(lo: float, hi: float) -> float:
    """E[X | lo < X < hi] for a unit normal X."""
    pdf = [math.exp(-t * t / 2) / math.sqrt(2 * math.pi) if math.isfinite(t) else 0.0 for t in (lo, hi)]
    mass = 0.5 * (math.erf(hi / math.sqrt(2)) - math.erf(lo / math.sqrt(2)))
    return (pdf[0] - pdf[1]) / mass


# lloyd_max(3) and lloyd_max(4), as derived (tests/ir/test_turbo.py re-derives every entry).
CODEBOOK_3 = np.array([
    -0.1902069250529204, -0.11878592051630034, -0.06682205761918958, -0.021663469495100916,
    0.021663469495100916, 0.06682205761918958, 0.11878592051630034, 0.1902069250529204,
], np.float64)
CODEBOOK_4 = np.array([
    -0.2415290769812894, -0.18287701390901562, -0.1430164464788071, -0.11103619979778538,
    -0.08329191587104463, -0.058049853290050545, -0.034298947999686524, -0.011348624534799423,
    0.011348624534799423, 0.034298947999686524, 0.058049853290050545, 0.08329191587104463,
    0.11103619979778538, 0.1430164464788071, 0.18287701390901562, 0.2415290769812894,
], np.float64)
CODEBOOKS = {3: CODEBOOK_3.astype(np.float32), 4: CODEBOOK_4.astype(np.float32)}
# Cell boundaries in float32: index = the number of boundaries strictly below the value.
BOUNDARIES = {bits: ((cb[1:] + cb[:-1]) / 2).astype(np.float32)
              for bits, cb in ((3, CODEBOOK_3), (4, CODEBOOK_4))}


# ---- Walsh-Hadamard transforms -------------------------------------------------------------
def butterfly(x: np.ndarray) -> np.ndarray:
    """The unnormalised Walsh-Hadamard transform H x over the last axis (a power of two), in
    x's dtype, by the butterfly every kernel uses: for h = 1, 2, 4, ..., pairs (j, j + h) inside
    each 2h-run become (a + b, a - b)."""
    n = x.shape[-1]
    if n & (n - 1) or n == 0:
        raise ValueError(f"Walsh-Hadamard transform: size {n} is not a power of two")
    lead = x.shape[:-1]
    y = np.array(x, copy=True)
    h = 1
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = np.stack((a + b, a - b), axis=-2)
        h *= 2
    return y.reshape(*lead, n)


def fwht(x: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform (H / sqrt(n)) x over the last axis, in float64.
    It is symmetric and its own inverse."""
    x = np.asarray(x, np.float64)
    return butterfly(x) / math.sqrt(x.shape[-1])


def hadamard_matrix(n: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix H / sqrt(n), float64 [n, n] (symmetric)."""
    return fwht(np.eye(n))


def rotate(u: np.ndarray) -> np.ndarray:
    """R u = D2 (H / sqrt(128)) D1 u over blocks of 128 (float32, the kernels' order)."""
    return butterfly(u.astype(np.float32) * SIGNS_D1) * INV_SQRT_BLOCK * SIGNS_D2


def unrotate(y: np.ndarray) -> np.ndarray:
    """R^T y = D1 (H / sqrt(128)) D2 y (float32)."""
    return butterfly(y.astype(np.float32) * SIGNS_D2) * INV_SQRT_BLOCK * SIGNS_D1


# ---- quantize / dequantize (vectorised over blocks) ----------------------------------------
def _sum_squares(x: np.ndarray) -> np.ndarray:
    """Per row, the float64 sum of squares in index order (the order the kernels add in)."""
    acc = np.zeros(x.shape[0], np.float64)
    for j in range(x.shape[1]):
        col = x[:, j].astype(np.float64)
        acc += col * col
    return acc


def quantize_blocks(x: np.ndarray, bits: int) -> np.ndarray:
    """float32 [n, 128] -> uint8 [n, BLOCK_BYTES[bits]] (turbo3 for bits 3, turbo4 for 4)."""
    x = np.asarray(x, np.float32)
    norm = np.sqrt(_sum_squares(x)).astype(np.float32)[:, None]
    u = np.zeros_like(x)
    np.divide(x, norm, out=u, where=norm > 0)
    idx = np.searchsorted(BOUNDARIES[bits], rotate(u), side="left").astype(np.uint8)
    c = CODEBOOKS[bits][idx]
    corrected = (norm[:, 0].astype(np.float64) / np.sqrt(_sum_squares(c))).astype(np.float32)
    out = np.empty((x.shape[0], BLOCK_BYTES[bits]), np.uint8)
    out[:, :2] = corrected.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = _pack(idx, bits)
    return out


def dequantize_blocks(raw: np.ndarray, bits: int, rotated: bool = False) -> np.ndarray:
    """uint8 [n, BLOCK_BYTES[bits]] -> float32 [n, 128]; rotated: stay in the rotated domain
    (centroids times the stored norm, what a kernel dots a rotated query with)."""
    norm = np.ascontiguousarray(raw[:, :2]).view("<f2").astype(np.float32)
    y = CODEBOOKS[bits][_unpack(raw[:, 2:], bits)] * norm
    return y if rotated else unrotate(y)


def _pack(idx: np.ndarray, bits: int) -> np.ndarray:
    if bits == 4:
        return idx[:, 0::2] | (idx[:, 1::2] << 4)
    low = (idx & 3).reshape(-1, 32, 4) << np.array([0, 2, 4, 6], np.uint8)
    high = ((idx >> 2) & 1).reshape(-1, 16, 8) << np.arange(8, dtype=np.uint8)
    return np.concatenate((low.sum(axis=2, dtype=np.uint8), high.sum(axis=2, dtype=np.uint8)), axis=1)


def _unpack(qs: np.ndarray, bits: int) -> np.ndarray:
    if bits == 4:
        return np.stack((qs & 15, qs >> 4), axis=2).reshape(-1, BLOCK)
    low = (qs[:, :32, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
    high = (qs[:, 32:, None] >> np.arange(8, dtype=np.uint8)) & 1
    return low.reshape(-1, BLOCK) | (high.reshape(-1, BLOCK) << 2)


def quantize_turbo3(x: np.ndarray) -> np.ndarray:
    return quantize_blocks(x, 3)


def quantize_turbo4(x: np.ndarray) -> np.ndarray:
    return quantize_blocks(x, 4)


def dequantize_turbo3(raw: np.ndarray) -> np.ndarray:
    return dequantize_blocks(raw, 3)


def dequantize_turbo4(raw: np.ndarray) -> np.ndarray:
    return dequantize_blocks(raw, 4)
