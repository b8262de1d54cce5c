import mmap
import struct

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType

from ember.errors import EmberError
from ember.ir import dtypes
from ember.models import ARCHITECTURES, load_model
from ember.models.gguf_file import GGUFFile, ModelFileError, SUPPORTED_TYPE_NAMES

from tiny_gguf import ARCHS, WEIGHT_TYPES, Spec, fuse_qkv, make_weights, stored

# Every weight type (spread over the architectures), every architecture in F32, the fused files.
BYTE_CHECKED = sorted({Spec(ARCHS[i % len(ARCHS)], t) for i, t in enumerate(WEIGHT_TYPES)}
                      | {Spec(a, "f32") for a in ARCHS}
                      | {Spec("llama", "f32", True), Spec("qwen2", "f32", True)},
                      key=lambda s: s.filename)


def test_model_file_error_is_an_ember_error():
    assert issubclass(ModelFileError, EmberError)


@pytest.mark.parametrize("spec", BYTE_CHECKED, ids=lambda s: s.filename)
def test_tensors_are_the_written_bytes(tiny_files, spec):
    f = GGUFFile(tiny_files[spec])
    weights = make_weights(spec.config)
    if spec.fused_qkv:
        weights = fuse_qkv(weights, spec.config.n_layer)
    assert set(f.tensor_infos) == set(weights)
    for name, values in weights.items():
        expected, gtype = stored(values, spec.weight_type)
        info = f.tensor_infos[name]
        assert info.ggml_type == gtype
        assert info.shape == values.shape           # outermost first, like the NumPy values
        data = f.tensor(name)
        assert data.dtype == expected.dtype and data.shape == expected.shape
        assert np.array_equal(data, expected), name


@pytest.mark.parametrize("spec", [Spec("llama", "q4_k"), Spec("gemma3", "bf16")],
                         ids=lambda s: s.filename)
def test_tensors_are_read_only_views_of_the_mmap(tiny_files, spec):
    f = GGUFFile(tiny_files[spec])
    for name in f.tensor_infos:
        data = f.tensor(name)
        assert np.shares_memory(data, f.bytes)
        root = data
        while isinstance(root.base, np.ndarray):
            root = root.base
        owner = root.base.obj if isinstance(root.base, memoryview) else root.base
        assert isinstance(owner, mmap.mmap)
        assert not data.flags.writeable
        assert f.tensor(name) is data     # made once


def test_storage_layout_matches_ember_types(tiny_files):
    f = GGUFFile(tiny_files[Spec("qwen3", "q6_k")])
    info = f.tensor_infos["blk.0.attn_q.weight"]
    assert info.type.dtype is dtypes.q6_k and info.shape == (512, 256)
    assert f.tensor("blk.0.attn_q.weight").shape == (512, dtypes.q6_k.row_bytes(256))
    assert f.tensor("blk.0.attn_q.weight").dtype == np.uint8
    assert f.tensor("blk.0.attn_q_norm.weight").dtype == np.float32


@pytest.mark.parametrize("spec", [Spec("qwen2", "q8_0"), Spec("gemma3", "f16")],
                         ids=lambda s: s.filename)
def test_metadata_and_offsets_agree_with_gguf_reader(tiny_files, spec):
    path = tiny_files[spec]
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        mine = ours.metadata[key]
        if isinstance(mine, np.ndarray):
            mine = mine.tolist()
        if isinstance(value, float):
            assert mine == pytest.approx(value)
        else:
            assert mine == value, key
    assert ours.data_offset == theirs.data_offset
    for t in theirs.tensors:
        info = ours.tensor_infos[t.name]
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert info.ggml_type == t.tensor_type
        assert info.shape == tuple(int(d) for d in reversed(t.shape))


def test_tokenizer_metadata(tiny_files):
    spm = load_model(tiny_files[Spec("llama", "f32")]).tokenizer
    assert spm["tokenizer.ggml.model"] == "llama"
    assert len(spm["tokenizer.ggml.tokens"]) == 320 and spm["tokenizer.ggml.tokens"][3] == "<0x00>"
    assert spm["tokenizer.ggml.scores"].dtype == np.float32
    assert spm["tokenizer.ggml.token_type"][3] == gguf.TokenType.BYTE
    bpe = load_model(tiny_files[Spec("qwen2", "f32")]).tokenizer
    assert bpe["tokenizer.ggml.model"] == "gpt2" and bpe["tokenizer.ggml.pre"] == "qwen2"
    assert "\u0120 t" in bpe["tokenizer.ggml.merges"]
    assert all(k.startswith("tokenizer.") for k in bpe)


# ---- errors -----------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        GGUFFile(tmp_path / "nothing.gguf")


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelFileError, match="not a regular file"):
        GGUFFile(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GG", b"PK\x03\x04" + bytes(100)], ids=["empty", "short", "zip"])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        GGUFFile(path)


def test_truncated_tensor_data_names_the_tensor_and_offset(tiny_files, tmp_path):
    src = tiny_files[Spec("llama", "q8_0")]
    full = GGUFFile(src)
    last = max(full.tensor_infos.values(), key=lambda i: i.offset)
    cut = last.offset + last.nbytes // 2
    path = tmp_path / "cut.gguf"
    path.write_bytes(src.read_bytes()[:cut])
    with pytest.raises(ModelFileError) as e:
        GGUFFile(path)
    message = str(e.value)
    assert repr(last.name) in message and str(last.offset) in message and "truncated" in message


def test_truncated_header(tiny_files, tmp_path):
    path = tmp_path / "header.gguf"
    path.write_bytes(tiny_files[Spec("qwen2", "f32")].read_bytes()[:3000])
    with pytest.raises(ModelFileError, match="truncated header"):
        GGUFFile(path)


def _string_items(texts):
    return b"".join(struct.pack("<Q", len(t)) + t for t in texts)


@pytest.mark.parametrize("cut", [None, 3, 8, 9, 13, 40], ids=lambda c: f"cut-{c}")
def test_string_arrays_read_in_one_loop_as_item_by_item(cut):
    """A vocabulary's strings are read in one tight loop (Cursor.strings); the same strings, the
    same end position, and on a truncated file the same message as reading them one by one."""
    from pathlib import Path
    from gguf.constants import GGUFValueType
    from ember.models.gguf_file import _Cursor
    texts = [b"a", b"", "h\u00e9llo".encode(), b"\xe2\x96", b"<0x0A>"] + [b"t%d" % i for i in range(20)]
    raw = _string_items(texts)
    raw = raw if cut is None else raw[:cut]

    def read(fast):
        cursor = _Cursor(raw, len(raw), Path("m.gguf"))
        try:
            items = cursor.strings(len(texts), "metadata 'v'") if fast else \
                [cursor.value(GGUFValueType.STRING, f"metadata 'v'[{i}]") for i in range(len(texts))]
            return items, cursor.pos
        except ModelFileError as e:
            return str(e), cursor.pos
    fast, slow = read(True), read(False)
    assert fast == slow
    if cut is None:
        assert [t.encode("utf-8", "surrogateescape") for t in fast[0]] == texts
    else:
        assert "truncated header" in fast[0]


def _write_single_tensor(path, data, raw_dtype=None, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("blk.0.ffn_up.weight", data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_tensor_type_names_tensor_and_supported_types(tmp_path):
    iq2_xs = np.zeros((4, 74), dtype=np.uint8)          # one 256-value IQ2_XS block per row
    path = _write_single_tensor(tmp_path / "iq2xs.gguf", iq2_xs, GGMLQuantizationType.IQ2_XS)
    with pytest.raises(ModelFileError) as e:
        GGUFFile(path)
    message = str(e.value)
    assert "'blk.0.ffn_up.weight'" in message and "IQ2_XS" in message
    assert SUPPORTED_TYPE_NAMES in message and "Q4_K" in message and "Q5_K" in message
    assert "MXFP4" in message and "NVFP4" in message


def test_unknown_tensor_type_id(tmp_path):
    path = _write_single_tensor(tmp_path / "unknown.gguf", np.zeros((2, 32), np.float32))
    raw = bytearray(path.read_bytes())
    name = b"blk.0.ffn_up.weight"
    at = raw.index(name) + len(name) + 4 + 2 * 8      # past n_dims and two dims: the type
    raw[at:at + 4] = struct.pack("<I", 999)
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="unknown type id 999"):
        GGUFFile(path)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    path = _write_single_tensor(tmp_path / "mamba.gguf", np.zeros((2, 32), np.float32), arch="mamba")
    with pytest.raises(ModelFileError) as e:
        load_model(path)
    assert "'mamba'" in str(e.value)
    for arch in ARCHITECTURES:
        assert arch in str(e.value)
