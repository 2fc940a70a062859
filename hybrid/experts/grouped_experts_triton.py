"""The grouped expert kernel (Triton): a MoE layer's whole device share in one launch.

    grouped_experts_triton(x, plan, experts, y)    # y [T, H] fp32, added to (atomics)

One program per (tile, rb): a tile is up to BM (token, expert) pairs of one slot (the plan of
grouped_experts.py), rb a block of 32 rows of the expert width I. The program
  1. streams the slot's gate and up rows [32 rb, 32 rb + 32) over all of H, 32 inputs (one
     quantisation group) per step: int4/int8 weights are expanded in registers to the
     activation dtype exactly (q, not q * scale), multiplied with the tile's activations on the
     tensor cores (fp32 accumulate), and the group's scale applied to the [BM, 16] partial sum;
  2. h = SiLU(gate) * up * pair weight, [BM, 32] fp32, rounded to the activation dtype;
  3. streams the slot's down columns [32 rb, 32 rb + 32) (exactly one down scale group) block of
     rows by block of rows, and atomically adds h @ down^T into y at the tile's tokens.
So every weight byte a tile needs is read once, by one program; the I-split of down is a sum
of partial products, which the fp32 atomics add. Even and odd rows are separate operands
(device_layout.py), so no interleave is needed.

Under the interpreter (tests) the products run on fp32 operands: see hybrid/ops/triton_util.py.

Legend: T tokens, H hidden, I expert width, BM pairs per tile, BP row pairs per down block,
GS quantisation groups of H per gate/up step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybrid.experts.device_layout import DeviceExperts
from hybrid.ops.triton_util import interpreting, mm

_FORMAT_CODE = {"int4": 0, "int8": 1, "dense": 2}
# BP: row pairs of down per step, GS: H groups per gate/up step; the largest of each that
# divides H/2 (H/32) padded, at most the cap for the tile height BM. Caps from ptxas -v for
# sm_90 (compiled on the CPU, tests/test_triton_compile.py): BM 16 with BP 32, GS 4 takes 136
# registers (3 programs of 4 warps per SM; BP 64 took 180: 2), BM 64 with BP 32, GS 2 takes
# 168 and no spills (BP 64, GS 4 took 255 and spilled).
BLOCK_PAIRS = (32, 16)
GROUP_STEPS = {16: (4, 2, 1), 64: (2, 1)}


@triton.jit
def _rows(q_ptr, off, stride_par, idx, FMT: tl.constexpr, OP: tl.constexpr):
    """The even- and odd-row operands at q_ptr + off + idx (idx a [R, C] offset block), in OP:
    int4 (one byte = two rows, nibble - 8), int8 or dense (the odd rows stride_par further).
    Integers go through fp32 (exact; see triton_util.py)."""
    if FMT == 0:
        b = tl.load(q_ptr + off + idx)
        even = ((b & 15).to(tl.float32) - 8.0).to(OP)
        odd = ((b >> 4).to(tl.float32) - 8.0).to(OP)
    elif FMT == 1:
        even = tl.load(q_ptr + off + idx).to(tl.float32).to(OP)
        odd = tl.load(q_ptr + off + stride_par + idx).to(tl.float32).to(OP)
    else:
        even = tl.load(q_ptr + off + idx).to(OP)
        odd = tl.load(q_ptr + off + stride_par + idx).to(OP)
    return even, odd


@triton.jit
def _grouped_experts_kernel(
        x_ptr, y_ptr, tok_ptr, wt_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
        guq_ptr, gus_ptr, dnq_ptr, dns_ptr,
        H, GH, GI, HP2, stride_x, stride_y,
        FMT: tl.constexpr, ACT: tl.constexpr, OP: tl.constexpr, F32: tl.constexpr,
        P: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, GS: tl.constexpr):
    j = tl.program_id(0)
    rb = tl.program_id(1).to(tl.int64)
    start = tl.load(tile_start_ptr + j)
    n = tl.load(tile_end_ptr + j) - start
    if n > 0:
        s = tl.load(tile_slot_ptr + j).to(tl.int64)
        r = tl.arange(0, BM)
        rmask = r < n
        tok = tl.load(tok_ptr + start + r, mask=rmask, other=0).to(tl.int64)      # [BM]
        wt = tl.load(wt_ptr + start + r, mask=rmask, other=0.0)                    # [BM]
        m = tl.arange(0, 16)
        k = tl.arange(0, 32)
        idx_mk = m[:, None] * 32 + k[None, :]                                      # [16, 32]
        ge = tl.zeros([BM, 16], dtype=tl.float32)
        go = tl.zeros([BM, 16], dtype=tl.float32)
        ue = tl.zeros([BM, 16], dtype=tl.float32)
        uo = tl.zeros([BM, 16], dtype=tl.float32)
        blk = s * GI + rb
        for g0 in range(0, GH, GS):  # GS groups per step: more bytes in flight per iteration
            for gi in tl.static_range(GS):
                g = g0 + gi
                kk = g * 32 + k
                xg = tl.load(x_ptr + tok[:, None] * stride_x + kk[None, :],
                             mask=rmask[:, None] & (kk < H)[None, :], other=0.0)       # [BM, 32]
                base = (blk * GH + g) * 2                                             # (.., g, w=0)
                gev, god = _rows(guq_ptr, base * P * 512, 512, idx_mk, FMT, OP)       # [16, 32] x2
                uev, uod = _rows(guq_ptr, (base + 1) * P * 512, 512, idx_mk, FMT, OP)
                pe = mm(xg, gev, F32)                                                  # [BM, 16]
                po = mm(xg, god, F32)
                qe = mm(xg, uev, F32)
                qo = mm(xg, uod, F32)
                if FMT != 2:
                    sbase = base * 2 * 16                                          # (.., w, par, m)
                    pe = pe * tl.load(gus_ptr + sbase + m).to(tl.float32)[None, :]
                    po = po * tl.load(gus_ptr + sbase + 16 + m).to(tl.float32)[None, :]
                    qe = qe * tl.load(gus_ptr + sbase + 32 + m).to(tl.float32)[None, :]
                    qo = qo * tl.load(gus_ptr + sbase + 48 + m).to(tl.float32)[None, :]
                ge += pe
                go += po
                ue += qe
                uo += qo
        # h for I rows 32 rb + 2m (he) and 32 rb + 2m + 1 (ho), the pair weight folded in.
        he = (ge / (1.0 + tl.exp(-ge)) * ue * wt[:, None]).to(ACT)                 # [BM, 16]
        ho = (go / (1.0 + tl.exp(-go)) * uo * wt[:, None]).to(ACT)
        pp = tl.arange(0, BP)
        idx_pm = pp[:, None] * 16 + m[None, :]                                     # [BP, 16]
        dbase = blk * 2                                                            # (.., ip=0)
        for p0 in range(0, HP2, BP):
            # inputs 32 rb + 2m + ip; the odd rows of H (par 1) P * HP2 * 16 elements further
            de0, do0 = _rows(dnq_ptr, (dbase * P * HP2 + p0) * 16, HP2 * 16, idx_pm, FMT, OP)
            de1, do1 = _rows(dnq_ptr, ((dbase + 1) * P * HP2 + p0) * 16, HP2 * 16, idx_pm, FMT, OP)
            ye = mm(he, de0, F32) + mm(ho, de1, F32)                              # [BM, BP] rows 2p
            yo = mm(he, do0, F32) + mm(ho, do1, F32)                               # rows 2p + 1
            if FMT != 2:
                ye = ye * tl.load(dns_ptr + blk * 2 * HP2 + p0 + pp).to(tl.float32)[None, :]
                yo = yo * tl.load(dns_ptr + (blk * 2 + 1) * HP2 + p0 + pp).to(tl.float32)[None, :]
            ne = 2 * (p0 + pp)                                                     # [BP]
            rows = tok[:, None] * stride_y
            tl.atomic_add(y_ptr + rows + ne[None, :], ye,          # relaxed: only the sum matters
                          mask=rmask[:, None] & (ne < H)[None, :], sem="relaxed")
            tl.atomic_add(y_ptr + rows + ne[None, :] + 1, yo,
                          mask=rmask[:, None] & (ne + 1 < H)[None, :], sem="relaxed")


def grouped_experts_triton(x: torch.Tensor, plan, experts: DeviceExperts, y: torch.Tensor) -> None:
    """Add the device share to y [T, H] fp32 (contiguous rows). x [T, H] bf16 or fp32 (the
    activation dtype; fp32 multiplies in fp32 exactly), plan: grouped_experts.TilePlan."""
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"grouped experts: x must be bf16 or fp32, got {x.dtype}")
    if y.dtype != torch.float32 or y.shape != x.shape or y.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"grouped experts: y must be fp32 {tuple(x.shape)} with unit inner "
                         f"stride, x too; got y {y.dtype} {tuple(y.shape)}")
    n_tiles = plan.tile_slot.shape[0]
    if n_tiles == 0 or experts.slots == 0:
        return
    GI = experts.groups_i
    act = tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float32
    f32 = x.dtype == torch.float32 or interpreting()
    scaled = experts.format != "dense"   # dense: no scales, the (empty) tensors are not passed
    _grouped_experts_kernel[(n_tiles, GI)](
        x, y, plan.token, plan.weight, plan.tile_slot, plan.tile_start, plan.tile_end,
        experts.gate_up_q, experts.gate_up_s if scaled else experts.gate_up_q,
        experts.down_q, experts.down_s if scaled else experts.down_q,   # dense: never read
        experts.hidden, experts.groups_h, GI, experts.groups_h * 16, x.stride(0), y.stride(0),
        FMT=_FORMAT_CODE[experts.format], ACT=act, OP=tl.float32 if f32 else act, F32=f32,
        P=experts.pairs,
        BM=plan.block_m, BP=next(b for b in BLOCK_PAIRS if experts.groups_h * 16 % b == 0),
        GS=next(g for g in GROUP_STEPS[plan.block_m] if experts.groups_h % g == 0))
