"""gemma4 as a step graph, after llama.cpp's models/gemma4.cpp (the dense models: E2B, E4B, 31B).

What it shares with gemma3 (ember/models/gemma3.py): embeddings scaled by sqrt(n_embd), pre- and
post-norms around attention and around the GeGLU FFN, QK-norm per head before neox rope, a
sliding-window pattern with its own rope base, soft-capped logits of the tied embedding. What
differs:
- Sliding-window and global layers have their own head sizes and rotated dimensions (HParams
  head_dim / rot_dims); global layers rotate with the frequency factors `rope_freqs.weight`
  ("proportional" rope: a huge factor leaves a pair unrotated).
- Queries are not scaled (attention scale 1): the norms do the job. V is RMS-normalised without
  a weight; a layer without `attn_v` uses its K projection (before the K norm) as V.
- The last shared_kv_layers layers have no K/V projections and no cache: each attends over the
  cache of the last earlier layer of its kind (HParams.kv_source), as this step updated it.
- FFN widths may differ by layer (HParams.ff_width).
- Per-layer embeddings (PLE): a second token embedding of n_layer slices of n_embd_per_layer,
  added to a projection of the scaled embedding (llama.cpp's project_per_layer_inputs); after
  its FFN, each layer gates its slice with gelu(h W_gate), projects it back to n_embd, norms it
  and adds it to the residual.
- Each layer's output may be multiplied by a learned scalar (`layer_output_scale.weight`).
A mixture-of-experts layer (26B-A4B) is refused. Imports the IR builder (through common) only.
"""
from __future__ import annotations

import math

from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.models.common import Model, StepGraph, embed_tokens
from ember.models.gguf_file import ModelFileError
from ember.models.kv_cache import F16_CACHE, KVCacheTypes

F32_BYTES = 4


def build_step(model: Model, n_tokens: int, n_kv: int, n_outputs: int,
               n_kv_swa: int | None = None, cache: KVCacheTypes = F16_CACHE) -> Graph:
    s = StepGraph(model, n_tokens, n_kv, n_outputs, n_kv_swa, cache)
    b, hp = s.b, s.hp
    h = b.scale(embed_tokens(s), scale=math.sqrt(hp.n_embd))
    per_layer = per_layer_inputs(s, h) if hp.n_embd_per_layer else None
    for il in range(hp.n_layer):
        p = f"blk.{il}."
        if s.has(p + "ffn_gate_inp.weight"):
            raise ModelFileError(f"{s.file.path}: layer {il} is a mixture of experts "
                                 "(gemma4 26B-A4B); ember's gemma4 runs the dense models only")
        last = il == hp.n_layer - 1
        attn = attention_block(s, il, s.rms_norm(h, p + "attn_norm.weight"))
        if last:
            attn, h = s.select_outputs(attn), s.select_outputs(h)
        h = b.add(s.rms_norm(attn, p + "post_attention_norm.weight"), h)
        x = s.ffn(s.rms_norm(h, p + "ffn_norm.weight"), il, "geglu")
        h = b.add(s.rms_norm(x, p + "post_ffw_norm.weight"), h)
        if per_layer is not None:
            h = add_per_layer_input(s, il, h, per_layer, last)
        out_scale = s.vector(p + "layer_output_scale.weight", 1, required=False)
        if out_scale is not None:
            h = b.mul(h, out_scale)
    return s.finish(h, softcap=hp.final_logit_softcap)


def attention_block(s: StepGraph, il: int, x: Node) -> Node:
    """Layer il's attention on the normed x: Q (and, in a layer with its own cache, K and V)
    projected, normed and rotated, attention through the cache, the output projection."""
    b, hp = s.b, s.hp
    p, T = f"blk.{il}.", s.n_tokens
    D, swa = hp.head_dim(il), hp.is_swa(il)
    rope = dict(n_dims=hp.rot_dims(il), mode="neox", freq_base=hp.rope_base(il), freq_scale=hp.rope_scale(il))
    factors = None if swa else rope_factors(s, hp.rot_dims(il))
    q = b.reshape(s.linear(x, p + "attn_q", hp.n_head * D), T, hp.n_head, D)
    q = b.rope(s.rms_norm(q, p + "attn_q_norm.weight"), s.pos, factors, **rope)
    k = v = None
    if hp.kv_source(il) == il:
        k = b.reshape(s.linear(x, p + "attn_k", hp.n_head_kv * D), T, hp.n_head_kv, D)
        v = b.reshape(s.linear(x, p + "attn_v", hp.n_head_kv * D), T, hp.n_head_kv, D) \
            if s.has(p + "attn_v.weight") else k
        k = b.rope(s.rms_norm(k, p + "attn_k_norm.weight"), s.pos, factors, **rope)
        v = b.rms_norm(v, eps=hp.rms_eps)
    attn = s.attention(il, q, k, v, scale=hp.attn_scale, swa=swa)
    return s.linear(attn, p + "attn_output", hp.n_embd)


def rope_factors(s: StepGraph, n_dims: int) -> Node | None:
    """The global layers' frequency factors (one per rotated pair; the file holds one per pair
    of the whole head, of which rope reads the first n_dims / 2)."""
    hp = s.hp
    name = "rope_freqs.weight"
    if not s.has(name):
        return None
    factors = s.vector(name, hp.head_dim_k // 2)
    if n_dims // 2 == factors.shape[0]:
        return factors
    return s.b.cont(s.b.view(factors, shape=(n_dims // 2,), strides=(F32_BYTES,), offset=0))


def per_layer_inputs(s: StepGraph, h: Node) -> Node:
    """Every layer's slice of the per-layer embeddings, f32[n_tokens, n_layer, n_embd_per_layer]:
    (norm(proj(h) / sqrt(n_embd)) + embd_pl(tokens) * sqrt(n_embd_per_layer)) / sqrt(2)."""
    b, hp = s.b, s.hp
    T, L, n = s.n_tokens, hp.n_layer, hp.n_embd_per_layer
    rows = b.get_rows(s.weight("per_layer_token_embd.weight", hp.n_vocab, L * n), s.tokens)
    rows = b.reshape(b.scale(rows, scale=math.sqrt(n)), T, L, n)
    proj = b.mul_mat(h, s.weight("per_layer_model_proj.weight", L * n, hp.n_embd))
    proj = b.reshape(b.scale(proj, scale=1.0 / math.sqrt(hp.n_embd)), T, L, n)
    proj = s.rms_norm(proj, "per_layer_proj_norm.weight")
    return b.scale(b.add(proj, rows), scale=1.0 / math.sqrt(2.0))


def add_per_layer_input(s: StepGraph, il: int, h: Node, per_layer: Node, last: bool) -> Node:
    """h + norm(proj(gelu(h W_gate) * slice il of per_layer)); in the last layer only the
    output rows (h is already selected)."""
    b, hp = s.b, s.hp
    p, T, L, n = f"blk.{il}.", s.n_tokens, hp.n_layer, hp.n_embd_per_layer
    own = b.cont(b.view(per_layer, shape=(T, n), strides=(L * n * F32_BYTES, F32_BYTES),
                        offset=il * n * F32_BYTES))
    if last:
        own = s.select_outputs(own)
    gate = b.gelu(b.mul_mat(h, s.weight(p + "inp_gate.weight", n, hp.n_embd)))
    x = b.mul_mat(b.mul(gate, own), s.weight(p + "proj.weight", hp.n_embd, n))
    return b.add(h, s.rms_norm(x, p + "post_norm.weight"))
