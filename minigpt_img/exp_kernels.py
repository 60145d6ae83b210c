"""exp for the kernels' loops, as numba code that vectorises: exp_inplace (any argument), and
softmax_numerators, a softmax row's numerators exp(alpha z - shift) and their sum in one pass
(attention's rows, decoding's scores). libm's exp is a scalar call (about 6 ns an element here);
these run 8 float32 lanes per instruction.

With NUMBA_DISABLE_JIT=1 they run as plain Python: slow, but the same results.
"""
import numpy as np
import numba
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .jit import _JIT, _JIT_EXACT


# ---------------------------------------------------------------------------------------------
# exp that vectorises: libm's exp is a scalar call (about 6 ns here), the loops below are SIMD.
#
#   exp(x) = 2^k * exp(r),   k = round(x / ln 2),   r = x - k ln 2   (|r| <= ln2 / 2 + tiny)
#
# r is taken with ln 2 split in a high part (exact times any k here) and a low part, exp(r) is its
# Taylor series, and 2^k is written straight into the exponent bits: (k + bias) << mantissa bits.
# k goes through int32, a conversion SIMD units have (a libm floor call would stop the loop from
# vectorising). numba compiles these functions with the fast-math flags of the kernel that first
# calls them, and reassociation would merge the two parts of k ln 2; so the first loop stores the
# exact x - k ln2_hi and the second subtracts k ln2_lo from it, one operation, leaving nothing to
# reassociate. NaN stays NaN; inputs below the smallest normal result are clamped to it.
#
#   float64: Taylor to r^13 (error < 1e-16 on that range), about 1 ulp on [-708, 709].
#   float32: Taylor to r^7 (error < 6e-9), computed in float32, twice the SIMD lanes of float64
#            (8 per 256-bit instruction here): below 1 ulp on [-87, 88] (measured 0.8), and measured
#            2-3x faster than the float64 path.
# ---------------------------------------------------------------------------------------------
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01   # float64 ln 2 split: hi has 32 significant bits
_LN2_LO = 1.90821492927058770002e-10
_LN2_HI_32 = 0.693359375               # float32 split: hi = 355/512 has 9 bits, k * hi is exact
_LN2_LO_32 = -2.12194440e-4


@njit(**_JIT_EXACT)
def exp_inplace(a, work):
    """a[:] = exp(a) for a 1-D float32 or float64 array, computed in a's precision; work: scratch
    of a's dtype and at least a.size. (itemsize is a constant of the compiled type, so the branch
    not taken is optimised away.)"""
    if a.itemsize == 4:
        _exp_f32(a, work)
    else:
        _exp_f64(a, work)


@njit(**_JIT_EXACT)
def _exp_f64(a, work):
    n = a.size
    scale_bits = work[:n].view(np.int64)
    for i in range(n):  # k, the exact high part of r, and 2^k
        x = a[i]
        if x < -708.0:
            x = -708.0
        if x > 709.0:
            x = 709.0
        y = x * _LOG2E
        ki = np.int32(y + 0.5) if y >= 0.0 else np.int32(y - 0.5)    # round half away from zero
        a[i] = x - np.float64(ki) * _LN2_HI                          # exact: k * ln2_hi has spare bits
        scale_bits[i] = (np.int64(ki) + 1023) << 52                   # the double 2^k
    for i in range(n):  # r = high - k ln2_lo in ONE subtraction: nothing left to reassociate
        k = np.float64((scale_bits[i] >> 52) - 1023)
        r = a[i] - k * _LN2_LO
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        a[i] = (p * r + 1.0) * work[i]


@njit(**_JIT_EXACT)
def _exp_f32(a, work):
    n = a.size
    scale_bits = work[:n].view(np.int32)
    for i in range(n):  # the same two loops as _exp_f64, in float32
        x = a[i]
        if x < np.float32(-87.0):
            x = np.float32(-87.0)
        if x > np.float32(88.0):
            x = np.float32(88.0)
        y = x * np.float32(_LOG2E)
        ki = np.int32(y + np.float32(0.5)) if y >= 0 else np.int32(y - np.float32(0.5))
        a[i] = x - np.float32(ki) * np.float32(_LN2_HI_32)
        scale_bits[i] = (ki + np.int32(127)) << 23                   # the float 2^k
    for i in range(n):
        k = np.float32((scale_bits[i] >> 23) - 127)
        r = a[i] - k * np.float32(_LN2_LO_32)
        p = np.float32(1.0 / 5040.0)
        p = p * r + np.float32(1.0 / 720.0)
        p = p * r + np.float32(1.0 / 120.0)
        p = p * r + np.float32(1.0 / 24.0)
        p = p * r + np.float32(1.0 / 6.0)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        a[i] = (p * r + np.float32(1.0)) * work[i]


# ---------------------------------------------------------------------------------------------
# A softmax row's numerators in one pass, in base 2:
#
#   exp(alpha z - shift) = 2^y,   y = (alpha z - shift) log2 e = k + f,   k = round(y),
#   f = y - k in [-1/2, 1/2] (exact),   2^f = sum_i (f ln 2)^i / i!,   2^k into the exponent bits
#
# The scale (attention's 1 / sqrt(D)), the shift (the row's max or its log-sum-exp) and the exp take
# one pass over the row where they took three (a scaled and shifted copy, exp_inplace's two loops),
# and the sum rides along. 2^f: Taylor to f^7 in float32 (error < 6e-9), to f^13 in float64
# (< 5e-18). The sum is taken in the row's precision, in SIMD lanes of partial sums (as PyTorch's
# flash attention sums its float32 rows). y <= 0 (shift >= alpha max z) lets k be one truncating
# cast, and y is clamped below at the exponent's range (float32 -126, float64 -1022): smaller values
# come out as 2^-126 (2^-1022), as in exp_inplace; NaN stays NaN. Measured on an Intel Xeon, one
# thread, float32 tiles of 64 x 256 and 128 x 1,024: 0.28 and 0.25 ns an element, against 0.52 and
# 0.50 for the scaled and shifted copy, exp_inplace and the sum's pass. Inlined (inline="always"):
# as a call, passing the row cost more than the pass on rows of a few hundred elements.
# ---------------------------------------------------------------------------------------------
_TAYLOR_2F = tuple(float(np.log(2.0) ** i / np.prod(np.arange(1.0, i + 1))) for i in range(14))  # (ln 2)^i / i!


@intrinsic
def _float_from_bits_jit(typingctx, bits):
    """The float whose IEEE 754 bits are `bits`: int32 -> float32, int64 -> float64 (a bitcast)."""
    float_of = {types.int32: (types.float32, ir.FloatType()), types.int64: (types.float64, ir.DoubleType())}
    if bits not in float_of:
        return None
    result, lltype = float_of[bits]

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], lltype)
    return result(bits), codegen


def _float_from_bits_py(bits):
    return bits.view(np.float32 if bits.itemsize == 4 else np.float64)


# An intrinsic exists only in compiled code: with NUMBA_DISABLE_JIT=1 NumPy's view stands in for it
_float_from_bits = _float_from_bits_py if numba.config.DISABLE_JIT else _float_from_bits_jit


@njit(inline="always", **_JIT)
def softmax_numerators(row, n, alpha, shift):
    """row[:n] = exp(alpha row[:n] - shift) in row's precision (float32 or float64, 1-D, contiguous;
    alpha and shift rounded to it), in place, for shift >= alpha max(row[:n]) (the softmax's shift:
    the row's max or its log-sum-exp); returns their sum (a float64, summed in row's precision).
    row[n:] is left as it is."""
    if row.itemsize == 4:
        return _numerators_f32(row, n, alpha, shift)
    return _numerators_f64(row, n, alpha, shift)


@njit(inline="always", **_JIT)
def _numerators_f32(row, n, alpha, shift):
    alpha32, shift32 = np.float32(alpha), np.float32(shift)
    p7, p6, p5, p4 = (np.float32(_TAYLOR_2F[7]), np.float32(_TAYLOR_2F[6]), np.float32(_TAYLOR_2F[5]),
                      np.float32(_TAYLOR_2F[4]))
    p3, p2, p1 = np.float32(_TAYLOR_2F[3]), np.float32(_TAYLOR_2F[2]), np.float32(_TAYLOR_2F[1])
    total = np.float32(0.0)
    for c in range(n):
        y = (row[c] * alpha32 - shift32) * np.float32(_LOG2E)          # <= 0
        y = np.float32(-126.0) if y < np.float32(-126.0) else y
        k = np.int32(y - np.float32(0.5))                               # round(y): the cast truncates up
        f = y - np.float32(k)
        p = ((((((p7 * f + p6) * f + p5) * f + p4) * f + p3) * f + p2) * f + p1) * f + np.float32(1.0)
        e = p * _float_from_bits(np.int32((k + 127) << 23))             # numba widens int32 sums
        row[c] = e
        total += e
    return np.float64(total)


@njit(inline="always", **_JIT)
def _numerators_f64(row, n, alpha, shift):
    total = 0.0
    for c in range(n):
        y = (row[c] * alpha - shift) * _LOG2E
        y = -1022.0 if y < -1022.0 else y
        k = np.int64(y - 0.5)
        f = y - np.float64(k)
        p = _TAYLOR_2F[13]
        for i in range(12, -1, -1):                                     # Horner, unrolled by LLVM
            p = p * f + _TAYLOR_2F[i]
        e = p * _float_from_bits(np.int64((k + 1023) << 52))
        row[c] = e
        total += e
    return total


def softmax_numerators_ref(row, n, alpha, shift):
    alpha, shift = (float(row.dtype.type(x)) for x in (alpha, shift))          # as the kernel takes them
    e = np.exp(alpha * row[:n].astype(np.float64) - shift)
    row[:n] = e
    return float(e.sum())
