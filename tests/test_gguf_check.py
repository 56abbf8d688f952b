"""The pure-Python GGUF validator against the gguf package's reader (the oracle)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from _gguf_files import truncated_copy, write_tiny_gguf
from edgeinfer.errors import InvalidModelError
from edgeinfer.gguf_check import ArraySummary, validate_gguf


def test_default_model_header_matches_gguf_reader(default_gguf):
    h = validate_gguf(default_gguf)
    r = gguf.GGUFReader(default_gguf)
    assert h.architecture == "llama"
    assert len(h.tensors) == len(r.tensors)
    for ours, ref in zip(h.tensors, r.tensors):
        assert ours.name == ref.name
        assert ours.shape == tuple(int(x) for x in ref.shape)
        assert ours.qtype == ref.tensor_type
        assert ours.offset == ref.data_offset
        assert ours.nbytes == ref.n_bytes
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        ours = h.metadata[key]
        if isinstance(ours, ArraySummary):
            assert ours.length == len(field.data)
        elif field.types[0] == gguf.GGUFValueType.STRING:
            assert ours == field.contents()
        elif field.types[0] == gguf.GGUFValueType.ARRAY:
            assert ours == field.contents()
        else:
            assert ours == pytest.approx(field.contents())
    print(f"validated {len(h.tensors)} tensors, {len(h.metadata)} metadata keys")


def test_valid_tiny_file(tmp_path):
    h = validate_gguf(write_tiny_gguf(tmp_path / "t.gguf"))
    assert [t.name for t in h.tensors] == ["blk.0.ffn_up.weight", "blk.1.ffn_up.weight"]
    assert h.tensors[0].shape == (32, 8)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 0.9, 0.999])
def test_truncated_files_are_rejected(default_gguf, tmp_path, fraction):
    bad = truncated_copy(default_gguf, tmp_path / "cut.gguf", fraction)
    with pytest.raises(InvalidModelError) as e:
        validate_gguf(bad)
    assert str(bad) in str(e.value)
    print(e.value)


def test_not_gguf(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " * 10)
    with pytest.raises(InvalidModelError, match="not a GGUF file.*edgeinfer convert"):
        validate_gguf(p)


def test_missing_and_directory(tmp_path):
    with pytest.raises(InvalidModelError, match="no such file"):
        validate_gguf(tmp_path / "nope.gguf")
    with pytest.raises(InvalidModelError, match="directory"):
        validate_gguf(tmp_path)


def test_bad_version_and_absurd_counts(tmp_path):
    good = write_tiny_gguf(tmp_path / "t.gguf").read_bytes()
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(good[:4] + (1).to_bytes(4, "little") + good[8:])
    with pytest.raises(InvalidModelError, match="version 1"):
        validate_gguf(v1)
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(good[:8] + (2**40).to_bytes(8, "little") + good[16:])
    with pytest.raises(InvalidModelError, match="cannot fit"):
        validate_gguf(huge)


def test_corrupt_tensor_type_and_offset(tmp_path):
    p = write_tiny_gguf(tmp_path / "t.gguf", n_tensors=1)
    data = bytearray(p.read_bytes())
    name = b"blk.0.ffn_up.weight"
    i = data.index(name) + len(name)
    # layout after the name: n_dims u32, dims 2*u64, type u32, offset u64
    t_pos = i + 4 + 16
    bad_type = bytearray(data)
    bad_type[t_pos:t_pos + 4] = (999).to_bytes(4, "little")
    (tmp_path / "type.gguf").write_bytes(bad_type)
    with pytest.raises(InvalidModelError, match="unknown ggml type 999"):
        validate_gguf(tmp_path / "type.gguf")
    bad_off = bytearray(data)
    bad_off[t_pos + 4:t_pos + 12] = (2**20).to_bytes(8, "little")
    (tmp_path / "off.gguf").write_bytes(bad_off)
    with pytest.raises(InvalidModelError, match="truncated GGUF: tensor 'blk.0.ffn_up.weight'"):
        validate_gguf(tmp_path / "off.gguf")
