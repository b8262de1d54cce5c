"""State-space (Mamba-1 and Mamba-2) ops with carried recurrent state, after ggml's ssm_conv and
ssm_scan.

A recurrent layer carries two states from one step to the next: the last d_conv - 1 rows that
entered its causal convolution, and the SSM state of every head. Both ops keep ggml's split of
the work, so a step graph reads like llama.cpp's build_mamba2_layer:

    window = concat(conv_state, x, axis=0)          # [d_conv - 1 + T, C]: state rows, then x
    y      = ssm_conv(window, w)                    # [T, C]
    new conv_state = the last d_conv - 1 rows of window (a view)

    out    = ssm_scan(state, x, dt, A, B, C)        # f32[T*H*P + H*P*N]: y, then the new state
    y      = out[:T*H*P] viewed as [T, H, P];  new state = out[T*H*P:] viewed as [H, P, N]

The conv bias and activation, dt's bias, the D skip connection and the gate stay separate
elementwise ops, as in llama.cpp's graph.

The decay A comes in ggml's two forms: one scalar per head, A[H] (Mamba-2), or one value per
channel and state entry, A[H, N] (Mamba-1, as in Jamba: llama.cpp's build_mamba_layer runs the
same ggml_ssm_scan with heads of one channel, P = 1, one group, and ssm_a of d_inner x d_state),
where the state row (h, p) decays entry n by exp(d * A[h, n]).

For speculative decoding, ssm_scan(..., all_states=True) returns the state after EVERY token
(f32[T*H*P + T*H*P*N]: y, then T states [T, H, P, N]), so the runtime can keep the state after
any accepted prefix of a verify batch without decoding it again (ember.runtime.speculative). The
convolution needs nothing new: the state after token t is rows t+1 .. t+d_conv-1 of its window.
"""
from __future__ import annotations

import numpy as np

from ember.ir.ops import Attr, OpDef, register
from ember.ir.ops.rules import FLOAT_ACT, expect_dtype, f32, require

# dt above this goes through softplus unchanged (ggml_compute_softplus_f32).
SOFTPLUS_LINEAR_ABOVE = 20.0


def _ssm_conv_infer(ts, attrs):
    sx, w = ts
    expect_dtype("ssm_conv", "sx", sx, FLOAT_ACT)
    expect_dtype("ssm_conv", "w", w, FLOAT_ACT)
    require(sx.rank == 2 and w.rank == 2,
            f"ssm_conv: sx must be [d_conv - 1 + T, C] and w [C, d_conv]; got {list(sx.shape)} "
            f"and {list(w.shape)}")
    C, K = w.shape
    require(K >= 1 and sx.shape[1] == C,
            f"ssm_conv: sx {list(sx.shape)} must have the {C} channels of w {list(w.shape)}")
    require(sx.shape[0] >= K - 1,
            f"ssm_conv: sx has {sx.shape[0]} rows, fewer than the d_conv - 1 = {K - 1} state rows")
    return f32((sx.shape[0] - K + 1, C))


def _ssm_conv_ref(xs, attrs):
    sx, w = (x.astype(np.float64) for x in xs)
    C, K = w.shape
    T = sx.shape[0] - K + 1
    y = np.zeros((T, C))
    for k in range(K):
        y += sx[k:k + T] * w[:, k]
    return y.astype(np.float32)


register(OpDef("ssm_conv", ("sx", "w"), _ssm_conv_infer, _ssm_conv_ref,
               doc="Causal depthwise 1-D convolution over tokens: y[t, c] = sum_k sx[t + k, c] * "
                   "w[c, k] for sx[d_conv - 1 + T, C] (the carried state rows, then the T new "
                   "rows) and w[C, d_conv] -> f32[T, C]. The next state is the last d_conv - 1 "
                   "rows of sx (ggml_ssm_conv)."))


def _ssm_scan_infer(ts, attrs):
    s, x, dt, a, b, c = ts
    for name, t in zip(("state", "x", "dt", "A", "B", "C"), ts):
        expect_dtype("ssm_scan", name, t, FLOAT_ACT)
    require(s.rank == 3 and x.rank == 3 and dt.rank == 2 and a.rank in (1, 2) and b.rank == 3,
            "ssm_scan: state must be [H, P, N], x [T, H, P], dt [T, H], A [H] or [H, N], B and C "
            "[T, G, N]")
    H, P, N = s.shape
    T = x.shape[0]
    require(x.shape[1:] == (H, P), f"ssm_scan: x {list(x.shape)} must be [T, {H}, {P}] (state {list(s.shape)})")
    require(dt.shape == (T, H), f"ssm_scan: dt {list(dt.shape)} must be [{T}, {H}]")
    require(a.shape in ((H,), (H, N)),
            f"ssm_scan: A {list(a.shape)} must be [{H}] (one decay per head, Mamba-2) or [{H}, {N}] "
            "(one per head and state entry, Mamba-1)")
    require(b.shape == c.shape, f"ssm_scan: B {list(b.shape)} and C {list(c.shape)} differ in shape")
    G = b.shape[1]
    require(b.shape[0] == T and b.shape[2] == N and G > 0 and H % G == 0,
            f"ssm_scan: B {list(b.shape)} must be [{T}, G, {N}] with G dividing {H} heads")
    n_states = T if attrs["all_states"] else 1
    return f32((T * H * P + n_states * H * P * N,))


def softplus_ggml(x: np.ndarray) -> np.ndarray:
    return np.where(x > SOFTPLUS_LINEAR_ABOVE, x, np.log1p(np.exp(np.minimum(x, SOFTPLUS_LINEAR_ABOVE))))


def _ssm_scan_ref(xs, attrs):
    s, x, dt, a, b, c = (v.astype(np.float64) for v in xs)
    H, P, N = s.shape
    T, G = x.shape[0], b.shape[1]
    group = np.arange(H) // (H // G)               # head h reads B/C of group h / (H / G)
    state = s.copy()
    y = np.zeros((T, H, P))
    states = []
    for t in range(T):
        dts = softplus_ggml(dt[t])                                       # [H]
        # [H, 1] per head (Mamba-2) or [H, N] per head and state entry (Mamba-1)
        decay = np.exp(dts[:, None] * (a[:, None] if a.ndim == 1 else a))
        bt, ct = b[t][group], c[t][group]                                # [H, N]
        state = state * decay[:, None, :] + (x[t] * dts[:, None])[:, :, None] * bt[:, None, :]
        y[t] = np.einsum("hpn,hn->hp", state, ct)
        states.append(state.reshape(-1))
    kept = states if attrs["all_states"] else states[-1:]
    return np.concatenate([y.reshape(-1)] + kept).astype(np.float32)


register(OpDef("ssm_scan", ("state", "x", "dt", "A", "B", "C"), _ssm_scan_infer, _ssm_scan_ref,
               attrs={"all_states": Attr("bool", False)},
               doc="The selective scan (ggml_ssm_scan). For each token t in order, head h of H "
                   "(group g = h / (H / G)): d = softplus(dt[t, h]) (d = dt above 20), state[h] = "
                   "state[h] * exp(d * A[h]) + (x[t, h] * d) outer B[t, g], y[t, h] = state[h] . "
                   "C[t, g]; A is [H] (Mamba-2: one decay per head) or [H, N] (Mamba-1: entry n of "
                   "every row of state[h] decays by exp(d * A[h, n])). Operands state[H, P, N], "
                   "x[T, H, P], dt[T, H] (its bias already added), A, B and C [T, G, N]. Result f32[T*H*P + "
                   "H*P*N]: y as [T, H, P], then the final state as [H, P, N]; with all_states, f32[T*H*P + "
                   "T*H*P*N]: y, then the state after each token as [T, H, P, N]."))
