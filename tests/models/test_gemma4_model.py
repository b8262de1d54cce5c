"""gemma4 loading (tiny_gguf_gemma4): the hyper-parameters llama.cpp derives (head sizes by layer
kind, shared KV caches, FFN widths), the step graph's caches, and the files it must refuse with
one line naming the tensor or key at fault. Parity with llama.cpp is in test_gemma4_peer."""
import numpy as np
import pytest

from ember.models import load_model
from ember.models.gguf_file import ModelFileError

from model_steps import ReferenceSession
from tiny_gguf_gemma4 import FF_WIDTHS, HEAD_FULL, HEAD_SWA, N_HEAD_KV, Gemma4Spec, write_gemma4_gguf


def test_hparams_follow_llama_cpps_gemma4(tiny_files):
    hp = load_model(tiny_files[Gemma4Spec("f32")]).hparams
    assert [hp.head_dim(il) for il in range(5)] == [HEAD_SWA, HEAD_SWA, HEAD_FULL, HEAD_SWA, HEAD_FULL]
    assert [hp.rot_dims(il) for il in range(5)] == [HEAD_SWA, HEAD_SWA, HEAD_FULL, HEAD_SWA, HEAD_FULL]
    # the last two layers read the caches of the last own-cache layer of their kind
    assert hp.kv_sources == (0, 1, 2, 1, 2)
    assert hp.attention_layers == (0, 1, 2)
    assert hp.ff_widths == FF_WIDTHS and hp.attn_scale == 1.0
    assert hp.rope_base(0) == 1e4 and hp.rope_base(2) == 1e6


def test_step_graph_has_a_cache_per_own_layer_in_its_head_size(tiny_files):
    model = load_model(tiny_files[Gemma4Spec("f32")])
    g = model.build_step(3, 32, 1)
    widths = {i.name: i.type.shape for i in g.inputs if "_cache." in i.name}
    assert widths == {f"{kv}_cache.{il}": (32, N_HEAD_KV * (HEAD_SWA if il < 2 else HEAD_FULL))
                      for il in range(3) for kv in "kv"}


def test_prompt_in_pieces_equals_prompt_at_once(tiny_files):
    """The shared layers read the rows earlier steps left in their source layers' caches."""
    model = load_model(tiny_files[Gemma4Spec("f32")])
    prompt = [1, 17, 260, 300, 42, 9, 33]
    whole = ReferenceSession(model, 16).step(prompt)
    ref = ReferenceSession(model, 16)
    pieces = np.concatenate([ref.step(prompt[:3]), ref.step(prompt[3:6]), ref.step(prompt[6:])])
    np.testing.assert_allclose(pieces, whole, rtol=0, atol=2e-5 * np.abs(whole).max())


def _reshape(name, shape):
    def edit(w):
        w[name] = np.zeros(shape, np.float32)
        return w
    return edit


@pytest.mark.parametrize("edit, message", [
    (_reshape("blk.3.attn_q.weight", (3 * HEAD_FULL, 192)), "'blk.3.attn_q.weight' has shape [384, 192], expected [192, 192]"),
    (_reshape("per_layer_model_proj.weight", (64, 192)), "'per_layer_model_proj.weight' has shape [64, 192]"),
    (_reshape("blk.4.ffn_down.weight", (192, 320)), "'blk.4.ffn_down.weight' has shape [192, 320], expected [192, 448]"),
    (lambda w: {k: v for k, v in w.items() if k != "blk.1.attn_k.weight"}, "tensor 'blk.1.attn_k.weight' is missing"),
    (_reshape("blk.2.ffn_gate_inp.weight", (4, 192)), "layer 2 is a mixture of experts"),
], ids=["q-of-a-sliding-layer", "per-layer-projection", "ffn-width-of-a-layer", "missing-k", "experts"])
def test_bad_tensors_are_one_line_naming_the_tensor(tmp_path, edit, message):
    path = write_gemma4_gguf(tmp_path / "bad.gguf", Gemma4Spec("f32"), edit=edit)
    with pytest.raises(ModelFileError) as err:
        load_model(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_shared_layer_of_another_kind_is_refused(tmp_path):
    # 3 shared layers: layer 2 (global) would read layer 0's sliding-window cache
    path = write_gemma4_gguf(tmp_path / "bad.gguf", Gemma4Spec("f32"), shared_kv_layers=3)
    with pytest.raises(ModelFileError, match="shares the KV cache of layer"):
        load_model(path)
