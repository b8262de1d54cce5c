import math

import numpy as np
import pytest

from ember.models import load_model
from ember.models.gguf_file import ModelFileError
from ember.models.hparams import HParams

from tiny_gguf import CONFIGS, Spec
from tiny_gguf_ssm import SSM_CONFIGS, SsmSpec


def llama_metadata(**extra):
    meta = {"general.architecture": "llama", "llama.block_count": 4,
            "llama.embedding_length": 512, "llama.attention.head_count": 8,
            "llama.context_length": 2048, "llama.attention.layer_norm_rms_epsilon": 1e-5}
    meta.update(extra)
    return meta


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_tiny_file_hparams(tiny_files, arch):
    cfg = CONFIGS[arch]
    hp = load_model(tiny_files[Spec(arch, "q8_0")]).hparams
    assert (hp.arch, hp.n_layer, hp.n_embd, hp.n_ff) == (arch, cfg.n_layer, cfg.n_embd, cfg.n_ff)
    assert (hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v, hp.n_rot) == \
        (cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim, cfg.head_dim)
    assert hp.n_vocab == cfg.n_vocab and hp.n_ctx_train == cfg.n_ctx
    assert hp.rope_freq_base == cfg.rope_base and hp.rope_freq_scale == 1.0
    assert hp.rms_eps == pytest.approx(cfg.rms_eps)
    assert hp.attn_scale == pytest.approx(1 / math.sqrt(cfg.head_dim))
    assert hp.n_embd_k_gqa == cfg.n_head_kv * cfg.head_dim


def test_tiny_gemma3_sliding_window(tiny_files):
    hp = load_model(tiny_files[Spec("gemma3", "f32")]).hparams
    assert hp.sliding_window == 3 and hp.swa_layers == (True, False) and hp.uses_swa
    assert [hp.rope_base(il) for il in range(2)] == [10000.0, 1e6]
    assert hp.final_logit_softcap == 30.0


def test_defaults_follow_llama_cpp():
    hp = HParams.from_metadata(llama_metadata())
    assert hp.n_head_kv == 8 and hp.head_dim_k == hp.head_dim_v == hp.n_rot == 64
    assert hp.rope_freq_base == 10000.0 and hp.rope_freq_scale == 1.0
    assert hp.swa_layers == (False,) * 4 and not hp.uses_swa
    assert hp.final_logit_softcap == 0.0


def test_linear_rope_scaling():
    hp = HParams.from_metadata(llama_metadata(**{"llama.rope.scaling.type": "linear",
                                                 "llama.rope.scaling.factor": 4.0}))
    assert hp.rope_freq_scale == 0.25 and hp.rope_scaling_type == "linear"
    old_key = HParams.from_metadata(llama_metadata(**{"llama.rope.scale_linear": 2.0}))
    assert old_key.rope_freq_scale == 0.5


def test_unsupported_rope_scaling_is_refused():
    with pytest.raises(ModelFileError, match="rope scaling 'yarn' is not supported.*linear"):
        HParams.from_metadata(llama_metadata(**{"llama.rope.scaling.type": "yarn"}))


def test_missing_required_key():
    meta = llama_metadata()
    del meta["llama.attention.layer_norm_rms_epsilon"]
    with pytest.raises(ModelFileError, match="llama.attention.layer_norm_rms_epsilon"):
        HParams.from_metadata(meta)


def test_wrongly_typed_key():
    with pytest.raises(ModelFileError, match="llama.block_count.*not a int"):
        HParams.from_metadata(llama_metadata(**{"llama.block_count": "four"}))


def test_per_layer_arrays():
    uniform = HParams.from_metadata(llama_metadata(**{"llama.attention.head_count_kv":
                                                      np.array([2, 2, 2, 2], np.uint32)}))
    assert uniform.n_head_kv == 2
    with pytest.raises(ModelFileError, match="differs between layers"):
        HParams.from_metadata(llama_metadata(**{"llama.attention.head_count_kv":
                                                np.array([2, 4, 2, 2], np.uint32)}))


def test_bad_head_counts():
    with pytest.raises(ModelFileError, match="not a multiple of head_count_kv"):
        HParams.from_metadata(llama_metadata(**{"llama.attention.head_count_kv": 3}))


def gemma3_metadata(n_layer, **extra):
    meta = {"general.architecture": "gemma3", "gemma3.block_count": n_layer,
            "gemma3.embedding_length": 640, "gemma3.attention.head_count": 4,
            "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 256,
            "gemma3.attention.value_length": 256, "gemma3.context_length": 32768,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.rope.freq_base": 1e6,
            "gemma3.attention.sliding_window": 512}
    meta.update(extra)
    return meta


def test_gemma3_default_pattern_every_sixth_layer_global():
    hp = HParams.from_metadata(gemma3_metadata(18))
    assert [il for il in range(18) if not hp.is_swa(il)] == [5, 11, 17]
    assert [hp.rope_base(il) for il in (0, 5)] == [10000.0, 1e6]
    assert hp.attn_scale == 1 / 16


def test_gemma3_pattern_period_and_array_and_swa_base():
    period = HParams.from_metadata(gemma3_metadata(4, **{"gemma3.attention.sliding_window_pattern": 2}))
    assert period.swa_layers == (True, False, True, False)
    array = HParams.from_metadata(gemma3_metadata(
        3, **{"gemma3.attention.sliding_window_pattern": np.array([False, True, True]),
              "gemma3.rope.freq_base_swa": 5000.0}))
    assert array.swa_layers == (False, True, True)
    assert [array.rope_base(il) for il in range(3)] == [1e6, 5000.0, 5000.0]


def test_gemma3_without_window_has_no_swa_layers():
    meta = gemma3_metadata(6)
    del meta["gemma3.attention.sliding_window"]
    hp = HParams.from_metadata(meta)
    assert not hp.uses_swa and hp.rope_base(0) == 1e6


def test_gemma3_27b_query_scale():
    hp = HParams.from_metadata(gemma3_metadata(62, **{"gemma3.embedding_length": 5376,
                                                      "gemma3.attention.head_count": 32,
                                                      "gemma3.attention.key_length": 128}))
    assert hp.attn_scale == pytest.approx(1 / math.sqrt(5376 / 32))


def test_default_model_hparams(default_model_path):
    hp = load_model(default_model_path).hparams
    assert (hp.arch, hp.n_layer, hp.n_embd, hp.n_ff) == ("gemma3", 18, 640, 2048)
    assert (hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.n_vocab) == (4, 1, 256, 262144)
    assert hp.sliding_window == 512 and hp.swa_layers.count(False) == 3
    assert hp.rope_freq_base == 1e6 and hp.rope_freq_base_swa == 10000.0
    assert hp.attn_scale == 1 / 16 and hp.final_logit_softcap == 0.0


# ---- Mamba-2 layers ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(SSM_CONFIGS))
def test_tiny_ssm_file_hparams(tiny_files, arch):
    cfg = SSM_CONFIGS[arch]
    hp = load_model(tiny_files[SsmSpec(arch)]).hparams
    assert (hp.ssm_d_conv, hp.ssm_d_inner, hp.ssm_d_state, hp.ssm_n_head, hp.ssm_n_group) == \
        (cfg.d_conv, cfg.d_inner, cfg.d_state, cfg.n_ssm_head, cfg.n_group)
    assert hp.recurrent_layers == tuple(il not in cfg.attention_layers for il in range(cfg.n_layer))
    assert hp.attention_layers == cfg.attention_layers
    assert hp.conv_state_shape == (cfg.d_conv - 1, cfg.d_inner + 2 * cfg.n_group * cfg.d_state)
    assert hp.ssm_state_shape == (cfg.n_ssm_head, cfg.d_inner // cfg.n_ssm_head, cfg.d_state)


def test_tiny_granitehybrid_multipliers(tiny_files):
    hp = load_model(tiny_files[SsmSpec("granitehybrid")]).hparams
    assert (hp.n_head, hp.n_head_kv, hp.head_dim_k) == (4, 2, 64)
    assert hp.embedding_scale == 12.0 and hp.residual_scale == pytest.approx(0.22)
    assert hp.attn_scale == 0.015625 and hp.logit_scale == 8.0 and not hp.use_rope


def granite_metadata(**extra):
    meta = {"general.architecture": "granitehybrid", "granitehybrid.block_count": 3,
            "granitehybrid.embedding_length": 256, "granitehybrid.attention.head_count": 4,
            "granitehybrid.attention.head_count_kv": np.array([0, 2, 0], np.uint32),
            "granitehybrid.context_length": 2048,
            "granitehybrid.attention.layer_norm_rms_epsilon": 1e-5,
            "granitehybrid.ssm.conv_kernel": 4, "granitehybrid.ssm.inner_size": 512,
            "granitehybrid.ssm.state_size": 16, "granitehybrid.ssm.time_step_rank": 8,
            "granitehybrid.ssm.group_count": 1}
    meta.update(extra)
    return meta


def test_hybrid_layers_follow_head_count_kv():
    hp = HParams.from_metadata(granite_metadata())
    assert hp.recurrent_layers == (True, False, True) and hp.n_head_kv == 2
    assert hp.use_rope and hp.attn_scale == pytest.approx(1 / 8)     # llama.cpp's defaults


def test_hybrid_attention_layers_must_agree():
    bad = granite_metadata(**{"granitehybrid.attention.head_count_kv": np.array([0, 2, 4], np.uint32)})
    with pytest.raises(ModelFileError, match="differs between layers"):
        HParams.from_metadata(bad)


def test_bad_ssm_sizes_and_moe_are_refused():
    with pytest.raises(ModelFileError, match="required metadata 'granitehybrid.ssm.state_size'"):
        meta = granite_metadata()
        del meta["granitehybrid.ssm.state_size"]
        HParams.from_metadata(meta)
    with pytest.raises(ModelFileError, match="not a multiple of the 8 ssm heads"):
        HParams.from_metadata(granite_metadata(**{"granitehybrid.ssm.inner_size": 500}))
    with pytest.raises(ModelFileError, match="mixture-of-experts"):
        HParams.from_metadata(granite_metadata(**{"granitehybrid.expert_count": 8}))


# ---- gated-DeltaNet hybrids ----------------------------------------------------------------
def qwen35moe_metadata(**extra):
    a = "qwen35moe"
    meta = {"general.architecture": a, f"{a}.block_count": 8, f"{a}.embedding_length": 256,
            f"{a}.attention.head_count": 4, f"{a}.attention.head_count_kv": 2,
            f"{a}.attention.key_length": 64, f"{a}.attention.value_length": 64,
            f"{a}.context_length": 4096, f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
            f"{a}.rope.dimension_sections": np.array([11, 11, 10, 0], np.int32),
            f"{a}.ssm.conv_kernel": 4, f"{a}.ssm.inner_size": 512, f"{a}.ssm.state_size": 128,
            f"{a}.ssm.time_step_rank": 4, f"{a}.ssm.group_count": 2,
            f"{a}.expert_count": 16, f"{a}.expert_used_count": 4,
            f"{a}.expert_feed_forward_length": 64, f"{a}.expert_shared_feed_forward_length": 96}
    meta.update({k.format(arch=a): v for k, v in extra.items()})
    return meta


def test_delta_net_layers_follow_full_attention_interval():
    hp = HParams.from_metadata(qwen35moe_metadata())          # llama.cpp's default interval: 4
    assert hp.recurrent_layers == (True, True, True, False) * 2
    assert hp.conv_state_shape == (3, 2 * 2 * 128 + 512) and hp.ssm_state_shape == (4, 128, 128)
    assert (hp.n_expert, hp.n_expert_used, hp.n_ff_exp, hp.n_ff_shexp) == (16, 4, 64, 96)
    assert hp.rope_sections == (11, 11, 10, 0)
    hp = HParams.from_metadata(qwen35moe_metadata(**{"{arch}.full_attention_interval": 2}))
    assert hp.recurrent_layers == (True, False) * 4
    listed = np.array([1, 0, 0, 1, 1, 1, 0, 1], np.int8)
    hp = HParams.from_metadata(qwen35moe_metadata(**{"{arch}.attention.recurrent_layers": listed}))
    assert hp.recurrent_layers == tuple(bool(v) for v in listed)


@pytest.mark.parametrize("extra, message", [
    ({"{arch}.ssm.inner_size": 500}, r"ssm inner size 500 must be the 4 v heads times the state size 128"),
    ({"{arch}.expert_used_count": 17}, r"expert_used_count 17 must be in \[1, expert_count 16\]"),
    ({"{arch}.ssm.time_step_rank": 3}, r"ssm heads 3 are not a multiple of the 2 groups"),
], ids=["state size", "experts used", "head split"])
def test_bad_delta_net_hparams_are_refused(extra, message):
    with pytest.raises(ModelFileError, match=message):
        HParams.from_metadata(qwen35moe_metadata(**extra))


def test_qwen35_needs_rope_sections():
    meta = qwen35moe_metadata()
    del meta["qwen35moe.rope.dimension_sections"]
    with pytest.raises(ModelFileError, match="qwen35moe.rope.dimension_sections"):
        HParams.from_metadata(meta)
