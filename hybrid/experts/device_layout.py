"""Routed experts in their compact form, and the layout they are held in on the device.

An expert travels from the host executor to the device cache as a CompactExpert: its three
matrices in their own bits (never dequantised on the way), in plain row-major form:

    format "int4"   q int8 in [-8, 7], scale bf16 [N, K/32]:  W[n, k] = q[n, k] * scale[n, k / 32]
    format "int8"   q int8 in [-127, 127], scale bf16 [N, K/32], the same rule
    format "dense"  q float (bf16 or fp32), no scale:          W = q

PackedLayer (cpu_moe.py) reads its packed layout (csrc/core/kernels.h) back into this form bit
for bit (compact_from_packed); the torch reference executor hands its tensors as "dense".

Device layout (DeviceExperts): C slots, H and I padded up to multiples of 32 (Hp, Ip; padding
holds zero weights), GH = Hp/32 groups along H, GI = Ip/32 groups along I. Each row-pair of a
matrix shares one storage element "pair" (P = 1 for int4: the byte holds row 2m in its low nibble
and row 2m + 1 in its high nibble, each as q + 8; P = 2 otherwise: the two rows side by side),
so the kernel splits even and odd rows without an interleave, and each program reads contiguous
bytes. The grouped kernel (grouped_experts_triton.py) gives one program 32 rows of I (block rb):

  gate_up_q [C, GI, GH, 2 (gate, up), P, 16 (m), 32 (k)]     row 32*rb + 2m + par, input 32*g + k
  gate_up_s [C, GI, GH, 2, 2 (par), 16 (m)] bf16             scale of that row and group g
  down_q    [C, GI, 2 (ip), P, Hp/2 (p), 16 (m)]             row 2p + par, input 32*gi + 2m + ip
  down_s    [C, GI, 2 (par), Hp/2 (p)] bf16                  scale of row 2p + par, group gi

For "dense" the scale tensors are empty. Bytes per expert at K2.5 size (H 7168, I 2048): int4
3 x H x I x (1/2 + 2/32) = 24.8 MB, int8 46.8 MB, bf16 88.1 MB: the same as the CPU layout.

Legend: C slots, N rows (outputs), K inputs, H hidden, I expert width, m row pair in a block of
32 rows, par row parity, ip input parity.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from hybrid.planner.model_spec import GROUP  # 32 inputs per quantisation group (Kimi's)

FORMATS = ("int4", "int8", "dense")


@dataclass
class CompactMatrix:
    q: torch.Tensor                 # [N, K] int8 (int4/int8 formats) or float (dense)
    scale: torch.Tensor | None      # [N, K/32] bf16, None for dense


@dataclass
class CompactExpert:
    format: str                     # one of FORMATS
    gate: CompactMatrix             # [I, H]
    up: CompactMatrix               # [I, H]
    down: CompactMatrix             # [H, I]

    @classmethod
    def dense(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> "CompactExpert":
        return cls("dense", CompactMatrix(gate, None), CompactMatrix(up, None),
                   CompactMatrix(down, None))

    @property
    def shape(self) -> tuple[int, int]:
        """(H, I)."""
        I, H = self.gate.q.shape
        return H, I

    def check(self, where: str) -> None:
        """ValueError naming `where` when the matrices do not make one expert."""
        if self.format not in FORMATS:
            raise ValueError(f"{where}: format must be one of {', '.join(FORMATS)}, got "
                             f"{self.format!r}")
        if self.gate.q.dim() != 2:
            raise ValueError(f"{where}: gate must be [I, H], got {tuple(self.gate.q.shape)}")
        H, I = self.shape
        want = {"gate": (I, H), "up": (I, H), "down": (H, I)}
        for name, m in (("gate", self.gate), ("up", self.up), ("down", self.down)):
            if tuple(m.q.shape) != want[name]:
                raise ValueError(f"{where}: {name} has shape {tuple(m.q.shape)}; expected "
                                 f"{list(want[name])} (gate/up [I={I}, H={H}], down [H, I])")
            if self.format == "dense":
                if not m.q.is_floating_point():
                    raise ValueError(f"{where}: dense {name} must be a float tensor, got {m.q.dtype}")
                continue
            if m.q.dtype != torch.int8:
                raise ValueError(f"{where}: {self.format} {name} q must be int8, got {m.q.dtype}")
            n, k = want[name]
            if m.scale is None or tuple(m.scale.shape) != (n, k // GROUP) or k % GROUP:
                raise ValueError(f"{where}: {self.format} {name} needs K % 32 == 0 and a bf16 "
                                 f"scale [{n}, {k // GROUP}], got "
                                 f"{None if m.scale is None else tuple(m.scale.shape)}")

    def dequantised(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [I, H], up [I, H], down [H, I]) fp32, exactly the stored weights."""
        return tuple(_dequantise(m) for m in (self.gate, self.up, self.down))


def _dequantise(m: CompactMatrix) -> torch.Tensor:
    if m.scale is None:
        return m.q.float()
    return (m.q.float().view(m.q.shape[0], -1, GROUP)
            * m.scale.float()[:, :, None]).view(m.q.shape)


# ---- the CPU packed layout, read back ---------------------------------------------------------

def _tensor(a, device) -> torch.Tensor:
    """A read-only numpy view of the packed layer as a torch tensor on `device` (a view when
    that is the CPU: never written through; else one copy of the packed bytes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns on non-writable arrays
        return torch.from_numpy(a).to(device)


def _packed_matrices(fmt: str, qb: torch.Tensor, sb: torch.Tensor | None, n: int,
                     k: int) -> CompactMatrix:
    """B [N, K] matrices of the CPU layout (kernels.h) in compact form, bit for bit: qb [B, bytes]
    uint8 (the packed qweight of each), sb [B, N*K/32] int16 (their bf16 scales) or None.
    Returns q [B, N, K], scale [B, N, K/32]."""
    B, nb, g = qb.shape[0], n // 16, k // GROUP
    if fmt == "int4":   # [nb][g][4 chunks c][16 lanes r][4 bytes j]: k = 32g + 8c + 4*nibble + j
        q4 = qb.view(B, nb, g, 4, 16, 4).permute(0, 1, 4, 2, 3, 5)         # [B, nb, r, g, c, j]
        nib = torch.stack((q4 & 15, q4 >> 4), dim=5)                        # [B, nb, r, g, c, 2, j]
        q = nib.reshape(B, n, k).to(torch.int8) - 8
    elif fmt == "int8":  # [nb][g][8 chunks c][16 lanes][4 bytes j], u8 = q + 128: k = 32g + 4c + j
        q8 = qb.view(B, nb, g, 8, 16, 4).permute(0, 1, 4, 2, 3, 5)
        q = (q8.reshape(B, n, k).to(torch.int16) - 128).to(torch.int8)
    else:                # bf16: [nb][k/2][16 lanes][2]
        q = qb.view(torch.bfloat16).view(B, nb, k // 2, 16, 2).permute(0, 1, 3, 2, 4).reshape(B, n, k)
        return CompactMatrix(q, None)
    s = sb.view(torch.bfloat16).view(B, nb, g, 16).permute(0, 1, 3, 2).reshape(B, n, g)
    return CompactMatrix(q, s)


def host_bytes(a) -> torch.Tensor:
    """A packed array (Layer.expert_arrays) as a read-only uint8 torch view on the host."""
    return _tensor(a.view("uint8"), "cpu")


def _split_gate_up(t: torch.Tensor | None, I: int, j: int) -> torch.Tensor | None:
    """Rows of gate (j = 0) or up (j = 1) of a [B, 2I, X] gate_up that interleaves 16-row
    blocks (gate block b, then up block b)."""
    return None if t is None else t.view(t.shape[0], I // 16, 2, 16, -1)[:, :, j].reshape(t.shape[0], I, -1)


def compact_batch(fmt: str, gu_q, gu_s, dn_q, dn_s, hidden: int, intermediate: int):
    """B experts of a packed layer in compact form at once: the four arrays of
    Layer.expert_arrays stacked per expert ([B, bytes] uint8 qweights, [B, n] int16 scales or
    None), already on the device that unpacks them. -> (gate, up, down) CompactMatrix with a
    leading B dim."""
    H, I = hidden, intermediate
    gu = _packed_matrices(fmt, gu_q, gu_s, 2 * I, H)
    gate = CompactMatrix(_split_gate_up(gu.q, I, 0), _split_gate_up(gu.scale, I, 0))
    up = CompactMatrix(_split_gate_up(gu.q, I, 1), _split_gate_up(gu.scale, I, 1))
    return gate, up, _packed_matrices(fmt, dn_q, dn_s, H, I)


def compact_format(fmt: str) -> str:
    """The CompactExpert format of a packed layer's format ("int4", "int8", "bf16")."""
    return "dense" if fmt == "bf16" else fmt


def compact_from_packed(fmt: str, arrays, hidden: int, intermediate: int,
                        device="cpu") -> CompactExpert:
    """fmt: the packed layer's format ("int4", "int8", "bf16"); arrays: Layer.expert_arrays(e)
    (gate_up qweight, gate_up scales, down qweight, down scales). device: where the tensors are
    made (the packed bytes are copied there first, so a GPU does the unpacking)."""
    t = [None if a is None else _tensor(a.view("int16") if a.itemsize == 2 else a, device)[None]
         for a in arrays]
    gate, up, down = compact_batch(fmt, *t, hidden, intermediate)
    one = [CompactMatrix(m.q[0], None if m.scale is None else m.scale[0]) for m in (gate, up, down)]
    return CompactExpert(compact_format(fmt), *one)


# ---- the device layout ------------------------------------------------------------------------

def _pad32(n: int) -> int:
    return -(-n // GROUP) * GROUP


def _padded(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[B, N, K] -> [B, rows, cols], zeros beyond."""
    if t.shape[1:] == (rows, cols):
        return t
    out = t.new_zeros(t.shape[0], rows, cols)
    out[:, : t.shape[1], : t.shape[2]] = t
    return out


def _pair_rows(q: torch.Tensor, fmt: str, dim: int) -> torch.Tensor:
    """Fold the row-parity dimension `dim` (size 2) of q: int4 -> one byte per pair (low
    nibble row 2m, high nibble 2m + 1, each q + 8); others keep both (P = 2)."""
    if fmt != "int4":
        return q
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    lo, hi = u.select(dim, 0), u.select(dim, 1)
    return (lo | (hi << 4)).unsqueeze(dim)


def _unpair_rows(q: torch.Tensor, fmt: str, dim: int) -> torch.Tensor:
    if fmt != "int4":
        return q
    b = q.select(dim, 0)
    return torch.stack(((b & 15).to(torch.int8) - 8, (b >> 4).to(torch.int8) - 8), dim=dim)


def _storage_dtype(fmt: str, dtype: torch.dtype) -> torch.dtype:
    return {"int4": torch.uint8, "int8": torch.int8}.get(fmt, dtype)


class DeviceExperts:
    """C experts of one format in the device layout above, on one device. Slots are written one
    expert at a time (write), read back by the reference path (slot_weights)."""

    def __init__(self, fmt: str, slots: int, hidden: int, intermediate: int, device,
                 dtype: torch.dtype = torch.bfloat16):
        """dtype: the storage dtype of "dense" weights (bf16 or fp32); ignored otherwise."""
        if fmt not in FORMATS:
            raise ValueError(f"device experts: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.format, self.hidden, self.intermediate = fmt, hidden, intermediate
        Hp, Ip = _pad32(hidden), _pad32(intermediate)
        GH, GI, P = Hp // GROUP, Ip // GROUP, (1 if fmt == "int4" else 2)
        self.groups_h, self.groups_i, self.pairs = GH, GI, P
        st = _storage_dtype(fmt, dtype)
        C = slots
        self.gate_up_q = torch.zeros(C, GI, GH, 2, P, 16, GROUP, dtype=st, device=device)
        self.down_q = torch.zeros(C, GI, 2, P, Hp // 2, 16, dtype=st, device=device)
        scaled = fmt != "dense"
        self.gate_up_s = torch.zeros((C, GI, GH, 2, 2, 16) if scaled else (C, 0), dtype=torch.bfloat16,
                                     device=device)
        self.down_s = torch.zeros((C, GI, 2, Hp // 2) if scaled else (C, 0), dtype=torch.bfloat16,
                                  device=device)

    @property
    def slots(self) -> int:
        return self.gate_up_q.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.gate_up_q, self.gate_up_s, self.down_q, self.down_s))

    def head(self, n: int) -> "DeviceExperts":
        """The first n slots, sharing storage."""
        out = object.__new__(DeviceExperts)
        out.__dict__.update(self.__dict__)
        for name in ("gate_up_q", "gate_up_s", "down_q", "down_s"):
            setattr(out, name, getattr(self, name)[:n])
        return out

    def write(self, slot: int, ex: CompactExpert, where: str) -> None:
        """Put expert `ex` (checked against this layout, ValueError naming `where`) into `slot`."""
        ex.check(where)
        if ex.format != self.format or ex.shape != (self.hidden, self.intermediate):
            raise ValueError(f"{where}: a {ex.format} expert of H={ex.shape[0]}, I={ex.shape[1]} "
                             f"does not fit a cache of {self.format} experts of H={self.hidden}, "
                             f"I={self.intermediate}")
        one = [CompactMatrix(m.q[None], None if m.scale is None else m.scale[None])
               for m in (ex.gate, ex.up, ex.down)]
        self.write_batch(slot, *one)

    def write_batch(self, start: int, gate: CompactMatrix, up: CompactMatrix,
                    down: CompactMatrix) -> None:
        """Slots [start, start + B) from B experts in compact form with a leading B dim
        (compact_batch), in this layout's format and shape (the caller checked them)."""
        GH, GI = self.groups_h, self.groups_i
        Hp, Ip = GH * GROUP, GI * GROUP
        B = gate.q.shape[0]
        st = self.gate_up_q.dtype
        dense = self.format == "dense"
        gu_q, gu_s = [], []
        for m in (gate, up):
            q = _padded(m.q.to(st) if dense else m.q, Ip, Hp)
            q = q.view(B, GI, 16, 2, GH, GROUP).permute(0, 1, 4, 3, 2, 5)   # [B, GI, GH, par, m, k]
            gu_q.append(_pair_rows(q, self.format, 3))
            if m.scale is not None:
                s = _padded(m.scale, Ip, GH).view(B, GI, 16, 2, GH).permute(0, 1, 4, 3, 2)  # [B, GI, GH, par, m]
                gu_s.append(s)
        slots = slice(start, start + B)
        self.gate_up_q[slots].copy_(torch.stack(gu_q, dim=3))
        q = _padded(down.q.to(st) if dense else down.q, Hp, Ip)
        q = q.view(B, Hp // 2, 2, GI, 16, 2).permute(0, 3, 5, 2, 1, 4)      # [B, GI, ip, par, p, m]
        self.down_q[slots].copy_(_pair_rows(q, self.format, 3))
        if gu_s:
            self.gate_up_s[slots].copy_(torch.stack(gu_s, dim=3))
            s = _padded(down.scale, Hp, GI).view(B, Hp // 2, 2, GI).permute(0, 3, 2, 1)  # [B, GI, par, p]
            self.down_s[slots].copy_(s)

    def slot_weights(self, slot) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slot `slot` (an int or a 0-d device tensor) dequantised: (gate [I, H], up [I, H],
        down [H, I]) fp32 on the device, unpadded: the weights the kernel multiplies by."""
        GH, GI = self.groups_h, self.groups_i
        Hp, Ip = GH * GROUP, GI * GROUP
        H, I = self.hidden, self.intermediate
        q = _unpair_rows(self.gate_up_q[slot], self.format, 3).float()           # [GI, GH, 2, 2, 16, 32]
        if self.format != "dense":
            q = q * self.gate_up_s[slot].float()[..., None]
        gu = q.permute(2, 0, 4, 3, 1, 5).reshape(2, Ip, Hp)                     # [w, i, h]
        q = _unpair_rows(self.down_q[slot], self.format, 2).float()              # [GI, ip, par, p, m]
        if self.format != "dense":
            q = q * self.down_s[slot].float()[:, None, :, :, None]
        down = q.permute(3, 2, 0, 4, 1).reshape(Hp, Ip)
        return gu[0, :I, :H], gu[1, :I, :H], down[:H, :I]
