"""The kernels' exp: exp_shifted, exp(alpha z - shift) <= 1 over a row in one pass, with the sum.

Every exp the package takes has an argument <= 0: a softmax's numerators exp(z - max z) (attention's
rows, decoding's scores, the cross-entropy's rows, their backward passes with the log-sum-exp as the
shift) and the activation's exp(-1.702 |x|). libm's exp is a scalar call (about 6 ns an element
here); exp_shifted is numba code that vectorises, 8 float32 lanes per instruction.

With NUMBA_DISABLE_JIT=1 it runs as plain Python: slow, but the same results.
"""
import numpy as np
import numba
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .jit import _JIT


# ---------------------------------------------------------------------------------------------
# exp(alpha z - shift) over a row in one pass, in base 2:
#
#   exp(alpha z - shift) = 2^y,   y = (alpha z - shift) log2 e = k + f,   k = round(y),
#   f = y - k in [-1/2, 1/2] (exact),   2^f = sum_i (f ln 2)^i / i!,   2^k into the exponent bits
#
# The scale (attention's 1 / sqrt(D)), the shift (the row's max or its log-sum-exp) and the exp take
# one pass over the row (a scaled and shifted copy and a two-loop exp took three), and the sum rides
# along. 2^f: Taylor to f^7 in float32 (error < 6e-9), to f^13 in float64 (< 5e-18); rounding y
# costs a relative error of about |y| ulps, as rounding the argument alpha z - shift itself does.
# The sum is taken in the row's precision, in SIMD lanes of partial sums (as PyTorch's flash
# attention sums its float32 rows). y <= 0 (shift >= alpha max z) lets k be one truncating cast, and
# y is clamped below at the exponent's range (float32 -126, float64 -1022): smaller values come out
# as 2^-126 (2^-1022); NaN stays NaN. 2^k is written into the exponent bits through a bitcast (an
# LLVM intrinsic), which vectorises. Measured on an Intel Xeon, one thread, float32 tiles of 64 x
# 256 and 128 x 1,024: 0.28 and 0.25 ns an element, against 0.52 and 0.50 for the scaled and shifted
# copy, the two-loop exp and the sum's pass. Inlined (inline="always"): as a call, passing the row
# cost more than the pass on rows of a few hundred elements.
# ---------------------------------------------------------------------------------------------
_LOG2E = 1.4426950408889634
_TAYLOR_2F = tuple(float(np.log(2.0) ** i / np.prod(np.arange(1.0, i + 1))) for i in range(14))  # ln2^i/i!


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
def exp_shifted(row, n, alpha, shift):
    """row[:n] = exp(alpha row[:n] - shift) in row's precision (float32 or float64, 1-D, contiguous;
    alpha and shift rounded to it), in place, for shift >= alpha max(row[:n]) (the softmax's shift:
    the row's max or its log-sum-exp); returns their sum (a float64, summed in row's precision).
    row[n:] is left as it is."""
    if row.itemsize == 4:
        return _exp_shifted_f32(row, n, alpha, shift)
    return _exp_shifted_f64(row, n, alpha, shift)


@njit(inline="always", **_JIT)
def _exp_shifted_f32(row, n, alpha, shift):
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
def _exp_shifted_f64(row, n, alpha, shift):
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


def exp_shifted_ref(row, n, alpha, shift):
    alpha, shift = (float(row.dtype.type(x)) for x in (alpha, shift))          # as the kernel takes them
    e = np.exp(alpha * row[:n].astype(np.float64) - shift)
    row[:n] = e
    return float(e.sum())
