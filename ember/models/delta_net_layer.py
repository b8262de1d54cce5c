"""The gated DeltaNet layer of the Qwen3-Next / Qwen3.5 hybrids, after llama.cpp's
build_layer_attn_linear (src/models/qwen3next.cpp, qwen35.cpp) and delta-net-base.cpp.

With S the head size (ssm.state_size), H_k q/k heads (ssm.group_count), H_v v heads
(ssm.time_step_rank), C = 2 H_k S + H_v S the convolution's channels, on x[T, n_embd] (normed):
- qkv = x @ attn_qkv [C, n_embd] (rows: q of every k head, k of every k head, v of every v head);
  z = x @ attn_gate [H_v S, n_embd] (the output gate);
- beta = sigmoid(x @ ssm_beta), alpha = x @ ssm_alpha, one per v head (qwen35); qwen3next has one
  ssm_ba [2 H_v, n_embd] whose rows go per k head: r = H_v / H_k betas, then r alphas;
- g = softplus(alpha + ssm_dt.bias) * ssm_a (ssm_a holds -exp(A_log)): the log decay per v head;
- a causal depthwise convolution over tokens of qkv (no bias) carried by conv_state (its last
  d_conv - 1 rows), then silu; q, k, v are views of its output; q and k are L2-normalised
  (eps = the rms eps);
- gated_delta_net(q, k, v, g, beta, ssm_state, scale=1/sqrt(S)); ember's op maps v head h to q/k
  head h % H_k (ggml's fused op, used by qwen35); qwen3next repeats each q/k head r times in a
  row (ggml_repeat_4d over a new axis: head h reads h // r), so its q and k are repeated first;
- the gated rms norm: rms_norm(o) * ssm_norm [S] * silu(z), per v head; then ssm_out.
The layer writes its conv and DeltaNet states (after its last token, or after every token of a
speculative verify batch: gated_delta_net with all_states) through StepGraph.write_conv_states /
write_scan_states (the step-graph contract in ember/models/common.py; the DeltaNet state is
[H_v, S, S] as the op keeps it).
Imports the IR builder (through common and mamba2) only.
"""
from __future__ import annotations

import math

import ember.ir.dtypes as dtypes
from ember.ir.node import Node
from ember.models.common import StepGraph
from ember.models.mamba2 import f32_weight

F32 = dtypes.f32.row_bytes(1)


def delta_net_layer(s: StepGraph, il: int, x: Node, *, grouped_ba: bool, repeat_heads: bool) -> Node:
    """Layer il's gated DeltaNet on x[T, n_embd] -> f32[T, n_embd].

    grouped_ba: beta and alpha come from one ssm_ba tensor grouped per k head (qwen3next);
    otherwise from ssm_beta and ssm_alpha. repeat_heads: q/k head kh serves v heads kh*r ..
    kh*r + r - 1 (qwen3next), instead of ember's modulo mapping (qwen35)."""
    b, hp = s.b, s.hp
    p = f"blk.{il}."
    T, D = x.shape
    S, H_k, H_v, K = hp.ssm_d_state, hp.ssm_n_group, hp.ssm_n_head, hp.ssm_d_conv
    C = hp.ssm_conv_channels

    qkv = b.mul_mat(x, s.weight(p + "attn_qkv.weight", C, D))
    z = b.mul_mat(x, s.weight(p + "attn_gate.weight", H_v * S, D))
    beta, alpha = beta_alpha(s, il, x, grouped_ba)
    beta = b.sigmoid(beta)
    g = b.add(alpha, s.vector(p + "ssm_dt.bias", H_v))
    g = b.mul(b.softplus(g), f32_weight(s, p + "ssm_a", H_v))

    # causal convolution: the state rows, then this step's rows; a state is K - 1 rows of it
    window = b.concat(s.conv_state[il], qkv, axis=0)
    s.write_conv_states(il, window)
    conv = b.silu(b.ssm_conv(window, f32_weight(s, p + "ssm_conv1d.weight", C, K)))

    q = b.view(conv, shape=(T, H_k, S), strides=(C * F32, S * F32, F32))
    k = b.view(conv, shape=(T, H_k, S), strides=(C * F32, S * F32, F32), offset=H_k * S * F32)
    v = b.view(conv, shape=(T, H_v, S), strides=(C * F32, S * F32, F32), offset=2 * H_k * S * F32)
    q = b.l2_norm(q, eps=hp.rms_eps)
    k = b.l2_norm(k, eps=hp.rms_eps)
    if repeat_heads and H_v != H_k:
        q, k = repeat_each_head(s, q, H_v // H_k), repeat_each_head(s, k, H_v // H_k)

    out = b.gated_delta_net(q, k, v, g, beta, s.ssm_state[il], scale=1.0 / math.sqrt(S),
                            all_states=s.states.all_states)
    o = b.view(out, shape=(T, H_v, S), strides=(H_v * S * F32, S * F32, F32))
    s.write_scan_states(il, out, T * H_v * S)

    o = b.mul(b.rms_norm(o, eps=hp.rms_eps), s.vector(p + "ssm_norm.weight", S))
    o = b.swiglu(b.reshape(z, T, H_v, S), o)                  # silu(z) * o
    return b.mul_mat(b.reshape(o, T, H_v * S), s.weight(p + "ssm_out.weight", D, H_v * S))


def beta_alpha(s: StepGraph, il: int, x: Node, grouped: bool) -> tuple[Node, Node]:
    """The raw beta and alpha projections, f32[T, H_v] each (v head order)."""
    b, hp = s.b, s.hp
    p = f"blk.{il}."
    T, D = x.shape
    H_k, H_v = hp.ssm_n_group, hp.ssm_n_head
    if not grouped:
        return (b.mul_mat(x, s.weight(p + "ssm_beta.weight", H_v, D)),
                b.mul_mat(x, s.weight(p + "ssm_alpha.weight", H_v, D)))
    r = H_v // H_k
    ba = b.mul_mat(x, s.weight(p + "ssm_ba.weight", 2 * H_v, D))        # [T, H_k * (r betas, r alphas)]
    row = ba.type.strides[0]

    def part(offset: int) -> Node:
        picked = b.view(ba, shape=(T, H_k, r), strides=(row, 2 * r * F32, F32), offset=offset)
        return b.reshape(b.cont(picked), T, H_v)
    return part(0), part(r * F32)


def repeat_each_head(s: StepGraph, x: Node, r: int) -> Node:
    """[T, H, S] -> [T, H * r, S] with head h repeated r times in a row (a stride-0 view, copied)."""
    b = s.b
    T, H, S = x.shape
    if not x.type.is_contiguous:
        x = b.cont(x)
    wide = b.view(x, shape=(T, H, r, S), strides=(H * S * F32, S * F32, 0, F32))
    return b.reshape(b.cont(wide), T, H * r, S)
