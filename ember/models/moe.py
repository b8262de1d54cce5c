"""The mixture-of-experts FFN as a model-level composition, after llama.cpp's build_moe_ffn
(src/llama-graph.cpp), for every arch with routed experts:

    logits = x @ ffn_gate_inp                      # router, [T, E]
    probs  = softmax(logits) | sigmoid(logits)
    ids    = top_k(probs, n_expert_used)           # [T, k]
    w      = take_along(probs, ids)                # weights of the selected experts
    w      = w / sum(w)          (norm_w)          # renormalised over the k selected
    w      = w * weights_scale   (when set and not 1)
    y      = sum_j w[:, j] * down_j(silu(gate_j(x)) * up_j(x))    # mul_mat_id: only the selected
    y     += sigmoid(x @ ffn_gate_inp_shexp) * shared(x)          # the gated shared expert

The expert tensors are `ffn_{gate,up,down}_exps.weight` [E, n_ff_exp, n_embd] / [E, n_embd,
n_ff_exp] (GGUF shapes outermost first), the shared expert `ffn_{gate,up,down}_shexp.weight` and
its gate `ffn_gate_inp_shexp.weight` [n_embd] (one value per token). Each arch says which parts it
has. Imports the IR builder (through common) only.
"""
from __future__ import annotations

from dataclasses import dataclass

from ember.ir.node import Node
from ember.models.common import StepGraph


@dataclass(frozen=True)
class MoeSpec:
    """How an arch routes: the gating function, renormalisation, the shared expert."""
    gating: str = "softmax"        # softmax | sigmoid
    norm_weights: bool = True
    shared_expert: bool = True
    shared_gate: bool = True       # the shared expert scaled by sigmoid(x @ ffn_gate_inp_shexp)


def moe_ffn(s: StepGraph, x: Node, il: int, spec: MoeSpec) -> Node:
    """Layer il's MoE FFN on x[T, n_embd] (already normed) -> f32[T, n_embd]."""
    b, hp = s.b, s.hp
    p = f"blk.{il}."
    T, D = x.shape
    E, k, F = hp.n_expert, hp.n_expert_used, hp.n_ff_exp
    logits = b.mul_mat(x, s.weight(p + "ffn_gate_inp.weight", E, D))
    if spec.gating == "softmax":
        probs = b.softmax(logits)
    elif spec.gating == "sigmoid":
        probs = b.sigmoid(logits)
    else:
        raise ValueError(f"moe_ffn: gating must be softmax or sigmoid, got {spec.gating!r}")
    ids = b.top_k(probs, k=k)
    weights = b.take_along(probs, ids)
    if spec.norm_weights:
        # llama.cpp clamps the sum below at 2^-14; a softmax's k largest sum to >= k / E
        weights = b.div(weights, b.sum_rows(weights))
    if hp.expert_weights_scale and hp.expert_weights_scale != 1.0:
        weights = b.scale(weights, scale=hp.expert_weights_scale)
    gate = b.mul_mat_id(x, s.weight(p + "ffn_gate_exps.weight", E, F, D), ids)     # [T, k, F]
    up = b.mul_mat_id(x, s.weight(p + "ffn_up_exps.weight", E, F, D), ids)
    down = b.mul_mat_id(b.swiglu(gate, up), s.weight(p + "ffn_down_exps.weight", E, D, F), ids)
    weighted = b.mul(down, b.reshape(weights, T, k, 1))                             # [T, k, D]
    y = b.reshape(b.sum_rows(b.permute(weighted, 0, 2, 1)), T, D)
    if spec.shared_expert:
        y = b.add(y, shared_expert(s, x, il, spec.shared_gate))
    return y


def shared_expert(s: StepGraph, x: Node, il: int, gated: bool) -> Node:
    """The shared expert: a SwiGLU FFN of width n_ff_shexp, times sigmoid of its gate."""
    b, hp = s.b, s.hp
    p = f"blk.{il}."
    T, D = x.shape
    F = hp.n_ff_shexp
    h = b.swiglu(b.mul_mat(x, s.weight(p + "ffn_gate_shexp.weight", F, D)),
                 b.mul_mat(x, s.weight(p + "ffn_up_shexp.weight", F, D)))
    y = b.mul_mat(h, s.weight(p + "ffn_down_shexp.weight", D, F))
    if not gated:
        return y
    gate_w = b.reshape(s.weight(p + "ffn_gate_inp_shexp.weight", D), 1, D)
    return b.mul(y, b.sigmoid(b.mul_mat(x, gate_w)))
