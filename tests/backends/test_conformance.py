"""Conformance: every op of the op table on every backend, against the NumPy reference.

Each case builds a few nodes of one op (random shapes including 1, 3, 17 and 4096 wide,
non-contiguous operands through permute/transpose/view with a byte offset and row stride) and is
compared with run_reference by the NMSE bound of its op (NMSE_BOUND below). Cases of one group are
compiled together as one graph, so a group costs one compile per backend. A case whose op the
backend does not support is skipped with the backend's reason; on the CPU backend nothing may be
unsupported (test_cpu_supports_every_case). A representative subset also runs on the CPU backend
built for the portable ISA ("scalar").
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

from ember.backends.cpu.backend import CpuBackend
from ember.ir import GraphBuilder, dtypes
from ember.ir.interpreter import run_reference
from ember.ir.node import Node
from ember.ir.ops import OPS
from ember.testing import nmse

# ---- per-op NMSE bounds ------------------------------------------------------------------------
EXACT = 1e-10          # data movement and conversions: the same values up to rounding noise
F32_MATH = 1e-7        # f32 arithmetic and libm against the float64 reference
QUANT_MATMUL = 1e-3    # quantized weights with activations quantized to 8 bits

NMSE_BOUND = {op: EXACT for op in ("view", "reshape", "permute", "transpose", "cont", "cast",
                                   "concat", "get_rows", "set_rows", "argmax", "top_k",
                                   "take_along")}
NMSE_BOUND.update({op: F32_MATH for op in OPS if op not in NMSE_BOUND})
MUL_MAT_BOUND = {"f32": F32_MATH, "f16": F32_MATH, "bf16": F32_MATH, "q8_0": QUANT_MATMUL,
                 "q4_0": QUANT_MATMUL, "q5_0": QUANT_MATMUL, "q4_k": QUANT_MATMUL,
                 "q6_k": QUANT_MATMUL}
# ggml's other weight formats (ember.ir.quant_formats): fewer cases each, the same bound
MORE_WTYPES = ("q4_1", "q5_1", "q2_k", "q3_k", "q5_k", "iq4_nl", "iq4_xs", "mxfp4", "nvfp4")
MUL_MAT_BOUND.update({w: QUANT_MATMUL for w in MORE_WTYPES})


def _row_len(wtype):
    """A short row length that is a whole number of the format's blocks."""
    return 256 if dtypes.dtype(wtype).block_size == 256 else 64


# ---- cases -------------------------------------------------------------------------------------
def normal(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def positive(rng, shape):
    return (np.abs(rng.standard_normal(shape)) + 0.5).astype(np.float32)


def unturned_pairs(rng, shape):
    """Rope frequency factors with every other pair at +inf: angle 0, the pair passes through
    unturned (qwen35moe's imrope e-section for text tokens)."""
    values = positive(rng, shape)
    values[1::2] = np.inf
    return values


def indices(high, values=None):
    def fill(rng, shape):
        if values is not None:
            return np.asarray(values, dtype=np.int32).reshape(shape)
        return rng.integers(0, high, size=shape).astype(np.int32)
    return fill


class Scope:
    """A case's view of its group's builder: names get the case's prefix, data its seed."""

    def __init__(self, builder: GraphBuilder, prefix: str, fills: dict):
        self.b = builder
        self.prefix = prefix
        self.fills = fills
        self.rng = np.random.default_rng(zlib.crc32(prefix.encode()))

    def input(self, name: str, dt, shape, fill=normal) -> Node:
        node = self.b.input(f"{self.prefix}.{name}", dt, shape)
        self.fills[node.name] = (fill, dtypes.dtype(dt))
        return node

    def weight(self, name: str, shape, dt="f32", fill=normal) -> Node:
        return self.b.weight(f"{self.prefix}.{name}", fill(self.rng, shape), dt)

    def __getattr__(self, op: str):
        return getattr(self.b, op)


@dataclass(frozen=True)
class Case:
    id: str
    op: str
    build: Callable[[Scope], list[Node]]
    bound: float | None = None
    scalar: bool = False      # also run on the portable-ISA CPU build
    slow: bool = False        # compiles for tens of seconds: run with the slow tests only

    @property
    def group(self) -> str:
        return self.id.split("/")[0]

    @property
    def nmse_bound(self) -> float:
        return self.bound if self.bound is not None else NMSE_BOUND[self.op]


def strided_view(s: Scope, name: str, shape: tuple, dt="f32", fill=normal) -> Node:
    """shape read out of a wider input at a byte offset, with a row stride of its own."""
    esize = dtypes.dtype(dt).block_bytes
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    base = s.input(name, dt, (rows + 1, cols + 5), fill)
    row = (cols + 5) * esize
    strides = tuple(int(np.prod(shape[i + 1:-1])) * row for i in range(len(shape) - 1)) + (esize,)
    return s.view(base, shape=shape, strides=strides, offset=3 * esize)


def transposed(s: Scope, name: str, shape: tuple, dt="f32", fill=normal) -> Node:
    """shape as the transpose of a contiguous input (last axis strided)."""
    base = s.input(name, dt, shape[:-2] + (shape[-1], shape[-2]), fill)
    return s.transpose(base)


CASES: list[Case] = []


def case(id: str, op: str, bound=None, scalar=False, slow=False):
    def register(build):
        CASES.append(Case(id, op, build, bound, scalar, slow))
        return build
    return register


# elementwise, unary
UNARY_ATTRS = {"scale": dict(scale=0.37, bias=-1.5), "clamp": dict(min=-0.5, max=0.75)}
UNARY_OPS = ("neg", "exp", "tanh", "sqrt", "rsqrt", "silu", "gelu", "relu", "sigmoid", "softplus",
             "scale", "clamp")
for _op in UNARY_OPS:
    _fill = positive if _op in ("sqrt", "rsqrt") else normal
    _attrs = UNARY_ATTRS.get(_op, {})
    for _shape in ((1,), (3, 17), (2, 3, 4, 5)):
        case(f"unary/{_op}-{'x'.join(map(str, _shape))}", _op, scalar=_shape == (3, 17))(
            lambda s, op=_op, shape=_shape, fill=_fill, attrs=_attrs:
            [s.op(op, s.input("x", "f32", shape, fill), **attrs)])
    case(f"unary/{_op}-transposed", _op)(
        lambda s, op=_op, fill=_fill, attrs=_attrs: [s.op(op, transposed(s, "x", (3, 17), fill=fill), **attrs)])
    case(f"unary/{_op}-view", _op, scalar=True)(
        lambda s, op=_op, fill=_fill, attrs=_attrs: [s.op(op, strided_view(s, "x", (3, 17), fill=fill), **attrs)])
for _op in ("silu", "exp", "gelu"):
    case(f"unary/{_op}-4096", _op)(lambda s, op=_op: [s.op(op, s.input("x", "f32", (4096,)))])

# elementwise, binary (b broadcasts to a) and gated
BINARY_SHAPES = {"3x17+17": ((3, 17), (17,)), "2x3x4x5+3x1x5": ((2, 3, 4, 5), (3, 1, 5)),
                 "4096+1": ((4096,), (1,)), "1+1": ((1,), (1,)), "17x3+17x1": ((17, 3), (17, 1))}
for _op in ("add", "sub", "mul", "div"):
    _bfill = positive if _op == "div" else normal
    for _name, (_a, _b) in BINARY_SHAPES.items():
        case(f"binary/{_op}-{_name}", _op, scalar=_name == "2x3x4x5+3x1x5")(
            lambda s, op=_op, a=_a, b=_b, bf=_bfill: [s.op(op, s.input("a", "f32", a), s.input("b", "f32", b, bf))])
    case(f"binary/{_op}-views", _op, scalar=True)(
        lambda s, op=_op, bf=_bfill: [s.op(op, s.permute(s.input("a", "f32", (17, 3, 2)), 2, 1, 0),
                                           strided_view(s, "b", (3, 17), fill=bf))])
for _op in ("swiglu", "geglu"):
    for _shape in ((3, 17), (1, 4096)):
        case(f"binary/{_op}-{'x'.join(map(str, _shape))}", _op, scalar=_shape == (3, 17))(
            lambda s, op=_op, shape=_shape: [s.op(op, s.input("g", "f32", shape), s.input("u", "f32", shape))])
    case(f"binary/{_op}-views", _op)(
        lambda s, op=_op: [s.op(op, transposed(s, "g", (3, 17)), strided_view(s, "u", (3, 17)))])

# row reductions
for _op, _attrs in (("rms_norm", dict(eps=1e-5)), ("layer_norm", dict(eps=1e-5)), ("l2_norm", dict(eps=1e-6)),
                    ("sum_rows", {}), ("argmax", {})):
    for _shape in ((1,), (3, 17), (3, 4096), (2, 3, 4, 5)):
        case(f"rows/{_op}-{'x'.join(map(str, _shape))}", _op, scalar=_shape == (3, 17))(
            lambda s, op=_op, shape=_shape, attrs=_attrs: [s.op(op, s.input("x", "f32", shape), **attrs)])
    case(f"rows/{_op}-transposed", _op)(
        lambda s, op=_op, attrs=_attrs: [s.op(op, transposed(s, "x", (3, 17)), **attrs)])
    case(f"rows/{_op}-view", _op, scalar=True)(
        lambda s, op=_op, attrs=_attrs: [s.op(op, strided_view(s, "x", (2, 3, 17)), **attrs)])
    case(f"rows/{_op}-permuted", _op)(
        lambda s, op=_op, attrs=_attrs: [s.op(op, s.permute(s.input("x", "f32", (4, 3, 2, 5)), 2, 0, 1, 3), **attrs)])

for _shape in ((1,), (3, 17), (3, 4096), (2, 3, 4, 5)):
    case(f"rows/rms_norm_mul-{'x'.join(map(str, _shape))}", "rms_norm_mul", scalar=_shape == (3, 17))(
        lambda s, shape=_shape: [s.op("rms_norm_mul", s.input("x", "f32", shape),
                                      s.input("w", "f32", shape[-1:]), eps=1e-6)])
case("rows/rms_norm_mul-view", "rms_norm_mul", scalar=True)(
    lambda s: [s.op("rms_norm_mul", strided_view(s, "x", (2, 3, 17)), s.permute(s.input("w", "f32", (17,)), 0),
                    eps=1e-6)])



def _tiny_first_row(rng, shape):
    x = normal(rng, shape)
    x[0] *= 1e-8                                # norm below eps: divided by eps instead
    return x


case("rows/l2_norm-eps-floor", "l2_norm", scalar=True)(
    lambda s: [s.l2_norm(s.input("x", "f32", (3, 17), _tiny_first_row), eps=1e-6)])


# softmax
def _masked_rows(rng, shape):
    m = rng.standard_normal(shape).astype(np.float32)
    m[..., 1, :] = -np.inf          # one row masked out entirely: zeros, not NaN
    m[..., 2, ::3] = -np.inf
    return m


case("softmax/plain-3x17", "softmax", scalar=True)(lambda s: [s.softmax(s.input("x", "f32", (3, 17)))])
case("softmax/plain-1", "softmax")(lambda s: [s.softmax(s.input("x", "f32", (1,)))])
case("softmax/wide-2x4096", "softmax")(lambda s: [s.softmax(s.input("x", "f32", (2, 4096)), scale=0.5)])
case("softmax/scale-softcap", "softmax", scalar=True)(
    lambda s: [s.softmax(s.input("x", "f32", (3, 17)), scale=4.0, softcap=2.5)])
case("softmax/mask-broadcast", "softmax")(
    lambda s: [s.softmax(s.input("x", "f32", (2, 3, 17)), s.input("m", "f32", (3, 17)), scale=0.125)])
case("softmax/mask-f16-row", "softmax")(
    lambda s: [s.softmax(s.input("x", "f32", (4, 17)), s.input("m", "f16", (1, 17)))])
case("softmax/mask-masked-rows", "softmax", scalar=True)(
    lambda s: [s.softmax(s.input("x", "f32", (2, 3, 17)), s.input("m", "f32", (3, 17), _masked_rows),
                         softcap=1.5)])
case("softmax/transposed-mask-view", "softmax")(
    lambda s: [s.softmax(transposed(s, "x", (3, 17)), strided_view(s, "m", (3, 17)))])


# rope
def _rope_case(T, H, D, mode, n_dims=0, ff=False, view=False, freq_scale=1.0, scalar=False,
               unturned=False):
    ff_fill = unturned_pairs if unturned else positive

    def build(s):
        if view:   # q out of a fused QKV row: byte offset H*D*4, row stride 3*H*D*4
            fused = s.input("qkv", "f32", (T, 3 * H * D))
            x = s.view(fused, shape=(T, H, D), strides=(3 * H * D * 4, D * 4, 4), offset=H * D * 4)
        else:
            x = s.input("x", "f32", (T, H, D))
        pos = s.input("pos", "i32", (T,), indices(5000))
        factors = s.input("ff", "f32", ((n_dims or D) // 2,), ff_fill) if ff else None
        return [s.rope(x, pos, factors, mode=mode, n_dims=n_dims, freq_base=10000.0,
                       freq_scale=freq_scale)]
    name = f"rope/{mode}-{T}x{H}x{D}" + (f"-n{n_dims}" if n_dims else "") + ("-ff" if ff else "") + \
        ("-view" if view else "") + (f"-fs{freq_scale}" if freq_scale != 1.0 else "") + \
        ("-unturned" if unturned else "")
    case(name, "rope", scalar=scalar)(build)


for _mode in ("normal", "neox"):
    _rope_case(3, 2, 16, _mode, scalar=True)
    _rope_case(1, 4, 64, _mode, n_dims=32)
    _rope_case(17, 4, 64, _mode, ff=True, view=True, scalar=_mode == "neox")
    _rope_case(5, 1, 128, _mode, n_dims=64, ff=True, freq_scale=0.25)
    _rope_case(4, 3, 24, _mode, n_dims=12, ff=True, unturned=True)


# attention
def _attention_case(name, Tq, Tk, Hq, Hkv, D, Dv, scale=0.25, causal=False, window=0, softcap=0.0,
                    mask=None, kv="f32", q_view=False, v_permuted=False, scalar=False):
    def build(s):
        if q_view:
            fused = s.input("qkv", "f32", (Tq, 3 * Hq * D))
            q = s.view(fused, shape=(Tq, Hq, D), strides=(3 * Hq * D * 4, D * 4, 4), offset=Hq * D * 4)
        else:
            q = s.input("q", "f32", (Tq, Hq, D))
        k = s.input("k", kv, (Tk, Hkv, D))
        v = s.permute(s.input("v", kv, (Hkv, Tk, Dv)), 1, 0, 2) if v_permuted else s.input("v", kv, (Tk, Hkv, Dv))
        m = s.input("mask", mask, (Tq, Tk), _attention_mask) if mask else None
        return [s.attention(q, k, v, m, scale=scale, causal=causal, window=window, softcap=softcap)]
    case(f"attention/{name}", "attention", scalar=scalar)(build)


def _attention_mask(rng, shape):
    m = rng.standard_normal(shape).astype(np.float32)
    m[rng.random(shape) < 0.2] = -np.inf
    return m


_attention_case("gqa-causal", 3, 17, 4, 2, 16, 16, causal=True, scalar=True)
_attention_case("gqa-causal-window", 5, 17, 4, 2, 16, 16, causal=True, window=4)
_attention_case("mask-f32", 3, 17, 2, 2, 16, 8, mask="f32")
_attention_case("mask-f16-softcap", 3, 17, 4, 1, 32, 32, mask="f16", softcap=1.5, scale=0.5, scalar=True)
_attention_case("kv-f16", 4, 9, 4, 2, 16, 16, causal=True, kv="f16")
_attention_case("decode-mqa", 1, 17, 8, 1, 64, 32, causal=True, window=8)
_attention_case("q-view-v-permuted", 3, 17, 4, 2, 16, 16, causal=True, q_view=True, v_permuted=True)
_attention_case("more-queries-than-keys", 5, 3, 2, 1, 16, 16, causal=True)
_attention_case("head-256", 2, 33, 2, 1, 256, 256, scale=0.0625, causal=True, kv="f16")


# attention over a quantized KV cache: the cache as the step graph makes it ([rows, heads * D],
# written by set_rows, viewed as [rows, heads, D]); decode and prompt, GQA.
KV_QUANTIZED = [d.name for d in dtypes.KV_QUANTIZED]


def _kv_cache_case(name, kv, Tq, rows, Hq, Hkv, D, slots, window=0, k_type=None, slow=False):
    def build(s):
        k_dt, v_dt = k_type or kv, kv
        q = s.input("q", "f32", (Tq, Hq, D))
        written = s.input("slots", "i32", (len(slots),), indices(rows, slots))
        caches = []
        for which, dt in (("k", k_dt), ("v", v_dt)):
            cache = s.input(f"{which}_cache", dt, (rows, Hkv * D))
            new = s.input(f"{which}_rows", "f32", (len(slots), Hkv * D))
            caches.append(s.set_rows(cache, written, new))
        keys, values = (s.reshape(c, rows, Hkv, D) for c in caches)
        return caches + [s.attention(q, keys, values, scale=D ** -0.5, causal=True, window=window)]
    case(f"attention_kv/{kv}-{name}" + (f"-k-{k_type}" if k_type else ""), "attention", scalar=name == "decode",
         slow=slow)(build)


for _kv in KV_QUANTIZED:
    _D = 128 if _kv.startswith("turbo") else 64
    _kv_cache_case("decode", _kv, 1, 19, 4, 2, _D, [18])
    _kv_cache_case("prompt-gqa", _kv, 5, 21, 6, 2, _D, [16, 17, 18, 19, 20])
    _kv_cache_case("prompt-window-mqa", _kv, 3, 17, 2, 1, _D, [14, 15, 16], window=6)
_kv_cache_case("decode", "turbo4", 1, 33, 4, 2, 128, [32], k_type="q8_0")   # the safe setting
# gemma4 E2B's head sizes (8 query heads on one KV head): 256 in the sliding-window layers, 512 in
# the global ones, i.e. heads of two and four turbo blocks and of 8 and 16 q8_0 / q4_0 blocks
# (slow: the CPU compiles such a case for ~30 s on 2 loaded cores, PoCL a turbo one for minutes)
_kv_cache_case("swa-head-256-mqa", "turbo3", 3, 17, 8, 1, 256, [14, 15, 16], window=6, slow=True)
_kv_cache_case("global-head-512-mqa", "turbo4", 2, 19, 8, 1, 512, [17, 18], k_type="q8_0", slow=True)
_kv_cache_case("global-head-512-mqa", "q4_0", 2, 19, 8, 1, 512, [17, 18], slow=True)
for _kv in ("turbo3", "turbo4"):     # the default model's head: 256 values, two turbo blocks
    _kv_cache_case("prompt-head-256", _kv, 4, 21, 4, 1, 256, [17, 18, 19, 20])


# state-space ops (Mamba-2)
def _ssm_conv_case(name, T, C, K, window="plain", scalar=False):
    def build(s):
        w = s.input("w", "f32", (C, K))
        if window == "concat":   # the step-graph pattern: state rows, then a strided x; new state out
            x = s.view(s.input("xz", "f32", (T, 2 * C + 3)), shape=(T, C), strides=((2 * C + 3) * 4, 4),
                       offset=(C + 3) * 4)
            sx = s.concat(s.input("state", "f32", (K - 1, C)), x, axis=0)
            state = s.view(sx, shape=(K - 1, C), strides=(C * 4, 4), offset=T * C * 4)
            return [s.ssm_conv(sx, w), state]
        if window == "view":
            sx = strided_view(s, "sx", (K - 1 + T, C))
        elif window == "transposed":
            sx = transposed(s, "sx", (K - 1 + T, C))
        else:
            sx = s.input("sx", "f32", (K - 1 + T, C))
        return [s.ssm_conv(sx, w)]
    case(f"ssm/conv-{name}", "ssm_conv", scalar=scalar)(build)


_ssm_conv_case("T3-C17-K4", 3, 17, 4, scalar=True)
_ssm_conv_case("decode-C64", 1, 64, 4)
_ssm_conv_case("K1", 5, 17, 1)
_ssm_conv_case("view", 7, 33, 4, window="view")
_ssm_conv_case("transposed", 4, 17, 3, window="transposed")
_ssm_conv_case("concat-state", 5, 40, 4, window="concat", scalar=True)


def _ssm_dt(rng, shape):
    dt = 2.0 * rng.standard_normal(shape).astype(np.float32)
    dt.flat[::7] = 25.0                         # softplus's linear branch
    return dt


def _ssm_decay(rng, shape):
    return -positive(rng, shape)


def _ssm_scan_case(name, T, H, P, N, G, fused=False, scalar=False, all_states=False, per_state=False):
    """per_state: A [H, N] (Mamba-1: a decay per head and state entry), else A [H] (Mamba-2); with
    fused, the per-state A is a transposed view (its state axis strided)."""
    def build(s):
        if per_state and fused:
            a = s.transpose(s.input("A", "f32", (N, H), _ssm_decay))
        elif per_state:
            a = s.input("A", "f32", (H, N), _ssm_decay)
        else:
            a = s.input("A", "f32", (H,), _ssm_decay)
        if fused:   # x, B, C out of one conv row and dt out of a wider projection; a permuted state
            row = H * P + 2 * G * N
            xbc = s.input("xBC", "f32", (T, row))
            x = s.view(xbc, shape=(T, H, P), strides=(row * 4, P * 4, 4))
            b = s.view(xbc, shape=(T, G, N), strides=(row * 4, N * 4, 4), offset=H * P * 4)
            c = s.view(xbc, shape=(T, G, N), strides=(row * 4, N * 4, 4), offset=(H * P + G * N) * 4)
            dt = s.view(s.input("proj", "f32", (T, H + 3), _ssm_dt), shape=(T, H), strides=((H + 3) * 4, 4),
                        offset=3 * 4)
            state = s.permute(s.input("state", "f32", (P, H, N)), 1, 0, 2)
        else:
            x = s.input("x", "f32", (T, H, P))
            b, c = s.input("B", "f32", (T, G, N)), s.input("C", "f32", (T, G, N))
            dt = s.input("dt", "f32", (T, H), _ssm_dt)
            state = s.input("state", "f32", (H, P, N))
        return [s.ssm_scan(state, x, dt, a, b, c, all_states=all_states)]
    case(f"ssm/scan-{name}", "ssm_scan", scalar=scalar)(build)


_ssm_scan_case("T3-H4-P3-N5-G2", 3, 4, 3, 5, 2, scalar=True)
_ssm_scan_case("decode-H8-P16-N16", 1, 8, 16, 16, 1)
_ssm_scan_case("T5-N128-G2", 5, 2, 4, 128, 2)
_ssm_scan_case("fused-views", 4, 4, 8, 17, 2, fused=True, scalar=True)
# the state after every token (a speculative verify batch keeps the accepted prefix's)
_ssm_scan_case("all-states-T5-H4-P3-N16-G2", 5, 4, 3, 16, 2, scalar=True, all_states=True)
_ssm_scan_case("all-states-fused-views", 3, 4, 8, 17, 2, fused=True, all_states=True)
_ssm_scan_case("all-states-decode", 1, 8, 16, 16, 1, all_states=True)
# Mamba-1 (jamba): heads of one channel, one group, A per channel and state entry
_ssm_scan_case("mamba1-T3-H37-N13", 3, 37, 1, 13, 1, scalar=True, per_state=True)
_ssm_scan_case("mamba1-decode-H64-N16", 1, 64, 1, 16, 1, per_state=True)
_ssm_scan_case("mamba1-fused-views", 4, 20, 1, 13, 1, fused=True, scalar=True, per_state=True)
_ssm_scan_case("mamba1-P3-G2", 3, 4, 3, 5, 2, per_state=True)
_ssm_scan_case("mamba1-all-states-T5", 5, 37, 1, 13, 1, all_states=True, per_state=True)
_ssm_scan_case("mamba1-all-states-fused-views", 3, 20, 1, 13, 1, fused=True, all_states=True, per_state=True)


# gated delta net
def _unit_heads(rng, shape):
    """Rows of unit L2 norm over the last axis, as q and k reach the op (l2_norm before it)."""
    x = rng.standard_normal(shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _log_decay(rng, shape):
    return -(0.5 * np.abs(rng.standard_normal(shape)) + 0.02).astype(np.float32)


def _unit_interval(rng, shape):
    return rng.uniform(0.05, 1.0, shape).astype(np.float32)


def _gdn_operands(s: Scope, T, H_k, H_v, S_k, S_v, kda=False, fused=False):
    """q, k, v, g, beta of one gated_delta_net call; fused: q, k and v are slices of one projection
    row (with a gap before them), g and beta slices of another."""
    g_width = H_v * S_k if kda else H_v
    if not fused:
        q, k = s.input("q", "f32", (T, H_k, S_k), _unit_heads), s.input("k", "f32", (T, H_k, S_k), _unit_heads)
        v = s.input("v", "f32", (T, H_v, S_v))
        g = s.input("g", "f32", (T, H_v, S_k) if kda else (T, H_v), _log_decay)
        return q, k, v, g, s.input("beta", "f32", (T, H_v), _unit_interval)
    row = 3 + 2 * H_k * S_k + H_v * S_v
    qkv = s.input("qkv", "f32", (T, row), _unit_heads)
    q, k, v = (s.view(qkv, shape=(T, H, S), strides=(row * 4, S * 4, 4), offset=start * 4)
               for H, S, start in ((H_k, S_k, 3), (H_k, S_k, 3 + H_k * S_k), (H_v, S_v, 3 + 2 * H_k * S_k)))
    gb = s.input("gb", "f32", (T, g_width + H_v + 1), _log_decay)
    g_shape, g_strides = ((T, H_v, S_k), (-1, S_k * 4, 4)) if kda else ((T, H_v), (-1, 4))
    g = s.view(gb, shape=g_shape, strides=((g_width + H_v + 1) * 4,) + g_strides[1:])
    beta = s.sigmoid(s.view(gb, shape=(T, H_v), strides=((g_width + H_v + 1) * 4, 4), offset=(g_width + 1) * 4))
    return q, k, v, g, beta


def _gdn_case(name, T, H_k, H_v, S_k, S_v, kda=False, fused=False, state="plain", scalar=False,
              all_states=False):
    def build(s):
        q, k, v, g, beta = _gdn_operands(s, T, H_k, H_v, S_k, S_v, kda, fused)
        if state == "view":
            st = strided_view(s, "state", (H_v, S_v, S_k), fill=lambda rng, shape: 0.3 * normal(rng, shape))
        elif state == "permuted":
            st = s.permute(s.input("state", "f32", (S_v, H_v, S_k)), 1, 0, 2)
        else:
            st = s.input("state", "f32", (H_v, S_v, S_k))
        return [s.gated_delta_net(q, k, v, g, beta, st, scale=S_k ** -0.5, all_states=all_states)]
    case(f"gdn/{name}", "gated_delta_net", scalar=scalar)(build)


def _gdn_sequences_case(name, N, T, H_k, H_v, S_k, S_v, kda=False, all_states=False):
    """N sequences in one call (ggml's n_seqs): every operand with a leading sequence axis."""
    def build(s):
        q, k = (s.input(x, "f32", (N, T, H_k, S_k), _unit_heads) for x in ("q", "k"))
        v = s.input("v", "f32", (N, T, H_v, S_v))
        g = s.input("g", "f32", (N, T, H_v, S_k) if kda else (N, T, H_v), _log_decay)
        beta = s.input("beta", "f32", (N, T, H_v), _unit_interval)
        st = s.input("state", "f32", (N, H_v, S_v, S_k), lambda rng, shape: 0.3 * normal(rng, shape))
        return [s.gated_delta_net(q, k, v, g, beta, st, scale=S_k ** -0.5, all_states=all_states)]
    case(f"gdn/{name}", "gated_delta_net")(build)


_gdn_sequences_case("seqs3-decode-grouped", 3, 1, 2, 4, 16, 16)
_gdn_sequences_case("seqs2-T5-odd-kda-all-states", 2, 5, 3, 6, 13, 7, kda=True, all_states=True)

_gdn_case("decode-H4-S16", 1, 4, 4, 16, 16, scalar=True)
_gdn_case("prompt-T9-S32", 9, 2, 2, 32, 32)
_gdn_case("grouped-T5-Hv2Hk", 5, 2, 4, 16, 16, scalar=True)
_gdn_case("odd-T17-Sk13-Sv7", 17, 3, 6, 13, 7)
_gdn_case("kda-T6-S12", 6, 2, 4, 12, 12, kda=True, scalar=True)
_gdn_case("kda-decode-fused", 1, 2, 4, 17, 9, kda=True, fused=True)
_gdn_case("fused-views-state-view", 7, 2, 4, 24, 20, fused=True, state="view", scalar=True)
_gdn_case("state-permuted-S128", 3, 1, 2, 128, 128, state="permuted")
_gdn_case("all-states-T6-Hv2Hk", 6, 2, 4, 16, 16, scalar=True, all_states=True)
_gdn_case("all-states-kda-fused-state-view", 4, 2, 4, 12, 10, kda=True, fused=True, state="view",
          all_states=True)


# mul_mat
def _mm(name, wtype, x_shape, w_shape, x="plain", x_dtype="f32", w_view=None, scalar=False):
    def build(s):
        if x == "transposed":
            xn = transposed(s, "x", x_shape, x_dtype)
        elif x == "permuted":     # [B, T, K] read from a [T, B, K] input: batches not foldable
            xn = s.permute(s.input("x", x_dtype, (x_shape[1], x_shape[0], x_shape[2])), 1, 0, 2)
        else:
            xn = s.input("x", x_dtype, x_shape)
        if w_view == "rows":      # every other row of a bigger weight: a row stride of its own
            N, K = w_shape
            big = s.weight("w", (2 * N, K), wtype)
            row = dtypes.dtype(wtype).row_bytes(K)
            wn = s.view(big, shape=(N, K), strides=(2 * row, dtypes.dtype(wtype).block_bytes), offset=row)
        elif w_view == "transposed":
            wn = transposed(s, "w", w_shape, wtype)
        else:
            wn = s.weight("w", w_shape, wtype)
        return [s.mul_mat(xn, wn)]
    group = "mul_mat_float" if wtype in ("f32", "f16", "bf16") else "mul_mat_quant"
    case(f"{group}/{wtype}-{name}", "mul_mat", bound=MUL_MAT_BOUND[wtype], scalar=scalar)(build)


for _wt in ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q6_k"):
    _K = 256 if _wt in ("q4_k", "q6_k") else 64
    _mm("gemv", _wt, (1, _K), (17, _K), scalar=True)
    _mm("T3", _wt, (3, _K), (3, _K))
    _mm("T17", _wt, (17, 2 * _K), (33, 2 * _K))
    _mm("x-rank1", _wt, (_K,), (5, _K))
    _mm("x-transposed", _wt, (3, _K), (17, _K), x="transposed")
    _mm("w-row-view", _wt, (3, _K), (9, _K), w_view="rows", scalar=_wt in ("q4_k", "bf16"))
    _mm("batched-3d", _wt, (2, 3, _K), (2, 7, _K))
    _mm("batch-folds", _wt, (2, 3, _K), (7, _K))
    _mm("batch-permuted", _wt, (2, 5, _K), (7, _K), x="permuted")
for _wt in MORE_WTYPES:
    _K = _row_len(_wt)
    _mm("gemv", _wt, (1, _K), (17, _K), scalar=True)
    _mm("T17", _wt, (17, 2 * _K), (33, 2 * _K), scalar=True)
    _mm("w-row-view", _wt, (3, _K), (9, _K), w_view="rows")
    _mm("batched-3d", _wt, (2, 3, _K), (2, 7, _K))
_mm("wide-4096", "f32", (2, 4096), (32, 4096))
_mm("wide-4096", "q4_0", (2, 4096), (32, 4096))
_mm("wide-4096", "q6_k", (1, 4096), (16, 4096))
_mm("K17", "f32", (3, 17), (5, 17))
_mm("x-f16", "f16", (3, 64), (17, 64), x_dtype="f16")
_mm("x-f16-q8", "q8_0", (3, 64), (17, 64), x_dtype="f16")
_mm("broadcast-4d", "f32", (4, 3, 5, 32), (2, 1, 7, 32), scalar=True)
_mm("broadcast-3d", "f16", (6, 5, 32), (3, 7, 32))
_mm("broadcast-4d", "q8_0", (2, 3, 5, 64), (1, 3, 7, 64))


def _mm_activation_w(s):   # w is an activation (an input), batched and transposed
    return [s.mul_mat(s.input("x", "f32", (4, 5, 32)), transposed(s, "w", (4, 7, 32)))]


case("mul_mat_float/f32-w-input-transposed", "mul_mat", bound=F32_MATH, scalar=True)(_mm_activation_w)


# get_rows
def _get_rows(name, dt, R, D, T=5, view=None, idx_values=None, scalar=False):
    def build(s):
        if view == "transposed":
            table = transposed(s, "table", (R, D), dt)
        elif view == "rows":
            table = strided_view(s, "table", (R, D), dt)
        else:
            table = s.weight("table", (R, D), dt)
        idx = s.input("idx", "i32", (T,), indices(R, idx_values))
        return [s.get_rows(table, idx)]
    case(f"get_rows/{dt}-{name}", "get_rows", scalar=scalar)(build)


for _dt in ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q6_k"):
    _D = 256 if _dt in ("q4_k", "q6_k") else 64
    _get_rows("repeats", _dt, 20, _D, idx_values=[3, 0, 19, 3, 7], scalar=_dt in ("q4_k", "f16"))
    _get_rows("one", _dt, 1, _D, T=1)
for _dt in MORE_WTYPES:
    _get_rows("repeats", _dt, 20, _row_len(_dt), idx_values=[3, 0, 19, 3, 7], scalar=True)
for _dt in ("f32", "f16", "bf16"):
    _get_rows("transposed", _dt, 17, 3, T=4, view="transposed")
    _get_rows("row-view", _dt, 17, 3, T=4, view="rows")
_get_rows("wide-4096", "f32", 6, 4096, T=3)


def _get_rows_idx_view(s):
    idx = s.view(s.input("idx", "i32", (10,), indices(6)), shape=(5,), strides=(8,), offset=4)
    return [s.get_rows(s.weight("table", (6, 17)), idx)]


case("get_rows/f32-strided-idx", "get_rows")(_get_rows_idx_view)



# mixture of experts: mul_mat_id (E = 7 experts, not a power of two), top_k, take_along
def _mm_id(name, wtype, T, n_used, x="plain", x_rows=0, ids=None, E=7, N=5, K=None, scalar=False):
    """x "plain" [T, K], "transposed" / "view" (strided), or "per-expert" [T, n_used, K] (x_rows
    rows per token: 1 broadcasts); ids from `ids` values, else random in [0, E)."""
    K = K or _row_len(wtype)
    def build(s):
        if x == "transposed":
            xn = transposed(s, "x", (T, K))
        elif x == "view":
            xn = strided_view(s, "x", (T, K))
        elif x == "per-expert":
            xn = s.permute(s.input("x", "f32", (x_rows, T, K)), 1, 0, 2)    # non-contiguous too
        else:
            xn = s.input("x", "f32", (T, K))
        idn = s.input("ids", "i32", (T, n_used), indices(E, ids))
        return [s.mul_mat_id(xn, s.weight("w", (E, N, K), wtype), idn)]
    group = "mul_mat_id_float" if wtype in ("f32", "f16", "bf16") else "mul_mat_id_quant"
    case(f"{group}/{wtype}-{name}", "mul_mat_id", bound=MUL_MAT_BOUND[wtype], scalar=scalar)(build)


for _wt in ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q6_k"):
    _mm_id("T1-used1", _wt, 1, 1, scalar=_wt in ("f16", "q4_k"))
    _mm_id("T9-used3", _wt, 9, 3)
    _mm_id("T9-used3-repeats", _wt, 9, 3, ids=[2] * 20 + [6, 2, 0, 2, 5, 2, 2])   # one expert most often
    _mm_id("T9-used3-per-expert", _wt, 9, 3, x="per-expert", x_rows=3, scalar=_wt == "q8_0")
for _wt in MORE_WTYPES:
    _mm_id("T1-used1", _wt, 1, 1, scalar=_wt in ("q5_k", "nvfp4"))
    _mm_id("T9-used3", _wt, 9, 3)
_mm_id("T1-used3", "q4_0", 1, 3)
_mm_id("T9-used1-transposed", "f32", 9, 1, x="transposed")
_mm_id("T9-used3-view", "q8_0", 9, 3, x="view")
_mm_id("T9-used3-x-broadcast", "f16", 9, 3, x="per-expert", x_rows=1)
_mm_id("T5-used3-E3-wide", "q4_0", 5, 3, E=3, N=33)
_mm_id("T9-used3-K72", "f32", 9, 3, K=72)     # rows not in whole 32-value chunks (nor 16)
_mm_id("T9-used3-K72", "f16", 9, 3, K=72)


def _ties(rng, shape):   # few distinct values: ties everywhere
    return rng.integers(-2, 3, size=shape).astype(np.float32)


def _top_k(name, shape, k, fill=normal, view=False, scalar=False):
    def build(s):
        xn = strided_view(s, "x", shape, fill=fill) if view else s.input("x", "f32", shape, fill)
        return [s.top_k(xn, k=k)]
    case(f"moe_select/top_k-{name}", "top_k", scalar=scalar)(build)


_top_k("T1-E7-k1", (1, 7), 1)
_top_k("T9-E7-k3", (9, 7), 3, scalar=True)
_top_k("ties-T9-E8-k4", (9, 8), 4, fill=_ties, scalar=True)
_top_k("view-T4-E17-k17", (4, 17), 17, view=True)
_top_k("3d-E128-k8", (2, 3, 128), 8)


def _take_along(name, x_shape, k, view=False, scalar=False):
    def build(s):
        xn = transposed(s, "x", x_shape) if view else s.input("x", "f32", x_shape)
        idn = s.input("idx", "i32", x_shape[:-1] + (k,), indices(x_shape[-1]))
        return [s.take_along(xn, idn)]
    case(f"moe_select/take_along-{name}", "take_along", scalar=scalar)(build)


_take_along("T9-E7-k3", (9, 7), 3, scalar=True)
_take_along("transposed-T5-E17-k2", (5, 17), 2, view=True)
_take_along("3d", (2, 3, 8), 8)


def _router(s):   # the MoE router chain: softmax -> top_k -> take_along -> renormalise
    probs = s.softmax(s.input("logits", "f32", (9, 7)))
    wts = s.take_along(probs, s.top_k(probs, k=3))
    return [s.div(wts, s.sum_rows(wts))]


case("moe_select/router-chain", "take_along", bound=F32_MATH)(_router)

# set_rows
def _set_rows(name, dt, R, D, idx_values, src="plain", dst_view=False, scalar=False):
    def build(s):
        dst = strided_view(s, "dst", (R, D), dt) if dst_view else s.input("dst", dt, (R, D))
        idx = s.input("idx", "i32", (len(idx_values),), indices(R, idx_values))
        T = len(idx_values)
        srcn = transposed(s, "src", (T, D)) if src == "transposed" else s.input("src", "f32", (T, D))
        return [s.set_rows(dst, idx, srcn)]
    case(f"set_rows/{dt}-{name}", "set_rows", scalar=scalar)(build)


for _dt in ("f32", "f16", "bf16"):
    _set_rows("repeat", _dt, 9, 17, [4, 1, 4], scalar=_dt != "f32")
    _set_rows("views", _dt, 9, 17, [0, 8], src="transposed", dst_view=True)
_set_rows("wide", "f16", 3, 4096, [2])
for _dt in ("q8_0", "q4_0", "turbo3", "turbo4"):   # a quantized cache: each written row quantized
    _set_rows("repeat", _dt, 9, 256, [4, 1, 4], scalar=True)
    _set_rows("views", _dt, 9, 256, [0, 8], src="transposed")


# views and copies
case("copies/view-output", "view", scalar=True)(lambda s: [strided_view(s, "x", (3, 17))])
case("copies/reshape-of-value", "reshape")(
    lambda s: [s.reshape(s.neg(s.input("x", "f32", (3, 4, 5))), 12, 5)])
case("copies/permute-output", "permute")(
    lambda s: [s.permute(s.input("x", "f32", (2, 3, 4, 5)), 3, 1, 0, 2)])
case("copies/transpose-output", "transpose")(lambda s: [s.transpose(s.input("x", "f16", (17, 3)))])
case("copies/view-of-view", "view")(
    lambda s: [s.view(strided_view(s, "x", (4, 17)), shape=(2, 5), strides=(88, 8), offset=4)])
case("copies/cont-permuted", "cont", scalar=True)(
    lambda s: [s.cont(s.permute(s.input("x", "f32", (2, 3, 4, 5)), 3, 1, 0, 2))])
case("copies/cont-view-i32", "cont")(
    lambda s: [s.cont(s.view(s.input("x", "i32", (4, 9), indices(100)), shape=(3, 4), strides=(36, 8), offset=4))])


def _cont_quant_view(s):
    w = s.weight("w", (6, 64), "q4_0")
    row = dtypes.q4_0.row_bytes(64)
    return [s.cont(s.view(w, shape=(2, 64), strides=(2 * row, dtypes.q4_0.block_bytes), offset=row))]


case("copies/cont-quantized-view", "cont")(_cont_quant_view)
for _src, _dst in (("f32", "f16"), ("f16", "f32"), ("f32", "bf16"), ("bf16", "f32"), ("f16", "bf16"),
                   ("bf16", "f16"), ("f32", "f32")):
    case(f"copies/cast-{_src}-{_dst}", "cast", scalar=_src == "f32")(
        lambda s, a=_src, b=_dst: [s.cast(s.input("x", a, (3, 17)), dtype=b)])
case("copies/cast-transposed-4096", "cast")(
    lambda s: [s.cast(transposed(s, "x", (4096, 2)), dtype="f16")])
for _axis, (_a, _b) in {0: ((2, 17), (3, 17)), 1: ((2, 3, 5), (2, 4, 5)), -1: ((3, 1), (3, 17))}.items():
    case(f"copies/concat-axis{_axis}", "concat", scalar=_axis == 1)(
        lambda s, a=_a, b=_b, axis=_axis: [s.concat(s.input("a", "f32", a), s.input("b", "f32", b), axis=axis)])
case("copies/concat-views-f16", "concat")(
    lambda s: [s.concat(transposed(s, "a", (3, 17), "f16"), strided_view(s, "b", (3, 17), "f16"), axis=0)])
case("copies/concat-quantized", "concat")(
    lambda s: [s.concat(s.weight("a", (2, 64), "q8_0"), s.weight("b", (3, 64), "q8_0"), axis=0)])


# ---- running groups ----------------------------------------------------------------------------
@dataclass
class GroupRun:
    results: dict = field(default_factory=dict)       # case id -> (got, expected, output nodes)
    unsupported: dict = field(default_factory=dict)   # case id -> reason
    error: Exception | None = None


_RUNS: dict[tuple[int, str, bool], GroupRun] = {}


def _reachable(outputs) -> list[Node]:
    seen, stack = {}, list(outputs)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen[n] = None
            stack.extend(n.inputs)
    return list(seen)


def _build(cases, backend):
    """One graph for cases (leaving out those the backend does not support) and its inputs."""
    builder = GraphBuilder(cases[0].group)
    fills: dict = {}
    outputs, owners, unsupported = [], [], {}
    for c in cases:
        outs = c.build(Scope(builder, c.id.replace("/", "."), fills))
        reasons = [backend.supports_op(n)[1] for n in _reachable(outs)
                   if n.op not in ("input", "const") and not backend.supports_op(n)[0]]
        if reasons:
            unsupported[c.id] = reasons[0]
            continue
        owners.append((c.id, len(outputs), len(outs)))
        outputs += outs
    rng = np.random.default_rng(0)
    inputs = {}
    for node in builder.inputs:
        fill, dt = fills[node.name]
        inputs[node.name] = dtypes.from_float32(fill(rng, node.shape), dt) if dt.is_float or dt.is_quantized \
            else fill(rng, node.shape)
    graph = builder.build(outputs) if outputs else None
    return graph, inputs, owners, unsupported


def _group_run(backend, group: str, scalar_only: bool) -> GroupRun:
    key = (id(backend), group, scalar_only)
    if key not in _RUNS:
        cases = [c for c in CASES if c.group == group and (c.scalar or not scalar_only)]
        run = GroupRun()
        try:
            graph, inputs, owners, run.unsupported = _build(cases, backend)
            if graph is not None:
                got = backend.compile(graph).run(inputs)
                expected = run_reference(graph, inputs)
                for cid, start, count in owners:
                    sl = slice(start, start + count)
                    run.results[cid] = (got[sl], expected[sl], graph.outputs[sl])
        except Exception as e:   # reported by every case of the group
            run.error = e
        _RUNS[key] = run
    return _RUNS[key]


def check(backend, c: Case, scalar_only: bool = False):
    run = _group_run(backend, c.group, scalar_only)
    if c.id in run.unsupported:
        pytest.skip(f"{backend.name}: unsupported: {run.unsupported[c.id]}")
    if run.error is not None:
        raise AssertionError(f"group {c.group!r} failed on {backend!r}: "
                             f"{type(run.error).__name__}: {run.error}") from run.error
    got, expected, nodes = run.results[c.id]
    for i, (g, e, node) in enumerate(zip(got, expected, nodes)):
        assert g.shape == e.shape and g.dtype == e.dtype, \
            f"output {i}: {g.dtype}{list(g.shape)}, expected {e.dtype}{list(e.shape)}"
        if node.dtype.is_float:
            err = nmse(dtypes.to_float32(g, node.dtype), dtypes.to_float32(e, node.dtype))
            assert err <= c.nmse_bound, f"output {i} ({node.type}): NMSE {err:.3g} > {c.nmse_bound:g}"
        else:
            np.testing.assert_array_equal(g, e, err_msg=f"output {i} ({node.type})")


def _params(cases):
    return [pytest.param(c, id=c.id, marks=pytest.mark.slow if c.slow else ()) for c in cases]


@pytest.mark.parametrize("c", _params(CASES))
def test_op(backend, c):
    check(backend, c)


SCALAR_CASES = [c for c in CASES if c.scalar]


@pytest.mark.parametrize("c", _params(SCALAR_CASES))
def test_op_scalar_isa(scalar_cpu, c):
    check(scalar_cpu, c, scalar_only=True)


# ---- coverage ----------------------------------------------------------------------------------
def _case_nodes():
    builder = GraphBuilder("all")
    fills: dict = {}
    for c in CASES:
        for n in _reachable(c.build(Scope(builder, c.id.replace("/", "."), fills))):
            yield c, n


def test_every_op_has_a_case():
    covered = {n.op for _, n in _case_nodes()}
    missing = sorted(op for op, d in OPS.items() if d.category != "source" and op not in covered)
    assert not missing, f"ops without a conformance case: {missing}"


def test_every_weight_dtype_has_mul_mat_and_get_rows_cases():
    ops = ("mul_mat", "mul_mat_id", "get_rows")
    seen = {(n.op, n.inputs[0 if n.op == "get_rows" else 1].dtype.name)
            for _, n in _case_nodes() if n.op in ops}
    for dt in dtypes.WEIGHT_TYPES:
        assert all((op, dt.name) in seen for op in ops), dt.name


def test_cpu_supports_every_case():
    """On CPU nothing may hide behind "unsupported"."""
    cpu = CpuBackend(threads=1)
    for c, n in _case_nodes():
        if n.op not in ("input", "const"):
            ok, reason = cpu.supports_op(n)
            assert ok, f"{c.id}: {n.op} unsupported on cpu: {reason}"


class _NoMatmul(CpuBackend):
    name = "cpu-no-matmul"

    def supports_op(self, node):
        if node.op == "mul_mat":
            return False, f"mul_mat: w dtype {node.inputs[1].dtype} unsupported"
        return super().supports_op(node)


def test_unsupported_case_is_reported_as_a_skip(backend_cache):
    c = next(c for c in CASES if c.id == "mul_mat_float/bf16-gemv")
    with pytest.raises(pytest.skip.Exception, match="cpu-no-matmul: unsupported: mul_mat: w dtype bf16 unsupported"):
        check(_NoMatmul(cache_dir=backend_cache), c)
