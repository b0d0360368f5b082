"""The Triton kernels of engine/group_norm.py (imported on first use: Triton picks its interpreter at import time).

Layout: x is walked as (n, c, pixel) with strides (sx_n, sx_c, sx_hw), so NCHW and channels_last tensors both work; a
group's channels are g*CPG .. g*CPG + CPG - 1. One program handles one block of BLOCK_HW pixels of one (sample,
group); both kernels use the same grid (N*G, P).

Every sum is taken of x minus a pivot, the group's first value (shifts included), and the block means are kept
relative to it: summing raw values of 1000 +- 0.01 in float32 loses the mean's last bits (a block of 4096 sums to
4e6, where one float32 step is 0.5), which on the GPU's tree reductions moved the output by 1 % of the spread. The
differences from the pivot are exact when the values are close to it, and small whatever they are.
"""

import triton
import triton.language as tl


@triton.jit
def shifted(x_ptr, a_ptr, b_ptr, n, ch, hw, mask, cmask, sx_n, sx_c, sx_hw, sa_n,
            SHIFT_A: tl.constexpr, SHIFT_B: tl.constexpr):
    """One tile of x in float32, plus the per-(sample, channel) shift a and the per-channel shift b if given."""
    x = tl.load(x_ptr + n * sx_n + ch[None, :] * sx_c + hw[:, None] * sx_hw, mask=mask, other=0.0).to(tl.float32)
    if SHIFT_A:
        x += tl.load(a_ptr + n * sa_n + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SHIFT_B:
        x += tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return x


@triton.jit
def pivot(x_ptr, a_ptr, b_ptr, n, ch0, sx_n, sx_c, sa_n, SHIFT_A: tl.constexpr, SHIFT_B: tl.constexpr):
    """The group's first value (pixel 0 of channel ch0), shifts included, in float32: the origin of every sum."""
    v = tl.load(x_ptr + n * sx_n + ch0 * sx_c).to(tl.float32)
    if SHIFT_A:
        v += tl.load(a_ptr + n * sa_n + ch0).to(tl.float32)
    if SHIFT_B:
        v += tl.load(b_ptr + ch0).to(tl.float32)
    return v


@triton.jit
def block_stats(x_ptr, a_ptr, b_ptr, part_ptr, HW, CPG, G, P, sx_n, sx_c, sx_hw, sa_n,
                SHIFT_A: tl.constexpr, SHIFT_B: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_CPG: tl.constexpr):
    """Program (n*G + g, p): count, mean (relative to the pivot) and sum of squared deviations of one block of group
    g in sample n."""
    ng = tl.program_id(0)
    p = tl.program_id(1)
    n = ng // G
    g = ng % G
    hw = p * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = tl.arange(0, BLOCK_CPG)
    cmask = c < CPG
    mask = (hw < HW)[:, None] & cmask[None, :]
    x = shifted(x_ptr, a_ptr, b_ptr, n, g * CPG + c, hw, mask, cmask, sx_n, sx_c, sx_hw, sa_n, SHIFT_A, SHIFT_B)
    origin = pivot(x_ptr, a_ptr, b_ptr, n, g * CPG, sx_n, sx_c, sa_n, SHIFT_A, SHIFT_B)
    x = tl.where(mask, x - origin, 0.0)  # the shifts reach the masked lanes too
    count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    d = tl.where(mask, x - mean, 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
    out = part_ptr + (ng * P + p) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def normalize(x_ptr, a_ptr, b_ptr, y_ptr, weight_ptr, bias_ptr, part_ptr, HW, CPG, G, P, eps,
              sx_n, sx_c, sx_hw, sa_n, sy_n, sy_c, sy_hw, SHIFT_A: tl.constexpr, SHIFT_B: tl.constexpr,
              SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_CPG: tl.constexpr):
    """Program (n*G + g, p): merge group g's block statistics, then write a*x + b (and its SiLU) for block p."""
    ng = tl.program_id(0)
    p = tl.program_id(1)
    n = ng // G
    g = ng % G
    blocks = tl.arange(0, BLOCK_P)
    have = blocks < P
    part = part_ptr + (ng * P + blocks) * 3
    counts = tl.load(part, mask=have, other=0.0)
    means = tl.load(part + 1, mask=have, other=0.0)
    m2s = tl.load(part + 2, mask=have, other=0.0)
    total = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / total
    spread = tl.where(have, means - mean, 0.0)
    var = (tl.sum(m2s, axis=0) + tl.sum(counts * spread * spread, axis=0)) / total
    rstd = 1.0 / tl.sqrt(var + eps)
    hw = p * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = tl.arange(0, BLOCK_CPG)
    cmask = c < CPG
    mask = (hw < HW)[:, None] & cmask[None, :]
    ch = g * CPG + c
    x = shifted(x_ptr, a_ptr, b_ptr, n, ch, hw, mask, cmask, sx_n, sx_c, sx_hw, sa_n, SHIFT_A, SHIFT_B)
    x -= pivot(x_ptr, a_ptr, b_ptr, n, g * CPG, sx_n, sx_c, sa_n, SHIFT_A, SHIFT_B)  # the means are relative to it
    w = tl.load(weight_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    y = (x - mean) * (rstd * w)[None, :] + b[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + n * sy_n + ch[None, :] * sy_c + hw[:, None] * sy_hw, y.to(y_ptr.dtype.element_ty), mask=mask)
