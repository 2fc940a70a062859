"""Packing: compressed-tensors INT4 pass-through is bit-exact, our float -> INT4 quantiser makes
the same bytes as compressed-tensors' own pack-quantized path, every format round-trips within
its quantisation step, and packed layer files save / load / reject bad files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from native_ref import bf16_round, random_experts

from hybrid import native
from hybrid.experts.cpu_moe import PackedLayer

N = native.lib()
ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)


def ct_pack(w: torch.Tensor):
    """compressed-tensors' pack-quantized INT4 group 32: (weight_packed int32 [N, K/8],
    weight_scale [N, K/32] in w's dtype)."""
    n, k = w.shape
    g = w.reshape(n, k // 32, 32)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), ARGS)
    q = quantize(w, scale, zp, ARGS, dtype=torch.int8)
    return pack_to_int32(q, 4), scale


def special_weights(rng, n, k, dtype):
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32) * 0.05)
    w[0, :32] = 0  # zero group: compressed-tensors uses the dtype's eps as the scale
    w[1, 32:64] = 0
    w[1, 40] = -3.0  # one element: it alone sets amax (q = -8 after clamp at -7.5)
    w[2, :32] = torch.linspace(-1, 1, 32)  # many values near .5 steps
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_quantiser_matches_compressed_tensors(dtype):
    rng = np.random.default_rng(10)
    w = special_weights(rng, 64, 256, dtype)
    packed, scale = ct_pack(w)
    src = w.numpy() if dtype == torch.float32 else w.view(torch.int16).numpy().view(np.uint16)
    ours_q, ours_s = N.quantize_pack(src, "int4")
    ct_q, ct_s = N.pack_int4_from_ct(packed.numpy(), scale.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(ours_q, ct_q)  # same nibbles, byte for byte
    np.testing.assert_array_equal(ours_s, ct_s)  # same scales (bf16 of compressed-tensors' scale)


def test_pack_from_ct_is_bit_exact():
    """Unpacked weights equal compressed-tensors' (q * scale) exactly: no dequantise/requantise."""
    rng = np.random.default_rng(11)
    w = torch.from_numpy(rng.standard_normal((48, 128)).astype(np.float32)).to(torch.bfloat16)
    packed, scale = ct_pack(w)
    q, s = N.pack_int4_from_ct(packed.numpy(), scale.view(torch.int16).numpy().view(np.uint16))
    deq = N.unpack("int4", q, s, 48, 128)
    # Reference unpack of compressed-tensors' words: nibble j of word i = input 8i + j, minus 8.
    words = packed.numpy().view(np.uint32)
    nib = ((words[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).reshape(48, 128)
    ref = (nib.astype(np.float32) - 8) * np.repeat(scale.float().numpy(), 32, axis=1)
    np.testing.assert_array_equal(deq, ref)
    # fp32 scales that are bf16-exact are accepted; others are refused, naming the element.
    q2, s2 = N.pack_int4_from_ct(packed.numpy(), scale.float().numpy())
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s2, s)
    bad = scale.float().numpy().copy()
    bad[3, 1] *= 1.001
    with pytest.raises(ValueError, match=r"weight_scale\[3, 1\].*bf16"):
        N.pack_int4_from_ct(packed.numpy(), bad)


@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16"])
def test_round_trip_within_quantisation_step(fmt):
    rng = np.random.default_rng(12)
    w = rng.standard_normal((32, 512)).astype(np.float32)
    q, s = N.quantize_pack(w, fmt)
    deq = N.unpack(fmt, q, s, 32, 512)
    if fmt == "bf16":
        np.testing.assert_array_equal(deq, bf16_round(w).astype(np.float32))
        assert s is None
        return
    amax = np.repeat(np.abs(w.reshape(32, 16, 32)).max(axis=2), 32, axis=1)
    step = amax / (7.5 if fmt == "int4" else 127)  # the quantisation step (fp32 scale)
    # Half a step from rounding, plus |q| times the bf16 rounding of the stored scale (2^-9 rel).
    qmax = 8 if fmt == "int4" else 127
    assert (np.abs(deq - w) <= 0.5 * step + qmax * step * 2.0**-8 + 1e-7).all()
    if fmt == "int8":  # amax/127 is idempotent (the int4 rule amax/7.5 is not: 7s -> 7s/7.5)
        q2, s2 = N.quantize_pack(deq, fmt)
        np.testing.assert_array_equal(N.unpack(fmt, q2, s2, 32, 512), deq)


def test_from_float_bf16_equals_from_compressed_int4(tmp_path):
    """Same bf16 weights, two routes (our quantiser; compressed-tensors + pass-through): the same
    packed layer file, byte for byte."""
    rng = np.random.default_rng(13)
    E, H, I = 3, 64, 96
    gate, up, down = (torch.from_numpy(a).to(torch.bfloat16) for a in random_experts(rng, E, H, I))
    ours = PackedLayer.from_float(gate, up, down, format="int4")
    parts = {name: [ct_pack(t[e]) for e in range(E)] for name, t in (("g", gate), ("u", up), ("d", down))}
    ct = PackedLayer.from_compressed_int4(
        [p for p, _ in parts["g"]], [s for _, s in parts["g"]], [p for p, _ in parts["u"]],
        [s for _, s in parts["u"]], [p for p, _ in parts["d"]], [s for _, s in parts["d"]])
    ours.save(tmp_path / "a.packed")
    ct.save(tmp_path / "b.packed")
    assert (tmp_path / "a.packed").read_bytes() == (tmp_path / "b.packed").read_bytes()


@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16"])
def test_save_load_round_trip(tmp_path, fmt):
    rng = np.random.default_rng(14)
    gate, up, down = random_experts(rng, 4, 64, 64)
    seen = []
    layer = PackedLayer.from_float(list(gate), list(up), list(down), format=fmt,
                                   progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    path = tmp_path / "layer.packed"
    layer.save(path)
    assert os.path.getsize(path) == layer.nbytes
    assert sorted(os.listdir(tmp_path)) == ["layer.packed"]  # no temp file left behind
    loaded = PackedLayer.load(path)
    assert (loaded.format, loaded.num_experts, loaded.hidden, loaded.intermediate) == (fmt, 4, 64, 64)
    assert loaded.path == str(path) and loaded.nbytes == layer.nbytes
    for e in range(4):
        for a, b in zip(layer.unpack_expert(e), loaded.unpack_expert(e)):
            assert torch.equal(a, b)
    g, u, d = loaded.unpack_expert(2)
    assert g.shape == (64, 64) and d.shape == (64, 64) and g.dtype == torch.float32
    layer.save(path)  # overwrite a file that is mapped: rename keeps the old mapping valid
    loaded.place()
    assert torch.equal(PackedLayer.load(path).unpack_expert(1)[0], loaded.unpack_expert(1)[0])


def test_k25_expert_size():
    layer = PackedLayer.from_float([np.zeros((2048, 7168), np.float32)], [np.zeros((2048, 7168), np.float32)],
                                   [np.zeros((7168, 2048), np.float32)], format="int4")
    # 3 x 7168 x 2048 int4 (22.0 MB) + bf16 scales per 32 (2.75 MB), each array 4 KiB padded.
    assert layer.expert_nbytes == 3 * 7168 * 2048 // 2 + 3 * 7168 * 2048 // 32 * 2
    assert layer.nbytes == 2 * 2**20 + layer.expert_nbytes


def test_load_rejects_bad_files(tmp_path):
    rng = np.random.default_rng(15)
    layer = PackedLayer.from_float(*random_experts(rng, 2, 32, 32), format="int8")
    good = tmp_path / "good.packed"
    layer.save(good)
    data = good.read_bytes()

    def write(name, blob):
        p = tmp_path / name
        p.write_bytes(blob)
        return p

    with pytest.raises(FileNotFoundError, match="missing.packed"):
        PackedLayer.load(tmp_path / "missing.packed")
    with pytest.raises(ValueError, match="short.packed.*shorter than its header"):
        PackedLayer.load(write("short.packed", data[:20]))
    with pytest.raises(ValueError, match="magic.packed.*bad magic"):
        PackedLayer.load(write("magic.packed", b"X" + data[1:]))
    with pytest.raises(ValueError, match="version"):
        PackedLayer.load(write("version.packed", data[:8] + (99).to_bytes(4, "little") + data[12:]))
    with pytest.raises(ValueError, match="truncated"):
        PackedLayer.load(write("trunc.packed", data[:-4096]))
    with pytest.raises(ValueError, match="header field hidden"):  # hidden = 33: not a multiple of 32
        PackedLayer.load(write("hidden.packed", data[:24] + (33).to_bytes(8, "little") + data[32:]))
    with pytest.raises(ValueError, match="header field expert_stride"):
        PackedLayer.load(write("stride.packed", data[:48] + (4096).to_bytes(8, "little") + data[56:]))
    # num_experts 2^50 with the total_bytes its size wraps to (2 MiB + 2^50 * stride mod 2^64): a
    # file this short would pass the size check, and experts would be read far outside the map.
    stride = int.from_bytes(data[48:56], "little")
    wrapped = ((2 << 20) + 2**50 * stride) % 2**64
    with pytest.raises(ValueError, match=r"header field num_experts must be in 1\.\.65536, got 1125899906842624"):
        PackedLayer.load(write("wrap.packed", data[:16] + (2**50).to_bytes(8, "little") + data[24:88]
                               + wrapped.to_bytes(8, "little") + data[96:]))


def test_save_writes_only_regular_files(tmp_path):
    """save() replaces a regular file or nothing: a link (to a file or to a device), a device, a
    folder or a FIFO at the path is refused and left as it was; a link planted at the temp file's
    name is never written through (the temp file is created new)."""
    layer = PackedLayer.from_float(*random_experts(np.random.default_rng(18), 2, 32, 32), format="int8")
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / "link.packed").symlink_to(victim)
    (tmp_path / "devlink.packed").symlink_to("/dev/null")
    (tmp_path / "dir.packed").mkdir()
    os.mkfifo(tmp_path / "fifo.packed")
    for name, kind in (("link.packed", "a symbolic link"), ("devlink.packed", "a symbolic link"),
                       ("dir.packed", "a directory"), ("fifo.packed", "a FIFO")):
        with pytest.raises(ValueError, match=f"{name}' is {kind}: a packed layer is saved only as"):
            layer.save(tmp_path / name)
    with pytest.raises(ValueError, match="/dev/null' is a device"):
        layer.save("/dev/null")
    with pytest.raises(ValueError, match="does not name a file"):
        layer.save(str(tmp_path) + "/")
    assert victim.read_bytes() == b"keep me" and (tmp_path / "link.packed").is_symlink()
    for pid_link in (f"x.packed.tmp-{os.getpid()}-{n}" for n in range(64)):
        (tmp_path / pid_link).symlink_to(victim)  # whatever the temp name's serial, it is not followed
    try:
        layer.save(tmp_path / "x.packed")
    except RuntimeError as e:  # the serial hit a planted name: refused (EEXIST), nothing written
        assert "cannot create" in str(e)
    assert victim.read_bytes() == b"keep me"
    layer.save(tmp_path / "ok.packed")
    assert PackedLayer.load(tmp_path / "ok.packed").nbytes == layer.nbytes


_TRUNCATE_WHILE_MAPPED = """
    import faulthandler, mmap, os, sys
    import numpy as np
    from native_ref import random_experts
    from hybrid.experts.cpu_moe import CpuMoE, PackedLayer
    path, how = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(19)
    PackedLayer.from_float(*random_experts(rng, 4, 64, 64), format="int4").save(path)
    layer = PackedLayer.load(path)
    moe = CpuMoE(layer, threads=2)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    ids, w = np.array([[0, 3], [1, 2], [3, 3]], np.int32), np.ones((3, 2), np.float32)
    moe.forward(x, ids, w)
    if how == "faulthandler-after":
        faulthandler.enable()
    if how == "other-file":  # a mapping nobody guards still faults as before
        with open(path + ".other", "wb") as f:
            f.write(bytes(65536))
        mm = mmap.mmap(os.open(path + ".other", os.O_RDONLY), 65536, prot=mmap.PROT_READ)
        os.truncate(path + ".other", 0)
        print(mm[40000])
    os.truncate(path, (2 << 20) + layer.expert_nbytes)  # experts 1..3 gone
    for what, call in (("forward", lambda: moe.forward(x, ids, w)), ("unpack", lambda: layer.unpack_expert(3)),
                       ("place", layer.place), ("again", lambda: moe.forward(x, ids, w))):
        try:
            call()
            print(what, "no error")
        except RuntimeError as e:
            print(what, "RuntimeError:", e)
"""


@pytest.mark.parametrize("how", ["plain", "faulthandler-before", "faulthandler-after"])
def test_file_truncated_while_mapped_is_an_error_not_sigbus(tmp_path, how):
    """A packed layer file that shrinks under a running model: the next sync (and unpacking,
    placing) raises RuntimeError naming the file, every time after; no SIGBUS, whether Python's
    faulthandler was enabled before the layer was mapped or after."""
    flags = ["-X", "faulthandler"] if how == "faulthandler-before" else []
    r = subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(_TRUNCATE_WHILE_MAPPED),
                        str(tmp_path / "l.packed"), how], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 0, r.stdout + r.stderr
    for what in ("forward", "unpack", "place", "again"):
        assert f"{what} RuntimeError: packed layer file '{tmp_path / 'l.packed'}' shrank while mapped" in r.stdout, \
            r.stdout + r.stderr


def test_unguarded_mapping_still_faults(tmp_path):
    """The handler repairs only packed layer mappings: another truncated mapping dies of SIGBUS
    as it would without hybrid."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_TRUNCATE_WHILE_MAPPED), str(tmp_path / "l.packed"),
                        "other-file"], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == -7, r.stdout + r.stderr


def test_from_float_and_ct_argument_errors():
    rng = np.random.default_rng(16)
    gate, up, down = random_experts(rng, 2, 64, 32)
    with pytest.raises(ValueError, match="format"):
        PackedLayer.from_float(gate, up, down, format="int3")
    with pytest.raises(ValueError, match="same number"):
        PackedLayer.from_float(gate, up[:1], down)
    with pytest.raises(ValueError, match=r"expert 0: down must have shape \[64, 32\]"):
        PackedLayer.from_float(gate, up, np.ascontiguousarray(down.transpose(0, 2, 1)))
    with pytest.raises(ValueError, match="hidden must be a positive multiple of 32"):
        PackedLayer.from_float(gate[:, :, :48], up[:, :, :48], down[:, :48])
    with pytest.raises(TypeError, match=r"expert 0: gate must have dtype float32 or bf16"):
        PackedLayer.from_float(gate.astype(np.float64), up, down)
    with pytest.raises(ValueError, match="C-contiguous"):
        PackedLayer.from_float([g.T.copy().T for g in gate], up, down)
    nan_up = up.copy()
    nan_up[1, 5, 40] = np.nan
    with pytest.raises(ValueError, match=r"expert 1: up: row 5, inputs 32..63 contain NaN or Inf"):
        PackedLayer.from_float(gate, nan_up, down, format="int4")
    with pytest.raises(ValueError, match="contain NaN or Inf"):
        N.quantize_pack(np.full((16, 32), np.inf, np.float32), "int8")
    packed, scale = ct_pack(torch.from_numpy(gate[0]))
    dp, ds = ct_pack(torch.from_numpy(down[0]))
    with pytest.raises(ValueError, match=r"up_scale has 0 experts, gate_packed has 1"):
        PackedLayer.from_compressed_int4([packed], [scale], [packed], [], [dp], [ds])
    with pytest.raises(TypeError, match=r"gate weight_packed must have dtype int32"):
        PackedLayer.from_compressed_int4([packed.float()], [scale], [packed], [scale], [dp], [ds])
    with pytest.raises(ValueError, match=r"expert 0: down weight_scale must have shape"):
        PackedLayer.from_compressed_int4([packed], [scale], [packed], [scale], [dp], [scale])


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_resident_memory_is_the_packed_size(tmp_path):
    """One copy of every expert: building a layer, and mapping + touching its file, each add its
    packed size to the resident set, give or take a few MB (page tables, allocator, hugepage
    rounding)."""
    rng = np.random.default_rng(17)
    gate, up, down = random_experts(rng, 8, 1024, 1024)
    before = rss_bytes()
    layer = PackedLayer.from_float(gate, up, down, format="int8")
    grown = rss_bytes() - before
    assert abs(grown - layer.nbytes) <= 6 << 20, (grown, layer.nbytes)
    path = tmp_path / "l.packed"
    layer.save(path)
    nbytes = layer.nbytes
    del layer, gate, up, down
    before = rss_bytes()
    mapped = PackedLayer.load(path)
    assert rss_bytes() - before < 4 << 20  # mapping alone reads nothing
    mapped.place()
    grown = rss_bytes() - before
    assert abs(grown - nbytes) <= 6 << 20, (grown, nbytes)
