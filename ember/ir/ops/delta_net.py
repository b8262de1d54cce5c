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

Several sequences in one call (ggml's n_seqs, the fourth dimension of its q, k, v, g, beta and
state): a state of rank 4, [N, H_v, S_v, S_k], gives every operand a leading sequence axis of N
(q, k [N, T, H_k, S_k], v [N, T, H_v, S_v], g [N, T, H_v] or [N, T, H_v, S_k], beta [N, T, H_v]),
each sequence's T tokens updating its own state only. The result holds o as [N, T, H_v, S_v],
then the final states [N, H_v, S_v, S_k] (all_states: [N, T, H_v, S_v, S_k]), ggml's order; each
sequence's part equals the call of that sequence alone, bit for bit on every backend (a state row
is one thread's work whatever N is).
"""
from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from ember.ir.ops import Attr, OpDef, register
from ember.ir.ops.rules import FLOAT_ACT, expect_dtype, f32, require

OPERANDS = ("q", "k", "v", "g", "beta", "state")


@dataclass(frozen=True)
class GdnDims:
    """A gated_delta_net call's sizes: N sequences (1 without a sequence axis) of T tokens."""
    N: int
    T: int
    H_k: int
    H_v: int
    S_k: int
    S_v: int
    kda: bool                 # decay per key channel (g [.., T, H_v, S_k])
    seq_axis: bool            # every operand has a leading sequence axis (state of rank 4)


def gdn_dims(q, v, g, state) -> GdnDims:
    """The sizes of a call from its (already checked) operand types or nodes."""
    seq_axis = len(state.shape) == 4
    lead = 1 if seq_axis else 0
    T, H_k, S_k = q.shape[lead:]
    H_v, S_v = v.shape[lead + 1:]
    return GdnDims(q.shape[0] if seq_axis else 1, T, H_k, H_v, S_k, S_v, len(g.shape) == lead + 3, seq_axis)


def _gdn_infer(ts, attrs):
    for name, t in zip(OPERANDS, ts):
        expect_dtype("gated_delta_net", name, t, FLOAT_ACT)
    q, k, v, g, beta, state = ts
    require(state.rank in (3, 4), f"gated_delta_net: state {list(state.shape)} has rank {state.rank}; "
                                  f"expected [H_v, S_v, S_k] or, for N sequences, [N, H_v, S_v, S_k]")
    lead = state.rank - 3                 # 1 with a leading sequence axis on every operand
    seq = "N, " if lead else ""
    for name, t, rank in zip(OPERANDS, ts, (3, 3, 3, None, 2, 3)):
        ok = t.rank in (2 + lead, 3 + lead) if rank is None else t.rank == rank + lead
        require(ok, f"gated_delta_net: {name} {list(t.shape)} has rank {t.rank}; expected q, k "
                    f"[{seq}T, H_k, S_k], v [{seq}T, H_v, S_v], g [{seq}T, H_v] or [{seq}T, H_v, S_k], "
                    f"beta [{seq}T, H_v], state [{seq}H_v, S_v, S_k]")
    N = state.shape[0] if lead else 1
    for name, t in zip(OPERANDS, ts):
        require(not lead or t.shape[0] == N,
                f"gated_delta_net: {name} {list(t.shape)} must have the state's {N} sequences first")
    q, k, v, g, beta, state = (t.shape[lead:] for t in ts)
    T, H_k, S_k = q
    T_v, H_v, S_v = v
    require(k == q, f"gated_delta_net: k {list(k)} must have q's shape {list(q)}")
    require(T_v == T, f"gated_delta_net: v {list(v)} must have q's {T} tokens")
    require(H_k > 0 and H_v % H_k == 0,
            f"gated_delta_net: v has {H_v} heads, not a multiple of the {H_k} heads of q and k")
    gda, kda = (T, H_v), (T, H_v, S_k)
    require(g in (gda, kda), f"gated_delta_net: g {list(g)} must be {list(gda)} (per head) "
                             f"or {list(kda)} (per key channel)")
    require(beta == (T, H_v), f"gated_delta_net: beta {list(beta)} must be [{T}, {H_v}] per sequence")
    require(state == (H_v, S_v, S_k),
            f"gated_delta_net: state {list(state)} must be [{H_v}, {S_v}, {S_k}] (H_v, S_v, S_k) per sequence")
    n_states = T if attrs["all_states"] else 1
    return f32((N * (T * H_v * S_v + n_states * H_v * S_v * S_k),))


def _gdn_ref(xs, attrs):
    if xs[5].ndim == 4:           # N sequences: each alone, o of all of them, then their states
        parts = [_gdn_sequence_ref([x[n] for x in xs], attrs) for n in range(xs[5].shape[0])]
        return np.concatenate([o.reshape(-1) for o, _ in parts] + [s.reshape(-1) for _, s in parts])
    o, states = _gdn_sequence_ref(xs, attrs)
    return np.concatenate([o.reshape(-1), states.reshape(-1)])


def _gdn_sequence_ref(xs, attrs) -> tuple[np.ndarray, np.ndarray]:
    """(o [T, H_v, S_v], the final state or, with all_states, the state after each token), f32,
    for one sequence."""
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
    return o.astype(np.float32), np.stack(kept).astype(np.float32)


register(OpDef("gated_delta_net", OPERANDS, _gdn_infer, _gdn_ref,
               attrs={"scale": Attr("float"), "all_states": Attr("bool", False)},
               doc="The gated delta rule (ggml_gated_delta_net). For each token t in order and v "
                   "head h (q/k head h % H_k): S = S * exp(g[t, h]) (per key channel i when g is "
                   "[T, H_v, S_k]), delta = (v[t, h] - S k) * beta[t, h], S = S + delta outer k, "
                   "o[t, h] = (S q) * scale, with S = state[h] as [S_v, S_k]. Operands q, k [T, H_k, "
                   "S_k] (already L2-normalised), v [T, H_v, S_v], g [T, H_v] or [T, H_v, S_k] (log "
                   "decay), beta [T, H_v], state [H_v, S_v, S_k]. Result f32[T*H_v*S_v + "
                   "H_v*S_v*S_k]: o as [T, H_v, S_v], then the final state as [H_v, S_v, S_k]; with "
                   "all_states, the state after each token as [T, H_v, S_v, S_k] instead. N "
                   "sequences (ggml's n_seqs): a state [N, H_v, S_v, S_k] and every operand with a "
                   "leading axis of N; each sequence updates its own state; o [N, T, H_v, S_v] "
                   "then the states [N, H_v, S_v, S_k] ([N, T, H_v, S_v, S_k] with all_states)."))
