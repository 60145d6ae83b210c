"""numba's compile settings, shared by every kernel module (kernels, exp_kernels, attention,
decode_kernels, palette_kernels).

Compiled kernels are cached on disk (cache=True) and release the GIL (nogil=True).
"""
# No 'nnan'/'ninf' fast-math flags: a NaN loss must stay NaN so training can detect it.
_FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
# error_model="numpy": a float division by zero gives inf/NaN as in NumPy instead of raising; the
# check Python's semantics need is a branch per division that stops the loop from vectorising
# (measured 6x on the activation's sigmoid).
_JIT = dict(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
_JIT_EXACT = dict(cache=True, nogil=True, error_model="numpy")  # no fast-math: operation order kept
