"""mamba2 as a step graph, after llama.cpp's models/mamba.cpp and build_mamba2_layer
(models/mamba-base.cpp). `mamba2_mixer` is the recurrent layer that hybrids reuse.

Each layer: h += mixer(rms_norm(h)); then the output norm and head (tied to the token embedding
when the file has no output.weight). The mixer:
- one projection ssm_in [d_in_proj, n_embd] whose rows are z (the gate, d_inner), xBC (the
  convolution's channels: x d_inner, then B and C, n_group * d_state each) and dt (one per head);
  z, xBC and dt are strided views of it;
- a causal depthwise convolution over tokens of xBC, carried across steps by conv_state (the last
  d_conv - 1 rows it saw): ssm_conv(concat(conv_state, xBC)), + ssm_conv1d.bias, silu;
- the selective scan ssm_scan over ssm_state, with dt + ssm_dt.bias, A = ssm_a per head, B and C
  per group; y += x * ssm_d (the skip); y = silu(z) * y; an rms_norm over each group of
  d_inner / n_group channels times ssm_norm (optional in falcon-h1 only); then ssm_out.
The step writes both states after its last token, or after every token (a speculative verify
batch), through StepGraph.write_states (the contract in ember/models/common.py): the conv states
are overlapping windows of the rows the convolution saw, the SSM states come out of the scan.
Imports the IR builder (through common and hybrid_layers) only.
"""
from __future__ import annotations

import ember.ir.dtypes as dtypes
from ember.ir.node import Node
from ember.models.common import StepGraph
from ember.models.gguf_file import ModelFileError
from ember.models.hybrid_layers import HybridStack

F32 = dtypes.f32.row_bytes(1)


def f32_weight(s: StepGraph, name: str, *shape: int) -> Node:
    """A small weight (conv kernel, per-head A and D, group norm) as f32 for the SSM ops."""
    w = s.weight(name, *shape)
    if w.dtype is dtypes.f32:
        return w
    if w.dtype not in (dtypes.f16, dtypes.bf16):
        raise ModelFileError(f"{s.file.path}: tensor {name!r} is {w.dtype}; it must be f32, f16 or bf16")
    return s.b.cast(w, dtype="f32")


def mamba2_mixer(s: StepGraph, il: int, x: Node) -> Node:
    """Layer il's Mamba-2 mixer on x[T, n_embd] (already normed) -> f32[T, n_embd]; records the
    layer's new conv and SSM states (s.n_states of each) with s.write_states."""
    b, hp = s.b, s.hp
    p = f"blk.{il}."
    T = x.shape[0]
    d_inner, N, H, G = hp.ssm_d_inner, hp.ssm_d_state, hp.ssm_n_head, hp.ssm_n_group
    P, C, K = hp.ssm_head_dim, hp.ssm_conv_channels, hp.ssm_d_conv
    d_in_proj = d_inner + C + H

    zxbcdt = b.mul_mat(x, s.weight(p + "ssm_in.weight", d_in_proj, hp.n_embd))
    row = zxbcdt.type.strides[0]
    z = b.view(zxbcdt, shape=(T, H, P), strides=(row, P * F32, F32))
    xbc = b.view(zxbcdt, shape=(T, C), strides=(row, F32), offset=d_inner * F32)
    dt = b.view(zxbcdt, shape=(T, H), strides=(row, F32), offset=(d_inner + C) * F32)

    # causal convolution: the state rows, then this step's rows; a state is K - 1 rows of it
    window = b.concat(s.conv_state[il], xbc, axis=0)
    s.write_conv_states(il, window)
    xbc = b.ssm_conv(window, f32_weight(s, p + "ssm_conv1d.weight", C, K))
    bias = s.vector(p + "ssm_conv1d.bias", C, required=hp.arch == "mamba2")
    if bias is not None:
        xbc = b.add(xbc, bias)
    xbc = b.silu(xbc)

    # selective scan: x, B, C are views of the convolved channels
    xs = b.view(xbc, shape=(T, H, P), strides=(C * F32, P * F32, F32))
    B = b.view(xbc, shape=(T, G, N), strides=(C * F32, N * F32, F32), offset=d_inner * F32)
    Cm = b.view(xbc, shape=(T, G, N), strides=(C * F32, N * F32, F32), offset=(d_inner + G * N) * F32)
    dt = b.add(dt, s.vector(p + "ssm_dt.bias", H))
    A = b.reshape(f32_weight(s, p + "ssm_a", H, 1), H)
    out = b.ssm_scan(s.ssm_state[il], xs, dt, A, B, Cm, all_states=s.states.all_states)
    y = b.view(out, shape=(T, H, P), strides=(H * P * F32, P * F32, F32))
    s.write_scan_states(il, out, T * H * P)

    y = b.add(y, b.mul(xs, f32_weight(s, p + "ssm_d", H, 1)))     # D skip, one per head
    y = b.swiglu(z, y)                                             # silu(z) * y
    if hp.arch != "falcon-h1" or s.has(p + "ssm_norm.weight"):    # optional in falcon-h1 only
        y = b.reshape(y, T, G, d_inner // G)                       # grouped rms norm
        y = b.mul(b.rms_norm(y, eps=hp.rms_eps), f32_weight(s, p + "ssm_norm.weight", G, d_inner // G))
    return b.mul_mat(b.reshape(y, T, d_inner), s.weight(p + "ssm_out.weight", hp.n_embd, d_inner))


MAMBA2 = HybridStack(mixer=mamba2_mixer)     # the mixer is the whole layer: no FFN
build_step = MAMBA2.build_step
