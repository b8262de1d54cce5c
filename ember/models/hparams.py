"""Hyper-parameters of a model, read from GGUF metadata the way llama.cpp reads them.

Defaults follow llama.cpp's `llama_model::load_hparams` (llama-model.cpp) and the per-architecture
`load_arch_hparams`: head_count_kv defaults to head_count, key/value length to n_embd / n_head,
the rope dimension count to the key length, the rope base to 10000. Imports only the GGUF reader.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from gguf.constants import Keys

from ember.models.gguf_file import ModelFileError

# rope.scaling.type values whose effect is a plain frequency scale (ggml's ext_factor stays 0).
# llama-3's scaling needs no type: it comes as the `rope_freqs.weight` tensor (freq factors).
SUPPORTED_ROPE_SCALING = ("none", "linear")

# gemma3 in llama.cpp: without an explicit pattern every 6th layer is global (full attention),
# the others use the sliding window; local layers rotate with their own base (default 10000).
GEMMA3_SWA_PERIOD = 6
DEFAULT_ROPE_BASE_SWA = 10000.0

# The older name of rope.scaling.factor, still read by llama.cpp; gguf.constants no longer has it.
ROPE_SCALE_LINEAR = "{arch}.rope.scale_linear"

# gemma4 (llama.cpp's models/gemma4.cpp): sliding-window layers with their own head size and
# rotated dimensions, the last shared_kv_layers layers reading the KV cache of an earlier layer,
# per-layer FFN widths and per-layer token embeddings; queries are not scaled (attn scale 1).
GEMMA4_ARCHS = ("gemma4",)

# Architectures with recurrent layers (llm_arch_is_recurrent / llm_arch_is_hybrid). mamba2: every
# layer is Mamba-2. granitehybrid, nemotron_h, lfm2, jamba: head_count_kv is per layer, and a layer
# without KV heads is recurrent (nemotron_h: unless its feed_forward_length is set, which makes it
# an FFN-only layer; lfm2's and lfm2moe's recurrent layers are short convolutions, jamba's Mamba-1).
# falcon-h1: every layer runs attention and Mamba-2 side by side.
RECURRENT_ARCHS = ("mamba2",)
HYBRID_ARCHS = ("granitehybrid", "nemotron_h", "lfm2", "lfm2moe", "jamba")
SHORTCONV_ARCHS = ("lfm2", "lfm2moe")
PARALLEL_HYBRID_ARCHS = ("falcon-h1",)
MAMBA2_ARCHS = ("mamba2", "granitehybrid", "nemotron_h", "falcon-h1")
# Mamba-1 layers (llama.cpp's build_mamba_layer): ssm.time_step_rank is the rank of dt's low-rank
# projection (dt_rank), not a head count; A is per channel and state entry; no groups.
MAMBA1_ARCHS = ("jamba",)

# Gated-DeltaNet hybrids (llama.cpp's qwen3next.cpp, qwen35.cpp, qwen35moe.cpp): DeltaNet layers
# and gated full-attention layers; a layer is full attention every full_attention_interval
# layers (default 4) unless {arch}.attention.recurrent_layers lists each layer. Their ssm.* keys
# mean: state_size = the head size of q, k and v (S), group_count = q/k heads, time_step_rank =
# v heads, inner_size = v heads * S. qwen3next and qwen35moe have a mixture of experts.
DELTA_NET_ARCHS = ("qwen3next", "qwen35", "qwen35moe")
MOE_ARCHS = ("qwen3next", "qwen35moe")
# llama.cpp's llama_expert_gating_func_type values ember reads ({arch}.expert_gating_func)
EXPERT_GATING = {1: "softmax", 2: "sigmoid"}
DEFAULT_FULL_ATTENTION_INTERVAL = 4
RECURRENT_LAYERS_KEY = "{arch}.attention.recurrent_layers"
# llama.cpp's LLAMA_MAX_LAYERS: a header asking for more is refused before anything is sized
# per layer (block_count = 2**31 - 1 once built 16 GiB of per-layer tuples).
MAX_LAYERS = 512
# Multipliers (granite's embedding, residual and logit scales, an attention scale) must stay in
# this range, else a logit divided by one overflows f32 (logit_scale = 1e-45 printed <unk>s).
MAX_MULTIPLIER = 2.0 ** 20
# A rotation angle p * freq_scale must stay an exact f32 integer over the training context.
MAX_ROPE_POSITION = 2 ** 24


@dataclass(frozen=True)
class HParams:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_rot: int                      # rotated dimensions of each head (from the front)
    n_ctx_train: int
    n_vocab: int
    rms_eps: float
    rope_freq_base: float
    rope_freq_scale: float = 1.0    # 1 / rope.scaling.factor (linear scaling)
    rope_scaling_type: str = "none"
    rope_freq_base_swa: float = DEFAULT_ROPE_BASE_SWA
    rope_freq_scale_swa: float = 1.0
    sliding_window: int = 0         # keys this many positions back or more are hidden; 0: none
    swa_layers: tuple[bool, ...] = field(default=())
    attn_scale: float = 0.0         # 0: 1/sqrt(head_dim_k)
    final_logit_softcap: float = 0.0
    use_rope: bool = True           # granitehybrid: rope.scaling.finetuned false means no rope;
                                    # nemotron_h attends without positions
    embedding_scale: float = 0.0    # granite multipliers; 0: not applied
    residual_scale: float = 0.0
    logit_scale: float = 0.0        # logits are divided by it
    # Mamba-2 layers: which layers are recurrent, and the ssm.* sizes (ssm_n_head is the GGUF's
    # ssm.time_step_rank, which Mamba-2 uses as its head count).
    recurrent_layers: tuple[bool, ...] = field(default=())
    # Which layers have a KV cache; by default the layers that are not recurrent (falcon-h1's
    # layers are both, nemotron_h's FFN-only layers neither).
    attention_flags: tuple[bool, ...] = field(default=())
    # lfm2's short convolution: its window (shortconv.l_cache); its recurrent layers carry only
    # the last l_cache - 1 rows of B*x (conv state), no SSM state.
    shortconv_l_cache: int = 0
    ssm_d_conv: int = 0
    ssm_d_inner: int = 0
    ssm_d_state: int = 0
    ssm_n_head: int = 0
    ssm_n_group: int = 0
    # Mamba-1 (MAMBA1_ARCHS): the rank of dt's projection; 0 for Mamba-2 and DeltaNet layers. A
    # Mamba-1 layer is a scan over d_inner heads of one channel (ssm_n_head = d_inner, one group)
    # whose convolution sees x alone (no B and C channels).
    ssm_dt_rank: int = 0
    # Mixture of experts (MOE_ARCHS, lfm2moe): experts, experts used per token, the width of one
    # expert's FFN and of the shared expert (0: none), the factor on the selected weights (0:
    # none), the router's gating function, and the leading layers that keep a dense FFN (lfm2moe).
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    expert_weights_scale: float = 0.0
    expert_gating: str = "softmax"
    n_layer_dense_lead: int = 0
    rope_sections: tuple[int, ...] = field(default=())    # qwen35: the imrope sections (t, h, w, e)
    # gemma4: the sliding-window layers' head sizes and rotated dimensions (0: the same as the
    # other layers'), each layer's FFN width (empty: n_ff everywhere), the layer whose KV cache
    # each layer reads (empty: its own; llama.cpp's n_layer_kv_from_start and layer reuse), and
    # the width of the per-layer token embeddings (0: none).
    head_dim_k_swa: int = 0
    head_dim_v_swa: int = 0
    n_rot_swa: int = 0
    ff_widths: tuple[int, ...] = field(default=())
    kv_sources: tuple[int, ...] = field(default=())
    n_embd_per_layer: int = 0

    def __post_init__(self):
        if not self.swa_layers:
            object.__setattr__(self, "swa_layers", (False,) * self.n_layer)
        if not self.recurrent_layers:
            object.__setattr__(self, "recurrent_layers", (False,) * self.n_layer)
        if not self.attention_flags:
            object.__setattr__(self, "attention_flags", tuple(not r for r in self.recurrent_layers))
        if not self.attn_scale and self.head_dim_k > 0:   # else refused by the reader's check
            object.__setattr__(self, "attn_scale", 1.0 / math.sqrt(self.head_dim_k))
        defaults = dict(head_dim_k_swa=self.head_dim_k, head_dim_v_swa=self.head_dim_v, n_rot_swa=self.n_rot,
                        ff_widths=(self.n_ff,) * self.n_layer, kv_sources=tuple(range(self.n_layer)))
        for name, value in defaults.items():
            if not getattr(self, name):
                object.__setattr__(self, name, value)

    @property
    def n_embd_k_gqa(self) -> int:
        """Width of one K cache row: all KV heads of one token."""
        return self.n_head_kv * self.head_dim_k

    @property
    def n_embd_v_gqa(self) -> int:
        return self.n_head_kv * self.head_dim_v

    def head_dim(self, il: int, which: str = "k") -> int:
        """Layer il's head size of K ("k") or V ("v"): a sliding-window layer's may differ."""
        if self.is_swa(il):
            return self.head_dim_k_swa if which == "k" else self.head_dim_v_swa
        return self.head_dim_k if which == "k" else self.head_dim_v

    def kv_width(self, il: int, which: str = "k") -> int:
        """Width of one row of layer il's K or V cache: all KV heads of one token."""
        return self.n_head_kv * self.head_dim(il, which)

    def rot_dims(self, il: int) -> int:
        """Rotated dimensions of each head of layer il (from the front)."""
        return self.n_rot_swa if self.is_swa(il) else self.n_rot

    def ff_width(self, il: int) -> int:
        return self.ff_widths[il]

    def kv_source(self, il: int) -> int:
        """The layer whose KV cache layer il attends over (il itself unless it shares one)."""
        return self.kv_sources[il]

    @property
    def uses_swa(self) -> bool:
        return self.sliding_window > 0 and any(self.swa_layers)

    def is_swa(self, il: int) -> bool:
        return self.sliding_window > 0 and self.swa_layers[il]

    def is_recurrent(self, il: int) -> bool:
        return self.recurrent_layers[il]

    def has_attention(self, il: int) -> bool:
        return self.attention_flags[il]

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers with a KV cache, in order."""
        return tuple(il for il in range(self.n_layer) if self.attention_flags[il])

    @property
    def recurrent_layer_ids(self) -> tuple[int, ...]:
        """The layers with recurrent state (conv and SSM state), in order."""
        return tuple(il for il in range(self.n_layer) if self.recurrent_layers[il])

    @property
    def ssm_head_dim(self) -> int:
        return self.ssm_d_inner // self.ssm_n_head

    @property
    def is_mamba1(self) -> bool:
        return self.ssm_dt_rank > 0

    @property
    def ssm_conv_channels(self) -> int:
        """Channels of the causal convolution: x, B and C of every group (Mamba-2, DeltaNet), x
        alone (Mamba-1: B and C come after it, from ssm_x)."""
        if self.is_mamba1:
            return self.ssm_d_inner
        return self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state

    @property
    def state_kinds(self) -> tuple[str, ...]:
        """The states of one recurrent layer, in the step graph's order: a short convolution
        (lfm2) carries its conv state only, a Mamba-2 layer its conv and SSM state."""
        return ("conv",) if self.shortconv_l_cache else ("conv", "ssm")

    @property
    def conv_state_shape(self) -> tuple[int, int]:
        if self.shortconv_l_cache:
            return (self.shortconv_l_cache - 1, self.n_embd)
        return (self.ssm_d_conv - 1, self.ssm_conv_channels)

    @property
    def ssm_state_shape(self) -> tuple[int, int, int]:
        return (self.ssm_n_head, self.ssm_head_dim, self.ssm_d_state)

    def rope_base(self, il: int) -> float:
        return self.rope_freq_base_swa if self.is_swa(il) else self.rope_freq_base

    def rope_scale(self, il: int) -> float:
        return self.rope_freq_scale_swa if self.is_swa(il) else self.rope_freq_scale

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], source: str = "<metadata>") -> "HParams":
        return _Reader(metadata, source).hparams()


class _Reader:
    """Typed metadata lookups that fail with a ModelFileError naming the key."""

    def __init__(self, metadata: Mapping[str, Any], source: str):
        self.meta, self.source = metadata, source
        arch = metadata.get(Keys.General.ARCHITECTURE)
        if not isinstance(arch, str):
            raise ModelFileError(f"{source}: metadata has no {Keys.General.ARCHITECTURE!r}")
        self.arch = arch

    def key(self, template: str) -> str:
        return template.format(arch=self.arch)

    def get(self, template: str, kind: type, default=None, required: bool = False):
        key = self.key(template)
        if key not in self.meta:
            if required:
                raise ModelFileError(f"{self.source}: required metadata {key!r} is missing")
            return default
        value = self.meta[key]
        if kind is int and isinstance(value, np.ndarray) and value.ndim == 1 and value.size:
            # llama.cpp's get_key_or_arr: a per-layer array; ember supports uniform layers only.
            if np.any(value != value[0]):
                raise ModelFileError(f"{self.source}: {key!r} differs between layers "
                                     f"({value.tolist()}); ember supports uniform layers only")
            value = value[0].item()
        ok = {int: lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float, np.floating)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str),
              bool: lambda v: isinstance(v, (bool, np.bool_))}[kind](value)
        if not ok:
            shown = f"an array of {len(value)}" if isinstance(value, (np.ndarray, list)) else repr(value)[:60]
            raise ModelFileError(f"{self.source}: metadata {key!r} = {shown} is not a {kind.__name__}")
        return kind(value)

    def hparams(self) -> HParams:
        n_embd = self.get(Keys.LLM.EMBEDDING_LENGTH, int, required=True)
        n_layer = self.get(Keys.LLM.BLOCK_COUNT, int, required=True)
        if not 0 < n_layer <= MAX_LAYERS:
            raise ModelFileError(f"{self.source}: metadata {self.key(Keys.LLM.BLOCK_COUNT)!r} = {n_layer} "
                                 f"is outside 1..{MAX_LAYERS} (llama.cpp's layer limit)")
        layers = self.layer_kinds(n_layer)
        n_head = layers.pop("n_head")
        head_dim_k = self.get(Keys.Attention.KEY_LENGTH, int, n_embd // max(n_head, 1))
        n_vocab = self.get(Keys.LLM.VOCAB_SIZE, int, None)
        if n_vocab is None:
            tokens = self.meta.get(Keys.Tokenizer.LIST, ())
            n_vocab = len(tokens) if isinstance(tokens, (list, np.ndarray)) else 0   # else: the tokenizer refuses it
        values = dict(
            arch=self.arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            head_dim_k=head_dim_k,
            head_dim_v=self.get(Keys.Attention.VALUE_LENGTH, int, n_embd // max(n_head, 1)),
            n_rot=self.get(Keys.Rope.DIMENSION_COUNT, int, head_dim_k),
            n_ctx_train=self.get(Keys.LLM.CONTEXT_LENGTH, int, required=True),
            n_vocab=n_vocab,
            rms_eps=self.get(Keys.Attention.LAYERNORM_RMS_EPS, float, required=True),
            rope_freq_base=self.get(Keys.Rope.FREQ_BASE, float, 10000.0),
            **layers,
        )
        values.update(self.rope_scaling())
        if self.arch == "gemma3":
            values.update(self.gemma3(values))
        if self.arch in GEMMA4_ARCHS:
            values.update(self.gemma4(values))
        if self.arch in MAMBA2_ARCHS:
            values.update(self.mamba2(values))
        if self.arch == "granitehybrid":
            values.update(self.granite())
        if self.arch in SHORTCONV_ARCHS:
            values.update(self.lfm2())
        if self.arch == "lfm2moe":
            values.update(self.lfm2moe(values))
        if self.arch == "nemotron_h":
            values["use_rope"] = False          # llama.cpp: LLAMA_ROPE_TYPE_NONE
        if self.arch in DELTA_NET_ARCHS:
            values.update(self.mamba2(values))
            values.update(self.delta_net(values))
        if self.arch in MAMBA1_ARCHS:
            values.update(self.mamba1(values))
        hp = HParams(**values)
        self.check(hp)
        return hp

    def layer_kinds(self, n_layer: int) -> dict:
        """n_head, n_head_kv, n_ff and which layers are recurrent or attend. A hybrid's
        head_count_kv (and nemotron_h's feed_forward_length, and possibly head_count) is per
        layer: 0 KV heads mark a recurrent layer (llama.cpp's granitehybrid, lfm2); in nemotron_h
        a layer with a feed_forward_length is an FFN-only layer, one without KV heads and FFN a
        Mamba-2 layer, the others attention layers. The layers of one kind must agree on the
        sizes (ember supports uniform layers only)."""
        if self.arch in GEMMA4_ARCHS:      # llama.cpp's n_ff(il): the width may differ by layer
            n_head = self.get(Keys.Attention.HEAD_COUNT, int, required=True)
            ff = self.per_layer(Keys.LLM.FEED_FORWARD_LENGTH, n_layer, required=True)
            return dict(n_head=n_head, n_head_kv=self.get(Keys.Attention.HEAD_COUNT_KV, int, n_head),
                        n_ff=max(ff), ff_widths=ff)
        if self.arch not in HYBRID_ARCHS + PARALLEL_HYBRID_ARCHS:
            n_head = self.get(Keys.Attention.HEAD_COUNT, int, required=True)
            return dict(n_head=n_head, n_head_kv=self.get(Keys.Attention.HEAD_COUNT_KV, int, n_head),
                        n_ff=self.get(Keys.LLM.FEED_FORWARD_LENGTH, int, 0))
        heads = self.per_layer(Keys.Attention.HEAD_COUNT, n_layer, required=True)
        n_head = self.shared(Keys.Attention.HEAD_COUNT, heads)
        kv = self.per_layer(Keys.Attention.HEAD_COUNT_KV, n_layer, default=n_head)
        ff = self.per_layer(Keys.LLM.FEED_FORWARD_LENGTH, n_layer, default=0)
        if self.arch in PARALLEL_HYBRID_ARCHS:
            recurrent, attention = (True,) * n_layer, (True,) * n_layer
        elif self.arch == "nemotron_h":
            recurrent = tuple(k == 0 and f == 0 for k, f in zip(kv, ff))
            attention = tuple(k > 0 and f == 0 for k, f in zip(kv, ff))
        else:
            recurrent = tuple(k == 0 for k in kv)
            attention = tuple(not r for r in recurrent)
        return dict(n_head=n_head, n_head_kv=self.shared(Keys.Attention.HEAD_COUNT_KV, kv),
                    n_ff=self.shared(Keys.LLM.FEED_FORWARD_LENGTH, ff),
                    recurrent_layers=recurrent, attention_flags=attention)

    def per_layer(self, template: str, n_layer: int, default: int = 0,
                  required: bool = False) -> tuple[int, ...]:
        """An int that may be one value per layer (llama.cpp's get_key_or_arr)."""
        key = self.key(template)
        value = self.meta.get(key)
        if not isinstance(value, np.ndarray):
            return (self.get(template, int, default, required),) * n_layer
        if value.size != n_layer:
            raise ModelFileError(f"{self.source}: {key!r} has {value.size} entries for {n_layer} layers")
        if value.dtype.kind not in "iu":
            raise ModelFileError(f"{self.source}: metadata {key!r} = {value.tolist()} is not a list of ints")
        return tuple(int(v) for v in value)

    def shared(self, template: str, values: tuple[int, ...]) -> int:
        """The one non-zero value of a per-layer int (0 when every layer has 0)."""
        nonzero = sorted(set(values) - {0})
        if len(nonzero) > 1:
            raise ModelFileError(f"{self.source}: {self.key(template)!r} differs between layers "
                                 f"({list(values)}); ember supports uniform layers only")
        return nonzero[0] if nonzero else 0

    def lfm2(self) -> dict:
        """llama_model_lfm2::load_arch_hparams (no sliding window); lfm2moe's too."""
        key = self.key(Keys.Attention.SLIDING_WINDOW)
        if self.get(Keys.Attention.SLIDING_WINDOW, int, 0) > 0:
            raise ModelFileError(f"{self.source}: {key!r} is set; ember's {self.arch} has no "
                                 "sliding-window attention")
        return dict(shortconv_l_cache=self.get(Keys.ShortConv.L_CACHE, int, required=True))

    def lfm2moe(self, values: dict) -> dict:
        """llama_model_lfm2moe::load_arch_hparams: the routed experts (no shared expert), the
        gating function (required), the leading dense layers (default none)."""
        key = self.key(Keys.LLM.EXPERT_GATING_FUNC)
        gating = self.get(Keys.LLM.EXPERT_GATING_FUNC, int, required=True)
        if gating not in EXPERT_GATING:
            raise ModelFileError(f"{self.source}: {key!r} = {gating} is not supported "
                                 f"(supported: {', '.join(f'{k} ({v})' for k, v in EXPERT_GATING.items())})")
        dense = self.get(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, int, 0)
        if not 0 <= dense <= values["n_layer"]:
            raise ModelFileError(f"{self.source}: {self.key(Keys.LLM.LEADING_DENSE_BLOCK_COUNT)!r} = "
                                 f"{dense} must be in [0, block_count {values['n_layer']}]")
        return dict(n_expert=self.get(Keys.LLM.EXPERT_COUNT, int, required=True),
                    n_expert_used=self.get(Keys.LLM.EXPERT_USED_COUNT, int, required=True),
                    n_ff_exp=self.get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, int, required=True),
                    expert_gating=EXPERT_GATING[gating], n_layer_dense_lead=dense)

    def mamba2(self, values: dict) -> dict:
        """load_arch_hparams of mamba2, granitehybrid, nemotron_h and falcon-h1 (and of the DeltaNet
        hybrids, which reuse the keys): the ssm.* sizes."""
        out = dict(
            ssm_d_conv=self.get(Keys.SSM.CONV_KERNEL, int, required=True),
            ssm_d_inner=self.get(Keys.SSM.INNER_SIZE, int, required=True),
            ssm_d_state=self.get(Keys.SSM.STATE_SIZE, int, required=True),
            ssm_n_head=self.get(Keys.SSM.TIME_STEP_RANK, int, required=True),
            ssm_n_group=self.get(Keys.SSM.GROUP_COUNT, int, required=True),
        )
        if self.arch in RECURRENT_ARCHS:
            out["recurrent_layers"] = (True,) * values["n_layer"]
        return out

    def mamba1(self, values: dict) -> dict:
        """llama_model_jamba::load_arch_hparams: the ssm.* sizes (time_step_rank is dt's rank),
        and the experts of the mixture-of-experts layers (those with a router tensor); jamba
        reads no expert width (an expert is n_ff wide) and no weights scale."""
        d_inner = self.get(Keys.SSM.INNER_SIZE, int, required=True)
        return dict(ssm_d_conv=self.get(Keys.SSM.CONV_KERNEL, int, required=True),
                    ssm_d_inner=d_inner,
                    ssm_d_state=self.get(Keys.SSM.STATE_SIZE, int, required=True),
                    ssm_dt_rank=self.get(Keys.SSM.TIME_STEP_RANK, int, required=True),
                    ssm_n_head=d_inner, ssm_n_group=1,
                    n_expert=self.get(Keys.LLM.EXPERT_COUNT, int, 0),
                    n_expert_used=self.get(Keys.LLM.EXPERT_USED_COUNT, int, 0),
                    n_ff_exp=values["n_ff"], use_rope=False)                  # "No RoPE :)" (llama.cpp's jamba graph)

    def delta_net(self, values: dict) -> dict:
        """llama_model_qwen3next / qwen35 / qwen35moe::load_arch_hparams: which layers are
        recurrent, the expert sizes, the rope sections."""
        n_layer = values["n_layer"]
        key = self.key(RECURRENT_LAYERS_KEY)
        listed = self.meta.get(key)
        if isinstance(listed, np.ndarray):
            if listed.size != n_layer:
                raise ModelFileError(f"{self.source}: {key!r} has {listed.size} entries for {n_layer} layers")
            recurrent = tuple(bool(v) for v in listed)
        else:
            interval = self.get(Keys.LLM.FULL_ATTENTION_INTERVAL, int, DEFAULT_FULL_ATTENTION_INTERVAL)
            if interval <= 0:
                raise ModelFileError(f"{self.source}: {self.key(Keys.LLM.FULL_ATTENTION_INTERVAL)!r} "
                                     f"= {interval} must be positive")
            recurrent = tuple((il + 1) % interval != 0 for il in range(n_layer))
        out = dict(recurrent_layers=recurrent)
        if self.arch in MOE_ARCHS:
            n_used = self.get(Keys.LLM.EXPERT_USED_COUNT, int, required=True)
            n_ff = values["n_ff"]
            out.update(n_expert=self.get(Keys.LLM.EXPERT_COUNT, int, required=True),
                       n_expert_used=n_used,
                       n_ff_exp=self.get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, int, 0) or n_ff // max(n_used, 1),
                       n_ff_shexp=self.get(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, int, 0) or n_ff,
                       expert_weights_scale=self.get(Keys.LLM.EXPERT_WEIGHTS_SCALE, float, 0.0))
        if self.arch != "qwen3next":
            key = self.key(Keys.Rope.DIMENSION_SECTIONS)
            sections = self.meta.get(key)
            if not isinstance(sections, np.ndarray) or sections.size < 4:
                raise ModelFileError(f"{self.source}: required metadata {key!r} (4 rope sections) is "
                                     f"missing or short: {sections!r}")
            out["rope_sections"] = tuple(int(v) for v in sections[:4])
        return out

    def granite(self) -> dict:
        """llama_model_granite_hybrid::load_arch_hparams (dense FFN only)."""
        if self.get(Keys.LLM.EXPERT_COUNT, int, 0) > 0:
            raise ModelFileError(f"{self.source}: a mixture-of-experts {self.arch} model is not "
                                 "supported (only the dense FFN)")
        out = dict(use_rope=self.get(Keys.Rope.SCALING_FINETUNED, bool, True),
                   embedding_scale=self.get(Keys.LLM.EMBEDDING_SCALE, float, 0.0),
                   residual_scale=self.get(Keys.LLM.RESIDUAL_SCALE, float, 0.0),
                   logit_scale=self.get(Keys.LLM.LOGIT_SCALE, float, 0.0))
        scale = self.get(Keys.Attention.SCALE, float, 0.0)
        if scale:
            out["attn_scale"] = scale
        return out

    @staticmethod
    def check_delta_net(hp: HParams) -> list[str]:
        problems = []
        if hp.recurrent_layer_ids and hp.ssm_d_inner != hp.ssm_n_head * hp.ssm_d_state:
            problems.append(f"ssm inner size {hp.ssm_d_inner} must be the {hp.ssm_n_head} v heads "
                            f"times the state size {hp.ssm_d_state} (q, k and v heads of one size)")
        if hp.attention_layers and hp.head_dim_k != hp.head_dim_v:
            problems.append(f"key length {hp.head_dim_k} and value length {hp.head_dim_v} must be equal")
        if hp.arch in MOE_ARCHS:
            problems += _Reader.check_experts(hp)
            if hp.n_ff_shexp <= 0:
                problems.append(f"shared expert feed_forward_length {hp.n_ff_shexp} must be positive")
        if hp.rope_sections and hp.attention_layers and sum(hp.rope_sections) <= 0:
            problems.append(f"rope sections {list(hp.rope_sections)} must not all be 0")
        return problems

    @staticmethod
    def check_jamba(hp: HParams) -> list[str]:
        problems = []
        if hp.recurrent_layer_ids and hp.ssm_dt_rank <= 0:
            problems.append(f"ssm time_step_rank (dt rank) {hp.ssm_dt_rank} must be positive")
        for what, size in (("key", hp.head_dim_k), ("value", hp.head_dim_v)):
            if hp.attention_layers and hp.n_head * size != hp.n_embd:
                # llama.cpp's jamba loads Q and the output projection as n_embd x n_embd
                problems.append(f"head_count {hp.n_head} times the {what} length {size} must be "
                                f"n_embd {hp.n_embd}")
        if hp.n_expert:
            problems += _Reader.check_experts(hp)
        return problems

    @staticmethod
    def check_gemma4(hp: HParams) -> list[str]:
        problems = []
        if hp.head_dim_k != hp.head_dim_v or hp.head_dim_k_swa != hp.head_dim_v_swa:
            problems.append(f"key and value lengths must be equal (llama.cpp's Gemma 4 check): "
                            f"{hp.head_dim_k}/{hp.head_dim_v}, sliding-window {hp.head_dim_k_swa}/{hp.head_dim_v_swa}")
        if hp.uses_swa and (hp.n_rot_swa % 2 or not 0 < hp.n_rot_swa <= hp.head_dim_k_swa):
            problems.append(f"sliding-window rope dimension count {hp.n_rot_swa} must be even and in "
                            f"(0, {hp.head_dim_k_swa}]")
        if any(w <= 0 for w in hp.ff_widths):
            problems.append(f"feed_forward_length {list(hp.ff_widths)} must be positive in every layer")
        if hp.n_embd_per_layer < 0:
            problems.append(f"embedding_length_per_layer_input {hp.n_embd_per_layer} is negative")
        return problems

    @staticmethod
    def check_experts(hp: HParams) -> list[str]:
        problems = []
        if not 0 < hp.n_expert_used <= hp.n_expert:
            problems.append(f"expert_used_count {hp.n_expert_used} must be in [1, expert_count "
                            f"{hp.n_expert}]")
        if hp.n_ff_exp <= 0:
            problems.append(f"expert feed_forward_length {hp.n_ff_exp} must be positive")
        return problems

    def rope_scaling(self) -> dict:
        kind = self.get(Keys.Rope.SCALING_TYPE, str, "linear")
        if kind not in SUPPORTED_ROPE_SCALING:
            raise ModelFileError(f"{self.source}: rope scaling {kind!r} is not supported "
                                 f"(supported: {', '.join(SUPPORTED_ROPE_SCALING)})")
        factor = self.get(Keys.Rope.SCALING_FACTOR, float, None)
        if factor is None:
            factor = self.get(ROPE_SCALE_LINEAR, float, 0.0)
        scale = 1.0 if kind == "none" or not factor else 1.0 / factor
        # llama.cpp's default type is "linear", which with no factor is no scaling at all.
        return dict(rope_freq_scale=scale, rope_scaling_type=kind if scale != 1.0 else "none")

    def gemma3(self, values: dict) -> dict:
        """llama_model_gemma3::load_arch_hparams."""
        n_layer = values["n_layer"]
        out = {"final_logit_softcap": self.get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, float, 0.0)}
        # gemma_pytorch: the 27B model scales queries by 1/sqrt(n_embd / n_head), the others by
        # 1/sqrt(head_dim); llama.cpp recognizes the 27B model by its 62 layers.
        if n_layer == 62:
            out["attn_scale"] = 1.0 / math.sqrt(values["n_embd"] / values["n_head"])
        window = self.get(Keys.Attention.SLIDING_WINDOW, int, 0)
        if window > 0:
            out["sliding_window"] = window
            out["swa_layers"] = self.swa_pattern(n_layer, GEMMA3_SWA_PERIOD)
            out["rope_freq_base_swa"] = self.get(Keys.Rope.FREQ_BASE_SWA, float, DEFAULT_ROPE_BASE_SWA)
        return out

    def gemma4(self, values: dict) -> dict:
        """llama_model_gemma4::load_arch_hparams (the dense models: a mixture of experts is
        refused by the tensor check). The sliding window and its per-layer pattern are required;
        the last shared_kv_layers layers read the cache of the last earlier layer of their kind
        (llama.cpp's reuse callback: n_layer_kv_from_start - 2 for a sliding-window layer, - 1
        for a global one), which must be of that kind."""
        n_layer = values["n_layer"]
        window = self.get(Keys.Attention.SLIDING_WINDOW, int, required=True)
        swa = self.swa_pattern(n_layer, 0) if self.key(Keys.Attention.SLIDING_WINDOW_PATTERN) in self.meta \
            else None
        if swa is None:
            raise ModelFileError(f"{self.source}: required metadata "
                                 f"{self.key(Keys.Attention.SLIDING_WINDOW_PATTERN)!r} is missing")
        shared = self.get(Keys.Attention.SHARED_KV_LAYERS, int, 0)
        first_shared = n_layer - shared
        if shared and not 2 <= first_shared < n_layer:
            raise ModelFileError(f"{self.source}: {self.key(Keys.Attention.SHARED_KV_LAYERS)!r} = {shared} "
                                 f"must leave at least 2 of the {n_layer} layers with their own KV cache")
        sources = list(range(n_layer))
        for il in range(first_shared, n_layer):
            src = first_shared - (2 if swa[il] else 1)
            if swa[src] != swa[il]:
                raise ModelFileError(f"{self.source}: layer {il} shares the KV cache of layer {src}, "
                                     "which is not of its kind (sliding-window or global)")
            sources[il] = src
        head_k = values["head_dim_k"]
        head_k_swa = self.get(Keys.Attention.KEY_LENGTH_SWA, int, required=True)
        return dict(sliding_window=window, swa_layers=swa, attn_scale=1.0,
                    head_dim_k_swa=head_k_swa,
                    head_dim_v_swa=self.get(Keys.Attention.VALUE_LENGTH_SWA, int, required=True),
                    n_rot_swa=self.get(Keys.Rope.DIMENSION_COUNT_SWA, int, values.get("n_rot", head_k)),
                    rope_freq_base_swa=self.get(Keys.Rope.FREQ_BASE_SWA, float, DEFAULT_ROPE_BASE_SWA),
                    final_logit_softcap=self.get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, float, 0.0),
                    n_embd_per_layer=self.get(Keys.LLM.EMBD_LENGTH_PER_LAYER_INP, int, 0),
                    kv_sources=tuple(sources),
                    attention_flags=tuple(il < first_shared for il in range(n_layer)))

    def swa_pattern(self, n_layer: int, period: int) -> tuple[bool, ...]:
        """llama_model_base::load_swa_pattern: a per-layer bool array, or a period n where layer
        il slides when il % n < n - 1 (n = 0: every layer slides)."""
        key = self.key(Keys.Attention.SLIDING_WINDOW_PATTERN)
        value = self.meta.get(key, period)
        if isinstance(value, np.ndarray):
            if value.size != n_layer:
                raise ModelFileError(f"{self.source}: {key!r} has {value.size} entries for "
                                     f"{n_layer} layers")
            return tuple(bool(v) for v in value)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ModelFileError(f"{self.source}: metadata {key!r} = {value!r} is neither a layer "
                                 "count nor a per-layer array")
        n = int(value)
        return tuple(n == 0 or il % n < n - 1 for il in range(n_layer))

    def check(self, hp: HParams):
        problems = []
        attention = ("n_head", "n_head_kv", "head_dim_k", "head_dim_v") if hp.attention_layers else ()
        for name in ("n_layer", "n_embd") + attention:
            if getattr(hp, name) <= 0:
                problems.append(f"{name} = {getattr(hp, name)} must be positive")
        if attention and hp.n_head_kv > 0 and hp.n_head % hp.n_head_kv:
            problems.append(f"head_count {hp.n_head} is not a multiple of head_count_kv {hp.n_head_kv}")
        if attention and (hp.n_rot % 2 or not 0 < hp.n_rot <= hp.head_dim_k):
            problems.append(f"rope dimension count {hp.n_rot} must be even and in (0, {hp.head_dim_k}]")
        if hp.recurrent_layer_ids and hp.arch in SHORTCONV_ARCHS:
            if hp.shortconv_l_cache < 2:
                problems.append(f"shortconv.l_cache {hp.shortconv_l_cache} must be at least 2")
        elif hp.recurrent_layer_ids:
            for name in ("ssm_d_conv", "ssm_d_inner", "ssm_d_state", "ssm_n_head", "ssm_n_group"):
                if getattr(hp, name) <= 0:
                    problems.append(f"{name} = {getattr(hp, name)} must be positive")
            if hp.ssm_n_head > 0 and hp.ssm_d_inner % hp.ssm_n_head:
                problems.append(f"ssm inner size {hp.ssm_d_inner} is not a multiple of the "
                                f"{hp.ssm_n_head} ssm heads")
            if hp.ssm_n_group > 0 and hp.ssm_n_head % hp.ssm_n_group:
                problems.append(f"ssm heads {hp.ssm_n_head} are not a multiple of the "
                                f"{hp.ssm_n_group} groups")
        if hp.arch in DELTA_NET_ARCHS:
            problems += self.check_delta_net(hp)
        if hp.arch in MAMBA1_ARCHS:
            problems += self.check_jamba(hp)
        if hp.arch in GEMMA4_ARCHS:
            problems += self.check_gemma4(hp)
        if hp.arch == "lfm2moe" and hp.n_layer_dense_lead < hp.n_layer:
            problems += self.check_experts(hp)
        problems += self.value_ranges(hp)
        if problems:
            raise ModelFileError(f"{self.source}: bad hyper-parameters: {'; '.join(problems)}")

    @staticmethod
    def value_ranges(hp: HParams) -> list[str]:
        """Values outside their meaning, which would give NaN or infinite logits (or a C literal
        `inf`) rather than an error: each named with the rule it breaks."""
        problems = []

        def finite(name: str, value: float) -> bool:
            if not math.isfinite(value):
                problems.append(f"{name} = {value} is not finite")
            return math.isfinite(value)

        if finite("rms_eps", hp.rms_eps) and not 0 < hp.rms_eps < 1:
            problems.append(f"rms_eps = {hp.rms_eps} must be in (0, 1)")
        for name in ("rope_freq_base", "rope_freq_base_swa"):
            value = getattr(hp, name)
            if finite(name, value) and value <= 1:
                problems.append(f"{name} = {value} must be above 1 (rotation frequencies base^(-2i/n))")
        for name in ("rope_freq_scale", "rope_freq_scale_swa"):
            value = getattr(hp, name)
            if finite(name, value) and not 0 < value * max(hp.n_ctx_train, 1) <= MAX_ROPE_POSITION:
                problems.append(f"{name} = {value} (1 / rope scaling factor) must be positive and "
                                f"keep positions up to the training context {hp.n_ctx_train} below "
                                f"{MAX_ROPE_POSITION}")
        for name in ("final_logit_softcap", "attn_scale", "embedding_scale", "residual_scale", "logit_scale"):
            value = getattr(hp, name)
            if finite(name, value) and value and not 1 / MAX_MULTIPLIER <= value <= MAX_MULTIPLIER:
                problems.append(f"{name} = {value} must be 0 (unused) or in [2^-20, 2^20]")
        for name in ("n_ctx_train", "n_vocab", "n_ff", "sliding_window"):
            if getattr(hp, name) < 0:
                problems.append(f"{name} = {getattr(hp, name)} is negative")
        if hp.n_ctx_train == 0:
            problems.append("n_ctx_train = 0 must be positive")
        return problems


def check_layer_tensors(hp: HParams, tensor_names, source: str) -> None:
    """The layer count must be the one the file's blk.<i>.* tensors have: a header claiming
    more layers than the file holds is refused before anything is built per layer."""
    layers = {int(name.split(".")[1]) for name in tensor_names
              if name.startswith("blk.") and name.split(".")[1].isdigit()}
    present = max(layers) + 1 if layers else 0
    if present != hp.n_layer:
        raise ModelFileError(f"{source}: block_count is {hp.n_layer} but the file holds tensors "
                             f"for {present} layer(s) (blk.0 .. blk.{present - 1})")
