"""jamba's step graphs (the tiny_gguf_jamba file) through the reference interpreter: the step
contract with Mamba-1 and attention layers, the layer kinds and the FFN kinds in the graph, decode
steps and micro-batches equal to one prompt, the carried state, and the files ember refuses (at
load, naming the tensor and the shape it expected, or the metadata key)."""
import numpy as np
import pytest

from ember.ir.verifier import verify
from ember.models import load_model
from ember.models.gguf_file import ModelFileError

from model_steps import ReferenceSession, nmse, reference_logits
from tiny_gguf_jamba import JAMBA_CONFIG, JambaSpec, write_jamba_gguf

PROMPT = [1, 17, 260, 300, 42, 9, 33]
CFG = JAMBA_CONFIG


@pytest.fixture(scope="module")
def model(tiny_files):
    return load_model(tiny_files[JambaSpec()])


def test_step_contract(model):
    """KV caches of the attention layers, then the conv and SSM states of the Mamba-1 layers:
    the conv state over x alone (d_inner channels), the SSM state d_inner heads of one channel."""
    assert model.attention_layers == CFG.attention_layers == (2, 4)
    assert model.recurrent_layers == CFG.recurrent_layers == (0, 1, 3)
    assert model.state_kinds == ("conv", "ssm")
    g = model.build_step(n_tokens=3, n_kv=8, n_outputs=2)
    verify(g)
    caches = [f"{kind}_cache.{il}" for il in CFG.attention_layers for kind in "kv"]
    states = [f"{kind}_state.{il}" for il in CFG.recurrent_layers for kind in ("conv", "ssm")]
    assert [n.name for n in g.inputs] == ["tokens", "pos", "slots", "out_ids", "mask"] + caches + \
        ["state_src", "state_slots"] + states
    shapes = model.state_shapes()
    for il in CFG.recurrent_layers:
        assert shapes[f"conv_state.{il}"] == (CFG.d_conv - 1, CFG.d_inner)
        assert shapes[f"ssm_state.{il}"] == (CFG.d_inner, 1, CFG.d_state)
    by_name = {n.name: n.type for n in g.inputs}
    assert str(by_name["k_cache.2"]) == f"f16[8, {CFG.n_head_kv * CFG.head_dim}]"
    logits, *updated = g.outputs
    assert logits.shape == (2, model.n_vocab)
    assert [u.type for u in updated] == [by_name[n] for n in caches + states]
    assert all(u.op == "set_rows" for u in updated)


def test_layer_and_ffn_kinds_in_the_graph(model):
    g = model.build_step(2, 8, 1)
    count = {op: sum(n.op == op for n in g.nodes) for op in ("ssm_scan", "ssm_conv", "attention", "rope",
                                                             "mul_mat_id", "top_k")}
    # three Mamba-1 layers, two attention layers without rope, three routed FFNs of 3 expert matmuls
    assert count == dict(ssm_scan=3, ssm_conv=3, attention=2, rope=0, mul_mat_id=9, top_k=3)
    scans = [n for n in g.nodes if n.op == "ssm_scan"]
    # the Mamba-1 form: A per channel and state entry, heads of one channel, one group
    assert all(n.inputs[3].shape == (CFG.d_inner, CFG.d_state) for n in scans)
    assert all(n.inputs[1].shape == (2, CFG.d_inner, 1) and n.inputs[4].shape == (2, 1, CFG.d_state)
               for n in scans)
    # B and C are RMS-normalised before the scan (jamba's ssm_b_norm, ssm_c_norm)
    assert all(n.inputs[k].op == "mul" and n.inputs[k].inputs[0].op == "rms_norm" for n in scans for k in (4, 5))


def test_experts_are_weighted_by_the_softmax_without_renormalisation(model):
    g = model.build_step(2, 8, 1)
    takes = [n for n in g.nodes if n.op == "take_along"]
    assert len(takes) == 3 and all(n.inputs[0].op == "softmax" for n in takes)
    assert all(n.inputs[1].attr("k") == CFG.n_expert_used for n in takes)
    # llama.cpp's jamba passes norm_w = false: no division of the selected weights by their sum
    consumers = [n for n in g.nodes if any(i in takes for i in n.inputs)]
    assert consumers and all(n.op == "reshape" for n in consumers)


def test_decode_steps_and_micro_batches_equal_one_prompt(model):
    whole = reference_logits(model, PROMPT, n_kv=8)
    session = ReferenceSession(model, n_kv=8)
    decoded = np.concatenate([session.step([t]) for t in PROMPT])
    session = ReferenceSession(model, n_kv=8)
    split = np.concatenate([session.step(PROMPT[i:i + 3]) for i in range(0, len(PROMPT), 3)])
    np.testing.assert_allclose(decoded, whole, atol=1e-4, rtol=0)
    np.testing.assert_allclose(split, whole, atol=1e-4, rtol=0)


def test_state_carries_the_past(model):
    """Forgetting the recurrent state changes the next logits a lot, so the decode comparisons
    with llama.cpp do test the carried state."""
    session = ReferenceSession(model, n_kv=8)
    session.step(PROMPT[:-1])
    carried = session.step(PROMPT[-1:])
    session = ReferenceSession(model, n_kv=8)
    session.step(PROMPT[:-1])
    for name in model.state_names():
        session.caches[name] = np.zeros_like(session.caches[name])
    assert nmse(session.step(PROMPT[-1:]), carried) > 1e-2


# ---- files ember refuses -------------------------------------------------------------------
def _drop(name):
    def edit(w):
        del w[name]
        return w
    return edit


def _transpose(name):
    def edit(w):
        w[name] = np.ascontiguousarray(w[name].T)
        return w
    return edit


def _reshape(name, rows):
    def edit(w):
        w[name] = np.resize(w[name], (rows,) + w[name].shape[1:])     # cut or repeated rows
        return w
    return edit


BROKEN = [
    (_drop("blk.1.ssm_x.weight"), r"'blk.1.ssm_x.weight' is missing"),
    (_transpose("blk.0.ssm_a"),                                     # ggml's order read as ember's
     r"'blk.0.ssm_a' has shape \[13, 320\], expected \[320, 13\]"),
    (_reshape("blk.3.ssm_dt.weight", 160),
     r"'blk.3.ssm_dt.weight' has shape \[160, 7\], expected \[320, 7\]"),
    (_drop("blk.0.ssm_b_norm.weight"), r"'blk.0.ssm_b_norm.weight' is missing"),
    (_reshape("blk.1.ssm_in.weight", 320),                          # x without the gate z
     r"'blk.1.ssm_in.weight' has shape \[320, 160\], expected \[640, 160\]"),
    (_reshape("blk.2.attn_k.weight", 64),                           # 2 KV heads instead of 1
     r"'blk.2.attn_k.weight' has shape \[64, 160\], expected \[32, 160\]"),
    (_reshape("blk.4.ffn_down_exps.weight", 4),                     # an expert short
     r"'blk.4.ffn_down_exps.weight' has shape \[4, 160, 224\], expected \[5, 160, 224\]"),
    (_drop("blk.2.ffn_up.weight"), r"'blk.2.ffn_up.weight' is missing"),          # a dense layer
    (_drop("blk.3.ffn_gate_inp.weight"), r"'blk.3.ffn_gate.weight' is missing"),  # no router: dense
]


@pytest.mark.parametrize("edit, message", BROKEN, ids=[m.split("'")[1] for _, m in BROKEN])
def test_missing_or_misshapen_tensor_is_named(tmp_path, edit, message):
    path = write_jamba_gguf(tmp_path / "broken.gguf", JambaSpec(), edit=edit)
    with pytest.raises(ModelFileError, match=message):
        load_model(path)


def test_a_tensor_the_graph_does_not_use_is_refused(tmp_path):
    def extra(w):          # Mamba-2's group norm in a Mamba-1 layer
        w["blk.0.ssm_norm.weight"] = np.ones(CFG.d_inner, np.float32)
        return w
    path = write_jamba_gguf(tmp_path / "extra.gguf", JambaSpec(), edit=extra)
    with pytest.raises(ModelFileError, match="does not use tensor.*blk.0.ssm_norm.weight"):
        load_model(path)


def _override(key, value):
    """A metadata writer that replaces key's value (GGUFWriter keeps the last one it is given)."""
    def edit(w):
        w.kv_data[0].pop(key, None)
        if value is not None:
            w.add_uint32(key, value)
    return edit


@pytest.mark.parametrize("key, value, message", [
    ("jamba.ssm.time_step_rank", None, "required metadata 'jamba.ssm.time_step_rank' is missing"),
    ("jamba.expert_used_count", 6, r"expert_used_count 6 must be in \[1, expert_count 5\]"),
    ("jamba.expert_count", None, r"'blk.1.ffn_gate_inp.weight' routes layer 1 to experts, but metadata "
                                 r"'jamba.expert_count' is missing or 0"),
    ("jamba.attention.key_length", 16, r"head_count 5 times the key length 16 must be n_embd 160"),
    ("jamba.attention.value_length", 48, r"head_count 5 times the value length 48 must be n_embd 160"),
], ids=["no-dt-rank", "used-count", "no-expert-count", "key-length", "value-length"])
def test_bad_metadata_is_refused(tmp_path, key, value, message):
    path = write_jamba_gguf(tmp_path / "meta.gguf", JambaSpec(), metadata=_override(key, value))
    with pytest.raises(ModelFileError, match=message):
        load_model(path)
