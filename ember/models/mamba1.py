"""The Mamba-1 mixer as a step-graph piece, after llama.cpp's build_mamba_layer (the recurrent
layer of its mamba and jamba graphs; jamba uses it with the RMS norms on dt, B and C).

On x[T, n_embd] (already normed):
- one projection ssm_in [2 d_inner, n_embd] whose rows are x (d_inner) then the gate z (d_inner),
  two strided views of it (the order is Mamba-2's reversed: there z comes first);
- a causal depthwise convolution over tokens of x alone, carried across steps by conv_state (the
  last d_conv - 1 rows it saw): ssm_conv(concat(conv_state, x)), + ssm_conv1d.bias, silu;
- ssm_x [dt_rank + 2 d_state, d_inner] projects the convolved x to dt (dt_rank wide), B and C
  (d_state each); jamba RMS-normalises each of the three with its own weight (ssm_dt_norm,
  ssm_b_norm, ssm_c_norm); ssm_dt [d_inner, dt_rank] + ssm_dt.bias widens dt to one per channel;
- the selective scan ssm_scan over ssm_state with d_inner heads of one channel, one group, and
  A = ssm_a [d_inner, d_state] (one decay per channel and state entry: the Mamba-1 form);
- y += x * ssm_d (the skip, one per channel); y = silu(z) * y; then ssm_out [n_embd, d_inner].
There is no group norm (Mamba-2's ssm_norm). The step writes both states after its last token, or
after every token (a speculative verify batch), through StepGraph.write_conv_states and
write_scan_states, as the Mamba-2 mixer does. Imports the IR builder (through common) only.
"""
from __future__ import annotations

import ember.ir.dtypes as dtypes
from ember.ir.node import Node
from ember.models.common import StepGraph
from ember.models.mamba2 import f32_weight

F32 = dtypes.f32.row_bytes(1)


def mamba1_mixer(s: StepGraph, il: int, x: Node) -> Node:
    """Layer il's Mamba-1 mixer on x[T, n_embd] (already normed) -> f32[T, n_embd]; records the
    layer's new conv and SSM states (s.n_states of each)."""
    b, hp = s.b, s.hp
    p = f"blk.{il}."
    T = x.shape[0]
    d_inner, N, R, K = hp.ssm_d_inner, hp.ssm_d_state, hp.ssm_dt_rank, hp.ssm_d_conv

    xz = b.mul_mat(x, s.weight(p + "ssm_in.weight", 2 * d_inner, hp.n_embd))
    row = xz.type.strides[0]
    xs = b.view(xz, shape=(T, d_inner), strides=(row, F32))
    z = b.view(xz, shape=(T, d_inner), strides=(row, F32), offset=d_inner * F32)

    # causal convolution of x: the state rows, then this step's rows
    window = b.concat(s.conv_state[il], xs, axis=0)
    s.write_conv_states(il, window)
    xs = b.ssm_conv(window, f32_weight(s, p + "ssm_conv1d.weight", d_inner, K))
    xs = b.silu(b.add(xs, s.vector(p + "ssm_conv1d.bias", d_inner)))

    # dt, B and C from one projection of the convolved x, each RMS-normalised (jamba)
    dbc = b.mul_mat(xs, s.weight(p + "ssm_x.weight", R + 2 * N, d_inner))
    row = dbc.type.strides[0]
    dt = b.view(dbc, shape=(T, R), strides=(row, F32))
    B = b.view(dbc, shape=(T, 1, N), strides=(row, N * F32, F32), offset=R * F32)
    Cm = b.view(dbc, shape=(T, 1, N), strides=(row, N * F32, F32), offset=(R + N) * F32)
    dt = s.rms_norm(dt, p + "ssm_dt_norm.weight")
    B = s.rms_norm(B, p + "ssm_b_norm.weight")
    Cm = s.rms_norm(Cm, p + "ssm_c_norm.weight")
    dt = b.add(b.mul_mat(dt, s.weight(p + "ssm_dt.weight", d_inner, R)), s.vector(p + "ssm_dt.bias", d_inner))

    # the selective scan: d_inner heads of one channel, A per channel and state entry
    A = f32_weight(s, p + "ssm_a", d_inner, N)
    out = b.ssm_scan(s.ssm_state[il], b.reshape(xs, T, d_inner, 1), dt, A, B, Cm,
                     all_states=s.states.all_states)
    y = b.view(out, shape=(T, d_inner), strides=(d_inner * F32, F32))
    s.write_scan_states(il, out, T * d_inner)

    y = b.add(y, b.mul(xs, s.vector(p + "ssm_d", d_inner)))     # D skip, one per channel
    y = b.swiglu(z, y)                                            # silu(z) * y
    return b.mul_mat(y, s.weight(p + "ssm_out.weight", hp.n_embd, d_inner))
