"""ember.tools.requant: llama.cpp's Q4_K_M / Q5_K_M type choices (llama_tensor_get_type) and a
requantized file that ember and llama.cpp both read."""
import gguf
import numpy as np
import pytest

from ember.models import load_model
from ember.models.gguf_file import GGUFFile
from ember.tools.requant import MixPlan, requantize, use_more_bits

from model_steps import nmse, reference_logits
from tiny_gguf import Spec

PROMPT = [1, 17, 260, 300, 42, 9, 33]
# llama.cpp against ember on a file of these formats (test_models_peer's bound for them)
MORE_PEER_NMSE = 1e-3


def gemma3_names(n_layer=18):
    names = ["token_embd.weight", "output_norm.weight"]
    for il in range(n_layer):
        names += [f"blk.{il}.{t}.weight" for t in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                   "ffn_gate", "ffn_up", "ffn_down", "attn_norm")]
    return names


def test_use_more_bits_is_llama_cpps():
    assert [il for il in range(18) if use_more_bits(il, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]


def test_q5_k_m_of_a_gemma3_270m_shape():
    """n_embd 640 is not whole 256-value blocks: those rows fall back (q5_k -> q5_1,
    q6_k -> q8_0); the 1024- and 2048-wide rows keep the k-quants."""
    plan = MixPlan(gemma3_names(), "q5_k_m")
    more = [0, 1, 4, 7, 10, 13, 15, 16, 17]
    assert plan.choose("token_embd.weight", 640) == "q8_0"           # tied output: q6_k -> q8_0
    assert [plan.choose(f"blk.{il}.attn_v.weight", 640) for il in range(18)] == \
        ["q8_0" if il in more else "q5_1" for il in range(18)]
    assert [plan.choose(f"blk.{il}.ffn_down.weight", 2048) for il in range(18)] == \
        ["q6_k" if il in more else "q5_k" for il in range(18)]
    assert plan.choose("blk.3.attn_output.weight", 1024) == "q5_k"
    assert plan.choose("blk.3.ffn_up.weight", 640) == "q5_1"


def test_q4_k_m_plan_reproduces_the_default_models_types(default_model_path):
    """The default model is llama.cpp's own Q4_K_M: the plan picks every one of its types."""
    infos = GGUFFile(default_model_path).tensor_infos
    plan = MixPlan(list(infos), "q4_k_m")
    for name, info in infos.items():
        if len(info.shape) >= 2:
            assert plan.choose(name, info.shape[-1]) == info.dtype.name, name


def test_requantized_tiny_llama_keeps_its_logits(tmp_path, tiny_files):
    src = tiny_files[Spec("llama", "f32")]
    written = requantize(src, tmp_path / "q5_k_m.gguf", "q5_k_m")
    assert written["blk.0.attn_v.weight"] == "q5_k" and written["blk.1.attn_v.weight"] == "q6_k"
    assert written["output.weight"] == "q6_k" and written["blk.0.ffn_up.weight"] == "q5_k"
    assert written["blk.0.attn_norm.weight"] == "f32"
    model = load_model(tmp_path / "q5_k_m.gguf")
    assert gguf.GGUFReader(str(tmp_path / "q5_k_m.gguf")).fields["general.file_type"].contents() == 17
    ours = reference_logits(model, PROMPT)
    exact = reference_logits(load_model(src), PROMPT)
    assert nmse(ours, exact) < 1e-2          # measured 5.7e-3; a misread layout gives ~1


@pytest.mark.peer
def test_llama_cpp_reads_the_requantized_file_as_ember_does(tmp_path, tiny_files):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path = tmp_path / "q5_k_m.gguf"
    requantize(tiny_files[Spec("llama", "f32")], path, "q5_k_m")
    ours = reference_logits(load_model(path), PROMPT)
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    try:
        llm.eval(PROMPT)
        theirs = np.array(llm.scores[:len(PROMPT)], dtype=np.float32)
    finally:
        llm.close()
    assert np.isfinite(ours).all()
    assert nmse(ours, theirs) < MORE_PEER_NMSE
