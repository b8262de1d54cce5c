"""Mixture-of-experts ops: expert selection (top_k, take_along) and expert matmul (mul_mat_id).

llama.cpp's build_moe_ffn is these ops plus existing ones, for activations x [T, D] and E experts
of which k are used per token:

    logits = mul_mat(x, w_router)                  # [T, E]
    probs  = softmax(logits)                       # or sigmoid(logits)
    ids    = top_k(probs, k=k)                     # [T, k] i32 (with a selection bias: of probs + bias)
    wts    = take_along(probs, ids)                # [T, k]; "softmax_weight" gating: softmax of
                                                   # take_along(logits, ids) instead
    wts    = div(wts, sum_rows(wts))               # optional renormalisation of the selected weights
    gate   = mul_mat_id(x, w_gate, ids)            # [T, k, F]   (w_gate [E, F, D])
    up     = mul_mat_id(x, w_up, ids)              # [T, k, F]
    h      = swiglu(gate, up)                      # [T, k, F]
    down   = mul_mat_id(h, w_down, ids)            # [T, k, D]   (w_down [E, D, F]; x with one row per expert)
    y      = sum over k of mul(down, reshape(wts, [T, k, 1]))
             (permute(.., 0, 2, 1) then sum_rows, or adds of views)

A shared expert is a plain FFN added outside (scaled by sigmoid(mul_mat(x, w_gate_shared)) in
qwen3next / qwen35moe). tests/ir/test_moe.py builds this whole graph and checks it against NumPy.

Imports NumPy and the op table helpers only.
"""
from __future__ import annotations

import numpy as np

import ember.ir.dtypes as dtypes
from ember.ir.ops import Attr, OpDef, register
from ember.ir.ops.rules import F32_OR_F16, FLOAT_ACT, expect_dtype, f32, require
from ember.ir.types import TensorType


# ---- mul_mat_id --------------------------------------------------------------------------------
def _mul_mat_id_infer(ts, attrs):
    x, w, ids = ts
    expect_dtype("mul_mat_id", "x", x, F32_OR_F16)
    expect_dtype("mul_mat_id", "w", w, dtypes.WEIGHT_TYPES)
    expect_dtype("mul_mat_id", "ids", ids, (dtypes.i32,))
    require(ids.rank == 2, f"mul_mat_id: ids must be [T, n_used], got rank {ids.rank} {list(ids.shape)}")
    require(w.rank == 3, f"mul_mat_id: w must be [E, N, K] (one matrix per expert), got {list(w.shape)}")
    require(x.rank in (2, 3), f"mul_mat_id: x must be [T, K] or [T, n_used, K], got {list(x.shape)}")
    T, n_used = ids.shape
    E, N, K = w.shape
    require(x.shape[0] == T, f"mul_mat_id: x has {x.shape[0]} tokens but ids has {T} (x {list(x.shape)}, "
                             f"ids {list(ids.shape)})")
    require(x.shape[-1] == K, f"mul_mat_id: inner sizes differ: x {list(x.shape)} vs w {list(w.shape)} "
                              f"(both end in K)")
    require(x.rank == 2 or x.shape[1] in (1, n_used),
            f"mul_mat_id: x {list(x.shape)} must have 1 or n_used={n_used} rows per token")
    require(n_used <= E, f"mul_mat_id: ids selects {n_used} experts per token but w holds E={E}")
    if w.dtype.is_quantized:
        require(w.strides[-1] == w.dtype.block_bytes,
                "mul_mat_id: a quantized w must keep its blocks contiguous")
    return f32((T, n_used, N))


def _mul_mat_id_ref(xs, attrs):
    x, w, ids = xs
    x = x.astype(np.float64)
    if x.ndim == 2:
        x = x[:, None, :]
    if np.any((ids < 0) | (ids >= w.shape[0])):
        raise IndexError(f"mul_mat_id: an index is out of range [0, {w.shape[0]})")
    T, n_used = ids.shape
    xb = np.broadcast_to(x, (T, n_used, x.shape[-1]))
    out = np.zeros((T, n_used, w.shape[1]), np.float64)
    for e in np.unique(ids):               # only the selected experts, each once
        t, j = np.nonzero(ids == e)
        out[t, j] = xb[t, j] @ w[e].astype(np.float64).T
    return out.astype(np.float32)


register(OpDef("mul_mat_id", ("x", "w", "ids"), _mul_mat_id_infer, _mul_mat_id_ref,
               doc="Expert matmul (ggml_mul_mat_id): out[t, j] = w[ids[t, j]] @ x[t] (or x[t, j] for "
                   "x [T, n_used, K]) -> f32[T, n_used, N]. w [E, N, K] stacks one weight per expert, "
                   "in any weight dtype mul_mat takes; x [T, K] or [T, 1 | n_used, K]; ids i32 "
                   "[T, n_used]. An id outside [0, E) is an error. Kernels read only the selected "
                   "experts, and a token's result does not depend on the other tokens of the batch."))


# ---- top_k -------------------------------------------------------------------------------------
def _top_k_infer(ts, attrs):
    (x,) = ts
    expect_dtype("top_k", "x", x, FLOAT_ACT)
    require(x.rank >= 1, "top_k: x must be at least 1-D")
    k = attrs["k"]
    require(1 <= k <= x.shape[-1], f"top_k: k={k} must be in [1, {x.shape[-1]}] (the size of x's last axis)")
    return TensorType(dtypes.i32, x.shape[:-1] + (k,))


def _top_k_ref(xs, attrs):
    x = xs[0]
    # A stable sort of -x: the largest first, equal values in index order. NaN sorts after every
    # number (NumPy), so a NaN is chosen only when fewer than k numbers remain.
    return np.argsort(-x, axis=-1, kind="stable")[..., :attrs["k"]].astype(np.int32)


register(OpDef("top_k", ("x",), _top_k_infer, _top_k_ref, attrs={"k": Attr("int")},
               doc="Indices of the k largest values along the last axis, largest first -> i32[..., k]. "
                   "Ties go to the lower index (ggml_top_k's argsort leaves tie order open; ember "
                   "fixes it so selection is deterministic on every backend); NaN ranks below "
                   "every number. The MoE router's expert selection."))


# ---- take_along --------------------------------------------------------------------------------
def _take_along_infer(ts, attrs):
    x, idx = ts
    expect_dtype("take_along", "x", x, FLOAT_ACT)
    expect_dtype("take_along", "idx", idx, (dtypes.i32,))
    require(x.rank >= 1 and idx.rank == x.rank and idx.shape[:-1] == x.shape[:-1],
            f"take_along: idx {list(idx.shape)} must match x {list(x.shape)} in all but the last axis")
    return f32(idx.shape)


def _take_along_ref(xs, attrs):
    x, idx = xs
    if np.any((idx < 0) | (idx >= x.shape[-1])):
        raise IndexError(f"take_along: an index is out of range [0, {x.shape[-1]})")
    return np.take_along_axis(x, idx.astype(np.int64), axis=-1).astype(np.float32)


register(OpDef("take_along", ("x", "idx"), _take_along_infer, _take_along_ref,
               doc="out[..., j] = x[..., idx[..., j]] along the last axis (NumPy take_along_axis) -> "
                   "f32. The MoE router's weights of the selected experts: take_along(probs, ids). "
                   "An index outside the row is an error."))
