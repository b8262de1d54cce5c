"""The gated-DeltaNet hybrids (qwen3next, qwen35, qwen35moe) without llama.cpp: the step-graph
contract with DeltaNet state, decode steps against one batch, prompts split anywhere, the CPU
backend against the reference interpreter, and files with a missing or misshapen tensor."""
import numpy as np
import pytest

from ember.backends import get_backend
from ember.ir import dtypes
from ember.ir.verifier import verify
from ember.models import load_model
from ember.models.gguf_file import ModelFileError
from ember.models.qwen3next import imrope_factors
from ember.runtime.session import Session, SessionOptions

from model_steps import ReferenceSession, nmse
from tiny_gguf_delta import DELTA_ARCHS, DELTA_CONFIGS, DeltaSpec, write_delta_gguf

PROMPT = [1, 17, 260, 300, 42, 9, 33]


@pytest.mark.parametrize("arch", DELTA_ARCHS)
def test_step_contract_has_delta_net_state(tiny_files, arch):
    cfg = DELTA_CONFIGS[arch]
    model = load_model(tiny_files[DeltaSpec(arch)])
    recurrent = [il for il in range(cfg.n_layer) if cfg.is_recurrent(il)]
    assert model.recurrent_layers == tuple(recurrent)
    assert model.attention_layers == tuple(il for il in range(cfg.n_layer) if il not in recurrent)
    g = model.build_step(n_tokens=3, n_kv=8, n_outputs=2)
    verify(g)
    by_name = {n.name: n.type for n in g.inputs}
    S, Hv = cfg.d_state, cfg.n_v_heads
    for il in recurrent:          # one plane of each state (StateLayout's default), flattened
        assert model.state_shapes()[f"conv_state.{il}"] == (cfg.d_conv - 1, cfg.conv_channels)
        assert model.state_shapes()[f"ssm_state.{il}"] == (Hv, S, S)      # [H_v, S_v, S_k]
        assert by_name[f"conv_state.{il}"].shape == (1, (cfg.d_conv - 1) * cfg.conv_channels)
        assert by_name[f"ssm_state.{il}"].shape == (1, Hv * S * S)
        assert by_name[f"ssm_state.{il}"].dtype is dtypes.f32
    logits, *rest = g.outputs
    assert logits.shape == (2, cfg.n_vocab)
    n_caches = 2 * len(model.attention_layers)
    assert [o.type for o in rest[n_caches:]] == [by_name[f"{k}_state.{il}"] for il in recurrent
                                                 for k in ("conv", "ssm")]


def test_moe_layers_read_experts_through_mul_mat_id(tiny_files):
    g = load_model(tiny_files[DeltaSpec("qwen35moe")]).build_step(2, 4, 1)
    experts = [n for n in g.nodes if n.op == "mul_mat_id"]
    assert len(experts) == 3 * DELTA_CONFIGS["qwen35moe"].n_layer      # gate, up, down per layer
    assert {n.inputs[1].name.split(".", 2)[-1] for n in experts} == {
        "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"}
    assert all(n.inputs[2].op == "top_k" and n.inputs[2].attr("k") == 3 for n in experts)


@pytest.mark.parametrize("arch", DELTA_ARCHS)
def test_reference_prompt_split_anywhere_equals_whole_prompt(tiny_files, arch):
    """The DeltaNet and conv states carried across micro-batches: the logits of a prompt run
    whole, in two uneven pieces and token by token agree (the reference interpreter)."""
    model = load_model(tiny_files[DeltaSpec(arch)])
    whole = ReferenceSession(model, 16).step(PROMPT)
    for cuts in ((2,), (1, 5), tuple(range(1, len(PROMPT)))):
        session = ReferenceSession(model, 16)
        bounds = (0,) + cuts + (len(PROMPT),)
        split = np.concatenate([session.step(PROMPT[a:b]) for a, b in zip(bounds, bounds[1:])])
        assert nmse(split, whole) < 1e-12, cuts


def cpu_session(path) -> Session:
    return Session(load_model(path), get_backend("cpu", threads=2), SessionOptions(n_ctx=64))


@pytest.mark.parametrize("spec", [DeltaSpec("qwen35moe", "q8_0"),
                                  pytest.param(DeltaSpec("qwen3next"), marks=pytest.mark.slow),
                                  pytest.param(DeltaSpec("qwen35"), marks=pytest.mark.slow)], ids=str)
def test_cpu_decode_rows_and_split_prompt_equal_the_batch(tiny_files, spec):
    """On the CPU backend: a prompt's logits in one batch equal the same tokens decoded one at a
    time and the prompt split into micro-batches (3 + 3), bit for bit (batch-invariant kernels,
    the DeltaNet recurrence inside one op); and they match the reference interpreter."""
    path = tiny_files[spec]
    prompt = PROMPT[:6]         # three step shapes to compile: 6, 3 and 1 tokens
    batch = cpu_session(path).eval(prompt, all_logits=True)
    session = cpu_session(path)
    rows = np.concatenate([session.eval([t], all_logits=True) for t in prompt])
    session = cpu_session(path)
    split = np.concatenate([session.eval(prompt[:3], all_logits=True), session.eval(prompt[3:], all_logits=True)])
    np.testing.assert_array_equal(rows, batch)
    np.testing.assert_array_equal(split, batch)
    reference = ReferenceSession(load_model(path), 16).step(prompt)
    # CPU vs the float64 reference, measured: f32 ~1e-12, q8_0 ~1.4e-4 (8-bit activations)
    assert nmse(batch, reference) < (1e-9 if spec.weight_type == "f32" else 1e-3)


def test_imrope_sections_leave_the_e_pairs_unturned():
    # sections t, h, w, e = 2, 2, 1, 1 over 6 pairs: sectors 0 t, 1 h, 2 w, 3 t, 4 h, 5 e
    np.testing.assert_array_equal(imrope_factors((2, 2, 1, 1), 12), [1, 1, 1, 1, 1, np.inf])
    assert imrope_factors((2, 2, 2, 0), 12) is None          # every pair turns: plain neox
    assert imrope_factors((11, 11, 10, 0), 64) is None       # Qwen3.5's sections
    assert imrope_factors((), 8) is None                     # qwen3next: no sections


# ---- bad files ----------------------------------------------------------------------------
def drop(name):
    def edit(w):
        del w[name]
        return w
    return edit


def reshape_to(name, shape):
    def edit(w):
        w[name] = np.zeros(shape, np.float32)
        return w
    return edit


CFG = DELTA_CONFIGS["qwen35moe"]
C, S, E = CFG.conv_channels, CFG.d_state, CFG.n_embd
BAD_FILES = {
    "missing DeltaNet tensor": (drop("blk.0.ssm_alpha.weight"), r"'blk\.0\.ssm_alpha\.weight' is missing"),
    "wrong expert count": (reshape_to("blk.1.ffn_up_exps.weight", (6, CFG.n_ff_exp, E)),
                           r"'blk\.1\.ffn_up_exps\.weight' has shape \[6, 64, 96\], expected \[7, 64, 96\]"),
    "wrong state size": (reshape_to("blk.2.ssm_norm.weight", (S + 1,)),
                         r"'blk\.2\.ssm_norm\.weight' has shape \[25\], expected \[24\]"),
    "wrong head split": (reshape_to("blk.0.attn_qkv.weight", (C + 2 * S, E)),
                         rf"'blk\.0\.attn_qkv\.weight' has shape \[{C + 2 * S}, 96\], expected \[{C}, 96\]"),
    "missing shared expert gate": (drop("blk.3.ffn_gate_inp_shexp.weight"),
                                   r"'blk\.3\.ffn_gate_inp_shexp\.weight' is missing"),
    "wrong attention heads": (reshape_to("blk.1.attn_q.weight", (CFG.n_head * CFG.head_dim, E)),
                              r"'blk\.1\.attn_q\.weight' has shape \[72, 96\], expected \[144, 96\]"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_is_refused_naming_tensor_and_shape(tmp_path, case):
    edit, message = BAD_FILES[case]
    path = write_delta_gguf(tmp_path / "bad.gguf", DeltaSpec("qwen35moe"), edit=edit)
    with pytest.raises(ModelFileError, match=message) as e:
        load_model(path)                    # builds one step graph; compiles nothing
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_extra_tensor_is_refused(tmp_path):
    def extra(w):
        w["blk.0.ssm_in.weight"] = np.zeros((8, E), np.float32)     # the legacy fused projection
        return w
    path = write_delta_gguf(tmp_path / "extra.gguf", DeltaSpec("qwen3next"), edit=extra)
    with pytest.raises(ModelFileError, match=r"does not use tensor\(s\) blk\.0\.ssm_in\.weight"):
        load_model(path)
