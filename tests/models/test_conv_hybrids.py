"""The step graphs of lfm2, lfm2moe, nemotron_h and falcon-h1 (tiny_gguf_hybrid files) through the
reference interpreter: the step contract with each layer kind's caches and states, decode steps
and micro-batches equal to one prompt, the carried state, and the files ember refuses."""
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ember.ir.verifier import verify
from ember.models import load_model
from ember.models.gguf_file import GGUFFile, ModelFileError
from ember.models.hparams import HParams

from model_steps import ReferenceSession, nmse, reference_logits
from tiny_gguf_hybrid import HYBRID_ARCHS, HYBRID_CONFIGS, SHORTCONV_ARCHS, HybridSpec, write_hybrid_gguf

PROMPT = [1, 17, 260, 300, 42, 9, 33]


@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_step_contract(tiny_files, arch):
    """KV caches of the attention layers, then the states of the recurrent ones, in and out:
    conv_state only for a short convolution, conv and SSM state for Mamba-2; a falcon-h1 layer
    has both a cache and states, a nemotron_h FFN layer neither."""
    cfg = HYBRID_CONFIGS[arch]
    model = load_model(tiny_files[HybridSpec(arch)])
    assert model.attention_layers == cfg.attention_layers
    assert model.recurrent_layers == cfg.recurrent_layers
    kinds = ("conv",) if arch in SHORTCONV_ARCHS else ("conv", "ssm")
    assert model.state_kinds == kinds
    g = model.build_step(n_tokens=3, n_kv=8, n_outputs=2)
    verify(g)
    caches = [f"{kind}_cache.{il}" for il in cfg.attention_layers for kind in "kv"]
    states = [f"{kind}_state.{il}" for il in cfg.recurrent_layers for kind in kinds]
    assert model.state_names() == states
    assert [n.name for n in g.inputs] == ["tokens", "pos", "slots", "out_ids", "mask"] + caches + \
        ["state_src", "state_slots"] + states
    by_name = {n.name: n.type for n in g.inputs}
    shapes = model.state_shapes()
    for il in cfg.recurrent_layers:        # one plane of each state (StateLayout's default)
        if arch in SHORTCONV_ARCHS:
            assert shapes[f"conv_state.{il}"] == (cfg.l_cache - 1, cfg.n_embd)
            assert str(by_name[f"conv_state.{il}"]) == f"f32[1, {(cfg.l_cache - 1) * cfg.n_embd}]"
        else:
            assert shapes[f"conv_state.{il}"] == (cfg.d_conv - 1, cfg.conv_channels)
            assert shapes[f"ssm_state.{il}"] == (cfg.n_ssm_head, cfg.d_inner // cfg.n_ssm_head, cfg.d_state)
            assert str(by_name[f"ssm_state.{il}"]) == f"f32[1, {cfg.d_inner * cfg.d_state}]"
    logits, *updated = g.outputs
    assert logits.shape == (2, model.n_vocab)
    assert [u.type for u in updated] == [by_name[n] for n in caches + states]
    assert all(u.op == "set_rows" for u in updated)


def test_layer_kinds_in_the_graphs(tiny_files):
    def count(arch, op):
        g = load_model(tiny_files[HybridSpec(arch)]).build_step(2, 8, 1)
        return sum(n.op == op for n in g.nodes)
    # lfm2: a convolution per short-conv layer, no scan; rope on q and k of each attention layer
    assert (count("lfm2", "ssm_conv"), count("lfm2", "ssm_scan"), count("lfm2", "rope")) == (3, 0, 4)
    # nemotron_h: two Mamba-2 layers, one attention layer without rope, relu in the two FFN layers
    assert (count("nemotron_h", "ssm_scan"), count("nemotron_h", "attention")) == (2, 1)
    assert (count("nemotron_h", "rope"), count("nemotron_h", "relu")) == (0, 2)
    # falcon-h1: attention and Mamba-2 in every layer
    assert count("falcon-h1", "ssm_scan") == count("falcon-h1", "attention") == 3


def test_lfm2_has_no_ssm_state(tiny_files):
    model = load_model(tiny_files[HybridSpec("lfm2")])
    with pytest.raises(ValueError, match=r"states \('conv',\), not 'ssm'"):
        model.state_shape("ssm")


@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_decode_steps_and_micro_batches_equal_one_prompt(tiny_files, arch):
    """Rows of one prompt step, of the same tokens decoded one by one, and of micro-batches of 3
    (the state and caches carried between steps) agree."""
    model = load_model(tiny_files[HybridSpec(arch)])
    whole = reference_logits(model, PROMPT, n_kv=8)
    session = ReferenceSession(model, n_kv=8)
    decoded = np.concatenate([session.step([t]) for t in PROMPT])
    session = ReferenceSession(model, n_kv=8)
    split = np.concatenate([session.step(PROMPT[i:i + 3]) for i in range(0, len(PROMPT), 3)])
    np.testing.assert_allclose(decoded, whole, atol=1e-4, rtol=0)
    np.testing.assert_allclose(split, whole, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_state_carries_the_past(tiny_files, arch):
    """Forgetting the recurrent state changes the next logits a lot, so the decode comparisons
    with llama.cpp do test the carried state."""
    model = load_model(tiny_files[HybridSpec(arch)])
    session = ReferenceSession(model, n_kv=8)
    session.step(PROMPT[:-1])
    carried = session.step(PROMPT[-1:])
    session = ReferenceSession(model, n_kv=8)
    session.step(PROMPT[:-1])
    for name in model.state_names():          # the recurrent state only; KV caches stay
        session.caches[name] = np.zeros_like(session.caches[name])
    assert nmse(session.step(PROMPT[-1:]), carried) > 1e-2


# ---- files ember refuses (at load, before any compile) ----------------------------------------
def _drop(name):
    def edit(w):
        del w[name]
        return w
    return edit


def _reshape(name, rows):
    def edit(w):
        w[name] = np.resize(w[name], (rows,) + w[name].shape[1:])     # cut or repeated rows
        return w
    return edit


BROKEN = [
    ("lfm2", _drop("blk.1.shortconv.conv.weight"), r"'blk.1.shortconv.conv.weight' is missing"),
    ("lfm2", _reshape("blk.0.shortconv.in_proj.weight", 384),
     r"'blk.0.shortconv.in_proj.weight' has shape \[384, 192\], expected \[576, 192\]"),
    ("lfm2", _drop("blk.2.attn_q_norm.weight"), r"'blk.2.attn_q_norm.weight' is missing"),
    ("nemotron_h", _reshape("blk.3.ssm_norm.weight", 2),           # a group short
     r"'blk.3.ssm_norm.weight' has shape \[2, 64\], expected \[3, 64\]"),
    ("nemotron_h", _drop("blk.4.ffn_down.weight"), r"'blk.4.ffn_down.weight' is missing"),
    ("falcon-h1", _reshape("blk.1.attn_k.weight", 96),             # 3 KV heads instead of 2
     r"'blk.1.attn_k.weight' has shape \[96, 192\], expected \[64, 192\]"),
    ("falcon-h1", _reshape("blk.0.ssm_a", 4),                      # a head short
     r"'blk.0.ssm_a' has shape \[4, 1\], expected \[5, 1\]"),
    ("falcon-h1", _drop("blk.2.ffn_norm"), r"'blk.2.ffn_norm' is missing"),
    ("lfm2moe", _drop("blk.3.exp_probs_b.bias"), r"'blk.3.exp_probs_b.bias' is missing"),
    ("lfm2moe", _reshape("blk.2.ffn_gate_exps.weight", 6),         # an expert short
     r"'blk.2.ffn_gate_exps.weight' has shape \[6, 96, 160\], expected \[7, 96, 160\]"),
    ("lfm2moe", _reshape("blk.4.ffn_gate_inp.weight", 8),          # a router for 8 experts
     r"'blk.4.ffn_gate_inp.weight' has shape \[8, 160\], expected \[7, 160\]"),
    ("lfm2moe", _drop("blk.1.ffn_up.weight"), r"'blk.1.ffn_up.weight' is missing"),   # a dense lead layer
]


@pytest.mark.parametrize("arch, edit, message", BROKEN, ids=[m.split("'")[1] for _, _, m in BROKEN])
def test_missing_or_misshapen_tensor_is_named(tmp_path, arch, edit, message):
    path = write_hybrid_gguf(tmp_path / "broken.gguf", HybridSpec(arch), edit=edit)
    with pytest.raises(ModelFileError, match=message):
        load_model(path)


def test_a_tensor_the_graph_does_not_use_is_refused(tmp_path):
    def extra(w):        # an SSM tensor in an lfm2 short-convolution layer
        w["blk.0.ssm_a"] = np.ones((4, 1), np.float32)
        return w
    path = write_hybrid_gguf(tmp_path / "extra.gguf", HybridSpec("lfm2"), edit=extra)
    with pytest.raises(ModelFileError, match="does not use tensor.*blk.0.ssm_a"):
        load_model(path)


def hybrid_metadata(arch: str, **extra) -> dict:
    """The metadata tiny_gguf_hybrid writes for arch (a None value drops the key)."""
    with tempfile.TemporaryDirectory() as folder:
        path = write_hybrid_gguf(Path(folder) / "meta.gguf", HybridSpec(arch))
        meta = dict(GGUFFile(path).metadata)
    meta.update(extra)
    return {k: v for k, v in meta.items() if v is not None}


def test_bad_layer_metadata_is_refused():
    with pytest.raises(ModelFileError, match="required metadata 'lfm2.shortconv.l_cache'"):
        HParams.from_metadata(hybrid_metadata("lfm2", **{"lfm2.shortconv.l_cache": None}))
    uneven = np.array([0, 352, 0, 0, 320], np.int32)       # two FFN layers of different widths
    with pytest.raises(ModelFileError, match="'nemotron_h.feed_forward_length' differs between layers"):
        HParams.from_metadata(hybrid_metadata("nemotron_h", **{"nemotron_h.feed_forward_length": uneven}))
    with pytest.raises(ModelFileError, match="'lfm2.attention.head_count_kv' has 4 entries for 5 layers"):
        HParams.from_metadata(hybrid_metadata("lfm2", **{"lfm2.attention.head_count_kv": np.zeros(4, np.int32)}))


@pytest.mark.parametrize("key, value, message", [
    ("lfm2moe.expert_gating_func", 3, r"'lfm2moe.expert_gating_func' = 3 is not supported \(supported: 1 \(softmax\), 2 \(sigmoid\)\)"),
    ("lfm2moe.expert_gating_func", None, "required metadata 'lfm2moe.expert_gating_func' is missing"),
    ("lfm2moe.expert_used_count", 8, r"expert_used_count 8 must be in \[1, expert_count 7\]"),
    ("lfm2moe.leading_dense_block_count", 6, r"'lfm2moe.leading_dense_block_count' = 6 must be in \[0, block_count 5\]"),
    ("lfm2moe.expert_feed_forward_length", None, "required metadata 'lfm2moe.expert_feed_forward_length' is missing"),
], ids=["gating", "no-gating", "used-count", "dense-lead", "no-expert-width"])
def test_bad_lfm2moe_metadata_is_refused(key, value, message):
    with pytest.raises(ModelFileError, match=message):
        HParams.from_metadata(hybrid_metadata("lfm2moe", **{key: value}))


def test_lfm2moe_routes_with_a_sigmoid_and_a_selection_bias(tiny_files):
    """Dense SwiGLU FFNs in the leading layers, experts after: top-k over sigmoid + exp_probs_b,
    the weights taken from the unbiased probabilities."""
    cfg = HYBRID_CONFIGS["lfm2moe"]
    model = load_model(tiny_files[HybridSpec("lfm2moe")])
    assert (model.hparams.expert_gating, model.hparams.n_layer_dense_lead) == ("sigmoid", 2)
    g = model.build_step(2, 8, 1)
    experts = [n for n in g.nodes if n.op == "mul_mat_id"]
    assert len(experts) == 3 * (cfg.n_layer - cfg.n_dense_lead)
    for top_k in {n.inputs[2] for n in experts}:
        biased = top_k.inputs[0]
        assert (top_k.attr("k"), biased.op, biased.inputs[0].op) == (3, "add", "sigmoid")
    takes = [n for n in g.nodes if n.op == "take_along"]
    assert takes and all(n.inputs[0].op == "sigmoid" for n in takes)
