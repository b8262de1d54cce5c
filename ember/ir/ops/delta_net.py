"""The gated delta rule with carried state, after ggml's gated_delta_net (Qwen3-Next, Qwen3.5,
Kimi linear attention; Yang et al., "Gated Delta Networks", arXiv 2412.06464).

One op for one token and for T tokens: the recurrence over tokens runs inside the kernel, so a
decode step and a prompt row are the same computation. Like ssm_scan, the result is one flat
f32 tensor holding the outputs, then the new state, which a step graph slices with views:

    q = l2_norm(q); k = l2_norm(k)                      # outside the op, as llama.cpp's graph does
    out   = gated_delta_net(q, k, v, g, beta, state, scale=1 / sqrt(S_k))
    o     = out[:T*H_v*S_v] viewed as [T, H_v, S_v];  new state = out[T*H_v*S_v:] as [H_v, S_v, S_k]

Layout and conventions (those of ggml_compute_forward_gated_delta_net):
- state[h, j, i] is the state's entry for value channel j and key channel i of v head h: ggml
  stores S[i][j] at s[j * S_v + i], which is this row-major [H_v, S_v, S_k] (ggml has S_k == S_v;
  ember allows them to differ).
- v head h reads q/k head h % H_k (ggml's iq1 = iv1 % neq1: modulo, not h / (H_v / H_k)).
- g is the decay in log space (the factor is exp(g)): per head [T, H_v] (GDA) or per key channel
  [T, H_v, S_k] (KDA, scaling state[h, :, i] by exp(g[t, h, i])).
- The output is scaled after the product with q (ggml applies 1/sqrt(S_v) there); ember takes
  the scale as an attribute.
- all_states=True (speculative decoding, ember.runtime.speculative) returns the state after every
  token: f32[T*H_v*S_v + T*H_v*S_v*S_k], o, then T states [T, H_v, S_v, S_k].
"""
from __future__ import annotations

import numpy as np

from ember.ir.ops import Attr, OpDef, register
from ember.ir.ops.rules import FLOAT_ACT, expect_dtype, f32, require

OPERANDS = ("q", "k", "v", "g", "beta", "state")


def _gdn_infer(ts, attrs):
    for name, t in zip(OPERANDS, ts):
        expect_dtype("gated_delta_net", name, t, FLOAT_ACT)
    q, k, v, g, beta, state = ts
    for name, t, rank in zip(OPERANDS, ts, (3, 3, 3, None, 2, 3)):
        ok = t.rank in (2, 3) if rank is None else t.rank == rank
        require(ok, f"gated_delta_net: {name} {list(t.shape)} has rank {t.rank}; expected q, k "
                    f"[T, H_k, S_k], v [T, H_v, S_v], g [T, H_v] or [T, H_v, S_k], beta [T, H_v], "
                    f"state [H_v, S_v, S_k]")
    T, H_k, S_k = q.shape
    T_v, H_v, S_v = v.shape
    require(k.shape == q.shape, f"gated_delta_net: k {list(k.shape)} must have q's shape {list(q.shape)}")
    require(T_v == T, f"gated_delta_net: v {list(v.shape)} must have q's {T} tokens")
    require(H_k > 0 and H_v % H_k == 0,
            f"gated_delta_net: v has {H_v} heads, not a multiple of the {H_k} heads of q and k")
    gda, kda = (T, H_v), (T, H_v, S_k)
    require(g.shape in (gda, kda), f"gated_delta_net: g {list(g.shape)} must be {list(gda)} (per head) "
                                   f"or {list(kda)} (per key channel)")
    require(beta.shape == (T, H_v), f"gated_delta_net: beta {list(beta.shape)} must be [{T}, {H_v}]")
    require(state.shape == (H_v, S_v, S_k),
            f"gated_delta_net: state {list(state.shape)} must be [{H_v}, {S_v}, {S_k}] (H_v, S_v, S_k)")
    n_states = T if attrs["all_states"] else 1
    return f32((T * H_v * S_v + n_states * H_v * S_v * S_k,))


def _gdn_ref(xs, attrs):
    q, k, v, g, beta, state = (x.astype(np.float64) for x in xs)
    T, H_k, _ = q.shape
    H_v, S_v, _ = state.shape
    kh = np.arange(H_v) % H_k                     # v head h reads q/k head h % H_k
    s = state.copy()
    o = np.zeros((T, H_v, S_v))
    states = []
    for t in range(T):
        qt, kt = q[t][kh], k[t][kh]                                   # [H_v, S_k]
        decay = np.exp(g[t])                                          # [H_v] or [H_v, S_k]
        s = s * (decay[:, None, None] if decay.ndim == 1 else decay[:, None, :])
        delta = (v[t] - np.einsum("hji,hi->hj", s, kt)) * beta[t][:, None]   # [H_v, S_v]
        s = s + delta[:, :, None] * kt[:, None, :]
        o[t] = np.einsum("hji,hi->hj", s, qt) * attrs["scale"]
        states.append(s.reshape(-1))
    kept = states if attrs["all_states"] else states[-1:]
    return np.concatenate([o.reshape(-1)] + kept).astype(np.float32)


register(OpDef("gated_delta_net", OPERANDS, _gdn_infer, _gdn_ref,
               attrs={"scale": Attr("float"), "all_states": Attr("bool", False)},
               doc="The gated delta rule (ggml_gated_delta_net). For each token t in order and v "
                   "head h (q/k head h % H_k): S = S * exp(g[t, h]) (per key channel i when g is "
                   "[T, H_v, S_k]), delta = (v[t, h] - S k) * beta[t, h], S = S + delta outer k, "
                   "o[t, h] = (S q) * scale, with S = state[h] as [S_v, S_k]. Operands q, k [T, H_k, "
                   "S_k] (already L2-normalised), v [T, H_v, S_v], g [T, H_v] or [T, H_v, S_k] (log "
                   "decay), beta [T, H_v], state [H_v, S_v, S_k]. Result f32[T*H_v*S_v + "
                   "H_v*S_v*S_k]: o as [T, H_v, S_v], then the final state as [H_v, S_v, S_k]; with "
                   "all_states, the state after each token as [T, H_v, S_v, S_k] instead."))
