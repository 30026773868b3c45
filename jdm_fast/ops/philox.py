"""The counter-based Gaussian noise stream of jdm_fast, in NumPy: the documented reference.

The compiled ops (``q_sample_philox``, and ``ancestral_step`` / ``ddim_step`` given a seed) draw
exactly this stream, on the CPU and on CUDA, so noise is a pure function of ``(seed, index)``:

    stream(seed)[g], for g = 0, 1, 2, ...  (element i of a flattened batch drawn with ``offset``
                                            is stream(seed)[offset + i])
      block, lane = divmod(g, 4)
      r0, r1, r2, r3 = Philox4x32_10(counter=(block mod 2^32, block >> 32, 0, 0),
                                     key=(seed mod 2^32, (seed >> 32) mod 2^32))
      lanes 0, 1 come from (r0, r1), lanes 2, 3 from (r2, r3), by Box-Muller in float64:
        u1 = (ra + 0.5) / 2^32    in (0, 1)
        u2 = rb / 2^32            in [0, 1)
        z_even = sqrt(-2 ln u1) cos(2 pi u2),  z_odd = sqrt(-2 ln u1) sin(2 pi u2)
      rounded to float32 (then to the tensor's dtype).

Counter-based draws per global example g (what the keyed training step needs besides noise;
counter word 2 holds a tag, so these streams never meet the Gaussian stream, whose word 2 is 0):

    timestep of example g:  r0, r1, _, _ = Philox4x32_10(counter=(g mod 2^32, g >> 32, TIME, 0), key)
                            t = ((r0 << 32) | r1) mod T          (TIME = 0x54494D45; bias < 2^-50)
    uniforms of row g, columns 4q .. 4q + 3, for a tag:
                            r = Philox4x32_10(counter=(g mod 2^32, g >> 32, tag, q), key)
                            u[4q + k] = (r_k >> 8) * 2^-24       (float32, exactly, in [0, 1))

The compiled ops ``counter_timesteps`` / ``counter_uniform`` (and ``q_sample_keyed``, whose noise
is the Gaussian stream at offset ``first_example * per_example``) equal these bit for bit.

Seeds are taken modulo 2^64 (negative Python ints wrap). Philox4x32-10 is Random123's generator
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011); ``philox4x32_10``
reproduces its published known-answer vectors. The largest value the stream can produce is
sqrt(-2 ln(0.5 / 2^32)) ~= 6.77. The compiled kernels compute the same float64 formula with
their platform's libm (CPU) or CUDA's float64 functions, so their float32 results agree with this
reference to the last bit except, rarely, one float32 ulp where a float64 result lies within an
ulp of a float32 rounding boundary.
"""
from __future__ import annotations

import numpy as np

__all__ = ["philox4x32_10", "normal_stream", "counter_timesteps", "counter_uniform", "TIMESTEP_TAG"]

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_MASK64 = (1 << 64) - 1


def philox4x32_10(counter, key) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32 with 10 rounds on arrays: ``counter`` is 4 uint32 words (arrays broadcast),
    ``key`` 2 words. Returns the 4 output words as uint64 arrays holding uint32 values."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) & _MASK32 for k in key)
    for r in range(10):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        p0 = _M0 * c0  # < 2^64: exact in uint64
        p1 = _M1 * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32)
    return c0, c1, c2, c3


def normal_stream(seed: int, offset: int, n: int) -> np.ndarray:
    """``stream(seed)[offset : offset + n]`` as a float32 array (see the module docstring)."""
    if offset < 0 or n < 0:
        raise ValueError(f"offset and n must be >= 0, got offset={offset}, n={n}")
    seed = int(seed) & _MASK64
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    first, last = offset // 4, (offset + n - 1) // 4
    block = np.arange(first, last + 1, dtype=np.uint64)
    r = philox4x32_10((block & _MASK32, block >> np.uint64(32), 0, 0),
                      (seed & 0xFFFFFFFF, seed >> 32))
    out = np.empty((block.size, 4), dtype=np.float32)
    for p in range(2):
        u1 = (r[2 * p].astype(np.float64) + 0.5) * 2.0**-32
        u2 = r[2 * p + 1].astype(np.float64) * 2.0**-32
        rad = np.sqrt(-2.0 * np.log(u1))
        theta = 2.0 * np.pi * u2
        out[:, 2 * p] = rad * np.cos(theta)
        out[:, 2 * p + 1] = rad * np.sin(theta)
    start = offset - 4 * first
    return out.reshape(-1)[start:start + n]


TIMESTEP_TAG = 0x54494D45  # "TIME"


def _rows(seed: int, first: int, n: int, tag: int, word3) -> tuple[np.ndarray, ...]:
    seed = int(seed) & _MASK64
    g = np.arange(first, first + n, dtype=np.uint64)[:, None]
    return philox4x32_10((g & _MASK32, g >> np.uint64(32), tag, word3), (seed & 0xFFFFFFFF, seed >> 32))


def counter_timesteps(seed: int, first: int, n: int, num_timesteps: int) -> np.ndarray:
    """Timesteps (int64 in ``[0, num_timesteps)``) of global examples ``first .. first + n - 1``."""
    if first < 0 or n < 0 or num_timesteps < 1:
        raise ValueError(f"need first >= 0, n >= 0, num_timesteps >= 1; got {first}, {n}, {num_timesteps}")
    r = _rows(seed, first, n, TIMESTEP_TAG, 0)
    return (((r[0] << np.uint64(32)) | r[1]) % np.uint64(num_timesteps)).astype(np.int64).reshape(n)


def counter_uniform(seed: int, tag: int, first: int, n: int, width: int) -> np.ndarray:
    """(n, width) float32 uniforms in [0, 1) of rows ``first .. first + n - 1`` for ``tag``."""
    if first < 0 or n < 0 or width < 1 or not 0 <= tag < 2**32:
        raise ValueError(f"need first >= 0, n >= 0, width >= 1, 0 <= tag < 2^32; got {first}, {n}, {width}, {tag}")
    q = np.arange((width + 3) // 4, dtype=np.uint64)[None, :]
    r = _rows(seed, first, n, tag, q)
    u = np.stack([(w >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24) for w in r], axis=-1)
    return u.reshape(n, -1)[:, :width]
