import numpy as np
import pytest

from ember.ir import dtypes
from ember.ir.verifier import verify
from ember.models import ARCHITECTURES, Model, load_model
from ember.models.gguf_file import ModelFileError

from model_steps import ReferenceSession, nmse, reference_logits
from tiny_gguf import ARCHS, CONFIGS, WEIGHT_TYPES, Spec, write_tiny_gguf
from tiny_gguf_delta import DELTA_ARCHS
from tiny_gguf_hybrid import HYBRID_ARCHS
from tiny_gguf_ssm import SSM_ARCHS, SSM_CONFIGS, SsmSpec, write_ssm_gguf

PROMPT = [1, 17, 260, 300, 42, 9]

# NMSE of a weight type's logits against the F32 file's (measured: f16 ~3e-7, bf16 ~2e-5,
# q8_0 ~2e-4, q6_k ~2e-3, q5_0 ~1e-2, q4_k ~3e-2, q4_0 ~5e-2); a wrong layout gives ~1.
TYPE_NMSE = {"f16": 1e-6, "bf16": 1e-4, "q8_0": 1e-3, "q6_k": 1e-2, "q5_0": 5e-2,
             "q4_k": 0.1, "q4_0": 0.15}


def test_registry():
    assert sorted(ARCHITECTURES) == sorted(ARCHS + SSM_ARCHS + DELTA_ARCHS + HYBRID_ARCHS + ("jamba", "gemma4"))


@pytest.mark.parametrize("arch", ARCHS)
def test_step_contract(tiny_files, arch):
    model = load_model(tiny_files[Spec(arch, "f32")])
    hp = model.hparams
    g = model.build_step(n_tokens=3, n_kv=8, n_outputs=2)
    verify(g)
    names = ["tokens", "pos", "slots", "out_ids", "mask"] + (["mask_swa"] if arch == "gemma3" else [])
    caches = [f"{kind}_cache.{il}" for il in range(hp.n_layer) for kind in "kv"]
    assert [n.name for n in g.inputs] == names + caches
    by_name = {n.name: n.type for n in g.inputs}
    assert str(by_name["tokens"]) == str(by_name["pos"]) == str(by_name["slots"]) == "i32[3]"
    assert str(by_name["out_ids"]) == "i32[2]" and str(by_name["mask"]) == "f32[3, 8]"
    for name in caches:
        assert by_name[name].dtype is dtypes.f16 and by_name[name].shape == (8, hp.n_embd_k_gqa)
    logits, *updated = g.outputs
    assert logits.dtype is dtypes.f32 and logits.shape == (2, hp.n_vocab)
    assert [u.type for u in updated] == [by_name[n] for n in caches]
    assert all(u.op == "set_rows" and u.inputs[0] is g.inputs[len(names) + i]
               for i, u in enumerate(updated))


def test_constants_are_the_mmap_views(tiny_files):
    model = load_model(tiny_files[Spec("qwen3", "q4_k")])
    g = model.build_step(1, 4, 1)
    assert set(g.constants) == set(model.file.tensor_infos)
    for name, data in g.constants.items():
        assert data is model.file.tensor(name)


CACHE_SPECS = [Spec(a, t) for a in ARCHS for t in ("f32", "q4_k")] + [Spec("llama", "f32", True)]


@pytest.mark.parametrize("spec", CACHE_SPECS, ids=lambda s: s.filename)
def test_decode_with_returned_caches_equals_longer_prefill(tiny_files, spec):
    model = load_model(tiny_files[spec])
    full = reference_logits(model, PROMPT, n_kv=8)
    session = ReferenceSession(model, n_kv=8)
    prefill = session.step(PROMPT[:5], out_ids=[4])
    decode = session.step(PROMPT[5:])
    assert np.all(np.isfinite(full))
    np.testing.assert_allclose(prefill[0], full[4], atol=1e-4, rtol=0)
    np.testing.assert_allclose(decode[0], full[5], atol=1e-4, rtol=0)


@pytest.mark.parametrize("fused", [Spec("llama", "f32", True), Spec("qwen2", "f32", True),
                                   Spec("llama", "q8_0", True)], ids=lambda s: s.filename)
def test_fused_qkv_equals_separate(tiny_files, fused):
    separate = Spec(fused.arch, fused.weight_type)
    a = reference_logits(load_model(tiny_files[fused]), PROMPT)
    b = reference_logits(load_model(tiny_files[separate]), PROMPT)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_fused_qkv_splits_by_strided_views(tiny_files):
    g = load_model(tiny_files[Spec("qwen2", "f32", True)]).build_step(3, 8, 1)
    views = [n for n in g.nodes if n.op == "view" and n.inputs[0].op == "add"][:3]
    row = 4 * (256 + 128 + 128)          # the fused f32 row: Q 256, K 128, V 128 values
    assert [v.attr("offset") for v in views] == [0, 4 * 256, 4 * (256 + 128)]
    assert [v.attr("strides") for v in views] == [(row, 256, 4)] * 3
    assert [v.shape for v in views] == [(3, 4, 64), (3, 2, 64), (3, 2, 64)]


@pytest.mark.parametrize("weight_type", [t for t in WEIGHT_TYPES if t != "f32"])
def test_weight_types_run_close_to_f32(tiny_files, weight_type):
    arch = ARCHS[WEIGHT_TYPES.index(weight_type) % len(ARCHS)]
    model = load_model(tiny_files[Spec(arch, weight_type)])
    verify(model.build_step(len(PROMPT), 8, len(PROMPT)))
    ref = reference_logits(load_model(tiny_files[Spec(arch, "f32")]), PROMPT)
    assert nmse(reference_logits(model, PROMPT), ref) < TYPE_NMSE[weight_type]


def test_out_ids_select_rows(tiny_files):
    model = load_model(tiny_files[Spec("qwen3", "f32")])
    full = reference_logits(model, PROMPT)
    picked = ReferenceSession(model, 16).step(PROMPT, out_ids=[4, 1])
    np.testing.assert_allclose(picked, full[[4, 1]], atol=1e-5, rtol=0)
    none = ReferenceSession(model, 16).step(PROMPT, out_ids=[])
    assert none.shape == (0, model.n_vocab)


def test_build_step_checks_sizes(tiny_files):
    model = load_model(tiny_files[Spec("llama", "f32")])
    with pytest.raises(ValueError, match="n_outputs"):
        model.build_step(2, 8, 3)
    with pytest.raises(ValueError, match="n_tokens"):
        model.build_step(0, 8, 0)


# ---- gemma3 ----------------------------------------------------------------------------------
def test_gemma3_layers_use_their_mask_and_rope_base(tiny_files):
    g = load_model(tiny_files[Spec("gemma3", "f32")]).build_step(2, 8, 1)
    attention = [n for n in g.nodes if n.op == "attention"]
    assert [a.inputs[3].name for a in attention] == ["mask_swa", "mask"]
    ropes = [n for n in g.nodes if n.op == "rope"]
    assert [r.attr("freq_base") for r in ropes] == [10000.0, 10000.0, 1e6, 1e6]
    assert all(r.attr("mode") == "neox" for r in ropes)
    assert [a.attr("scale") for a in attention] == [pytest.approx(1 / np.sqrt(128))] * 2


def test_gemma3_sliding_window_changes_late_positions_only(tiny_files):
    model = load_model(tiny_files[Spec("gemma3", "f32")])
    session = ReferenceSession(model, 8)
    real = session.step(PROMPT)
    session = ReferenceSession(model, 8)
    session.masks = lambda pos: dict.fromkeys(("mask", "mask_swa"),
                                              ReferenceSession.masks(session, pos)["mask"])
    no_window = session.step(PROMPT)
    window = CONFIGS["gemma3"].sliding_window
    np.testing.assert_allclose(real[:window], no_window[:window], atol=1e-5, rtol=0)
    assert np.abs(real[window:] - no_window[window:]).max() > 1e-2


def test_gemma3_logits_are_soft_capped(tiny_files):
    logits = reference_logits(load_model(tiny_files[Spec("gemma3", "f32")]), PROMPT)
    assert np.abs(logits).max() < CONFIGS["gemma3"].final_logit_softcap


def test_default_model_step_graph_verifies(default_model_path):
    model = load_model(default_model_path)
    g = model.build_step(n_tokens=4, n_kv=32, n_outputs=1)
    verify(g)
    attention = [n for n in g.nodes if n.op == "attention"]
    assert [a.inputs[3].name for a in attention].count("mask") == 3
    assert g.outputs[0].shape == (1, 262144)


# ---- Mamba-2 layers (mamba2, granitehybrid) ----------------------------------------------------
@pytest.mark.parametrize("arch", SSM_ARCHS)
def test_ssm_step_contract(tiny_files, arch):
    """Caches of the attention layers, then conv/SSM state of the recurrent ones, in and out."""
    model = load_model(tiny_files[SsmSpec(arch)])
    cfg, hp = SSM_CONFIGS[arch], model.hparams
    assert model.attention_layers == cfg.attention_layers
    assert model.recurrent_layers == tuple(il for il in range(cfg.n_layer) if il not in cfg.attention_layers)
    g = model.build_step(n_tokens=3, n_kv=8, n_outputs=2)
    verify(g)
    caches = [f"{kind}_cache.{il}" for il in model.attention_layers for kind in "kv"]
    states = [f"{kind}_state.{il}" for il in model.recurrent_layers for kind in ("conv", "ssm")]
    assert [n.name for n in g.inputs] == ["tokens", "pos", "slots", "out_ids", "mask"] + caches + \
        ["state_src", "state_slots"] + states
    by_name = {n.name: n.type for n in g.inputs}
    conv_channels = cfg.d_inner + 2 * cfg.n_group * cfg.d_state
    for il in model.recurrent_layers:      # one plane of each state (StateLayout's default)
        assert str(by_name[f"conv_state.{il}"]) == f"f32[1, {(cfg.d_conv - 1) * conv_channels}]"
        assert str(by_name[f"ssm_state.{il}"]) == f"f32[1, {cfg.d_inner * cfg.d_state}]"
    logits, *updated = g.outputs
    assert logits.shape == (2, hp.n_vocab)
    assert [u.type for u in updated] == [by_name[n] for n in caches + states]
    assert all(u.op == "set_rows" for u in updated)


@pytest.mark.parametrize("arch", SSM_ARCHS)
def test_ssm_decode_with_returned_state_equals_longer_prefill(tiny_files, arch):
    model = load_model(tiny_files[SsmSpec(arch)])
    full = reference_logits(model, PROMPT, n_kv=8)
    session = ReferenceSession(model, n_kv=8)
    prefill = session.step(PROMPT[:3], out_ids=[2])
    decode = [session.step([t]) for t in PROMPT[3:]]
    np.testing.assert_allclose(prefill[0], full[2], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.concatenate(decode), full[3:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", SSM_ARCHS)
def test_ssm_state_carries_the_past(tiny_files, arch):
    """The tiny models' recurrent state matters: forgetting it changes the next logits a lot
    (so the decode tests against llama.cpp do test the carried state)."""
    model = load_model(tiny_files[SsmSpec(arch)])
    session = ReferenceSession(model, n_kv=8)
    session.step(PROMPT[:-1])
    carried = session.step(PROMPT[-1:])
    session = ReferenceSession(model, n_kv=8)
    session.step(PROMPT[:-1])
    for name in session.caches:          # the recurrent state only; KV caches stay
        if "_state." in name:
            session.caches[name] = np.zeros_like(session.caches[name])
    forgotten = session.step(PROMPT[-1:])
    assert nmse(forgotten, carried) > 1e-2


def test_granitehybrid_multipliers_and_no_rope(tiny_files):
    g = load_model(tiny_files[SsmSpec("granitehybrid")]).build_step(2, 8, 1)
    assert not [n for n in g.nodes if n.op == "rope"]
    assert [n.attr("scale") for n in g.nodes if n.op == "attention"] == [0.015625]
    scales = sorted({n.attr("scale") for n in g.nodes if n.op == "scale"})
    assert scales == pytest.approx(sorted([12.0, 0.22, 1 / 8.0]))
    assert sum(n.op == "ssm_scan" for n in g.nodes) == sum(n.op == "ssm_conv" for n in g.nodes) == 2


def test_missing_ssm_tensor_is_named(tmp_path):
    def drop(w):
        del w["blk.2.ssm_norm.weight"]
        return w
    path = write_ssm_gguf(tmp_path / "broken.gguf", SsmSpec("granitehybrid"), edit=drop)
    with pytest.raises(ModelFileError, match="'blk.2.ssm_norm.weight' is missing"):
        load_model(path)


# ---- broken files ----------------------------------------------------------------------------
def _broken(tmp_path, edit, name="broken.gguf"):
    return write_tiny_gguf(tmp_path / name, Spec("qwen3", "f32"), edit=edit)


def test_missing_tensor_is_named(tmp_path):
    def drop(w):
        del w["blk.1.attn_k_norm.weight"]
        return w
    with pytest.raises(ModelFileError, match="'blk.1.attn_k_norm.weight' is missing"):
        load_model(_broken(tmp_path, drop))


def test_wrong_shape_is_named(tmp_path):
    def shrink(w):
        w["blk.0.ffn_up.weight"] = w["blk.0.ffn_up.weight"][:256]
        return w
    with pytest.raises(ModelFileError, match=r"'blk.0.ffn_up.weight' has shape \[256, 256\], "
                                             r"expected \[512, 256\]"):
        load_model(_broken(tmp_path, shrink))


def test_unused_tensor_is_refused(tmp_path):
    def add(w):
        w["blk.0.ffn_gate_inp.weight"] = np.zeros((4, 256), np.float32)
        return w
    with pytest.raises(ModelFileError, match="does not use tensor.*ffn_gate_inp"):
        load_model(_broken(tmp_path, add))


def test_model_repr(tiny_files):
    model = load_model(tiny_files[Spec("llama", "f32")])
    assert isinstance(model, Model) and "llama" in repr(model) and "2 layers" in repr(model)
