"""Imatrix files: round trips through both llama.cpp formats, and their use by the quantizer.

Oracles: the layouts written by llama.cpp's tools/imatrix (checked field by field with the
``gguf`` package's reader, and a legacy ``.dat`` file assembled byte by byte here from
that layout), and ``llama_model_quantize`` given the weights read from our file.
"""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES

import _llama_quant as lq
from edgeinfer.quant.imatrix import Imatrix, ImatrixError, load_imatrix, save_imatrix
from edgeinfer.quant.kquants import quantize_k


def _sample(rng: np.random.Generator) -> Imatrix:
    im = Imatrix(datasets=["calibration.txt"], chunk_count=5, chunk_size=512)
    im.add("blk.0.attn_q.weight", rng.random(512) * 20, 2560)
    im.add("blk.0.attn_q.weight", rng.random(512) * 20, 512)          # accumulates
    for j in (0, 1, 3):                                                # expert 2 never routed to
        im.add("blk.1.ffn_down_exps.weight", rng.random(256) * 3, 300 + j, mat=j, n_mat=4)
    return im


def test_gguf_round_trip_and_llama_layout(tmp_path):
    im = _sample(np.random.default_rng(0))
    path = save_imatrix(im, tmp_path / "imatrix.gguf")
    back = load_imatrix(path)
    r = gguf.GGUFReader(str(path))
    keys = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    shapes = {t.name: (tuple(int(d) for d in t.shape), t.tensor_type) for t in r.tensors}
    print("keys", keys)
    print("tensors", {n: s for n, (s, _) in shapes.items()})
    assert keys == {"general.type": "imatrix", "imatrix.datasets": ["calibration.txt"],
                    "imatrix.chunk_count": 5, "imatrix.chunk_size": 512}
    assert list(shapes) == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                            "blk.1.ffn_down_exps.weight.in_sum2", "blk.1.ffn_down_exps.weight.counts"]
    assert shapes["blk.1.ffn_down_exps.weight.in_sum2"] == ((256, 4), QT.F32)   # ne0 = row, ne1 = experts
    assert shapes["blk.1.ffn_down_exps.weight.counts"] == ((1, 4), QT.F32)
    for name, e in im.entries.items():
        assert np.array_equal(back.entries[name].sums, e.sums)
        assert np.array_equal(back.entries[name].counts, e.counts)
        assert np.array_equal(back.weights(name), im.weights(name))
    w = back.weights("blk.1.ffn_down_exps.weight").reshape(4, 256)
    assert np.all(w[2] == 1.0)                                         # llama-quantize's value for no data
    assert back.datasets == im.datasets and (back.chunk_count, back.chunk_size) == (5, 512)


def test_dat_round_trip_and_hand_built_legacy_file(tmp_path):
    im = _sample(np.random.default_rng(1))
    back = load_imatrix(save_imatrix(im, tmp_path / "imatrix.dat"))
    assert back.legacy and back.datasets == ["calibration.txt"] and back.chunk_count == 5
    worst = 0.0
    for name in im.entries:
        a, b = im.weights(name), back.weights(name)
        worst = max(worst, float(np.max(np.abs(a - b) / np.abs(a))))
    print("legacy .dat round trip: max relative weight error", worst)
    assert worst <= 4 * np.finfo(np.float32).eps                       # (v/c)*ncall/ncall rounding only

    # a legacy file laid out as save_imatrix_legacy writes it
    vals = np.arange(1, 9, dtype=np.float32) * 3
    name = b"blk.0.ffn_up.weight"
    raw = (struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 3, 8)
           + vals.tobytes() + struct.pack("<ii", 7, 4) + b"wiki")
    (tmp_path / "hand.dat").write_bytes(raw)
    hand = load_imatrix(tmp_path / "hand.dat")
    print("hand-built legacy file weights", hand.weights("blk.0.ffn_up.weight"))
    assert np.array_equal(hand.weights("blk.0.ffn_up.weight"), vals / np.float32(3))
    assert hand.chunk_count == 7 and hand.datasets == ["wiki"]
    assert save_imatrix(hand, tmp_path / "hand2.dat").read_bytes() == raw
    with pytest.raises(ImatrixError, match="chunk_size"):
        save_imatrix(hand, tmp_path / "hand.gguf")
    hand.chunk_size = 512                                              # as llama-imatrix --in-file
    conv = load_imatrix(save_imatrix(hand, tmp_path / "hand.gguf"))
    assert np.allclose(conv.weights("blk.0.ffn_up.weight"), vals / 3, rtol=1e-6)


def test_bad_files_are_refused(tmp_path):
    (tmp_path / "trunc.dat").write_bytes(struct.pack("<ii", 1, 19) + b"blk.0.f")
    with pytest.raises(ImatrixError, match="truncated"):
        load_imatrix(tmp_path / "trunc.dat")
    (tmp_path / "text.dat").write_bytes(b"hello world, not an imatrix")
    with pytest.raises(ImatrixError):
        load_imatrix(tmp_path / "text.dat")
    assert not list(tmp_path.glob(".*.tmp"))


def test_imatrix_weights_drive_quantizer_like_llama_cpp(tmp_path):
    """Weights read back from our file give the same Q4_K/Q6_K bytes in llama.cpp and here."""
    rng = np.random.default_rng(2)
    tensors = {f"blk.{i}.ffn_up.weight": rng.standard_normal((16, 512)).astype(np.float32) for i in range(2)}
    im = Imatrix(datasets=["t"], chunk_count=1, chunk_size=64)
    for name, x in tensors.items():
        acts = rng.standard_normal((64, 512)).astype(np.float32) * rng.uniform(0.1, 3, 512).astype(np.float32)
        im.add(name, (acts * acts).sum(axis=0), 64)
    back = load_imatrix(save_imatrix(im, tmp_path / "im.gguf"))
    weights = {n: back.weights(n) for n in tensors}
    src = lq.write_f32_gguf(tmp_path / "in.gguf", tensors, lq.Hparams(n_layer=2))
    for qtype in (QT.Q4_K, QT.Q6_K):
        ref = lq.read_tensors(lq.llama_quantize(src, tmp_path / "out.gguf", lq.PURE_FTYPE[qtype], pure=True,
                                                imatrix=weights))
        bad = sum(lq.block_mismatch(quantize_k(x, qtype, weights[n]), ref[n][1], GGML_QUANT_SIZES[qtype][1])
                  for n, x in tensors.items())
        print(qtype.name, "with imatrix from file: mismatching blocks", bad)
        assert bad == 0
