"""Checks of arrays reduced where the arrays live: the fingerprints of a checkpoint's arrays and
:func:`non_finite`, the library's one check for NaN and inf.

A ``jax.Array`` is reduced on its devices (one jitted call for all of them) to replicated scalars,
so in a multi-process job every process reads the result without holding the arrays whole;
:func:`non_finite` checks any other array (numpy) on the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _words(x: jax.Array) -> jax.Array:
    x = x.reshape(-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(jnp.dtype(x.dtype).itemsize)
    if width is None:  # 8-byte types: two words each
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


@jax.jit
def _fingerprints(leaves: list) -> list:
    out = []
    for x in leaves:
        w = _words(x)
        weight = jnp.arange(w.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        out.append((jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * weight, dtype=jnp.uint32)))
    return out


def fingerprints(flat: dict[str, Any]) -> dict[str, list[int]]:
    """Two order-sensitive 32-bit checksums of every array's bits (computed on device, sharded).

    The sums wrap around in uint32, so they do not depend on the order of the reduction: a
    checkpoint's fingerprints hold for any sharding and any number of processes. Each result is a
    scalar (replicated on every device of the computation), so every process reads it without
    reading the arrays, which in a multi-process job no process holds whole.
    """
    names = sorted(flat)
    values = _fingerprints([flat[n] for n in names])
    return {n: [int(_scalar(v)) for v in fp] for n, fp in zip(names, values)}


def _scalar(x: jax.Array) -> np.ndarray:
    """A scalar result on the host; multi-process, it is replicated, so every process holds it."""
    return np.asarray(x)


@jax.jit
def _finite(leaves: list) -> list:
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def non_finite(flat: dict[str, Any]) -> list[str]:
    """The paths of the floating-point arrays of ``flat`` that hold a NaN or an inf, sorted.

    Integer, boolean and PRNG-key leaves are skipped. Each ``jax.Array`` is reduced on its devices
    (one jitted call for all of them, like :func:`fingerprints`); only one flag per array comes to
    the host. Any other array (numpy: tensors read from a file) is checked on the host, in its own
    dtype (a float64 array is not narrowed to float32 first).

    >>> import jax.numpy as jnp, numpy as np
    >>> non_finite({"b": np.array([1.0, np.nan]), "a": jnp.array([1.0, jnp.inf]), "c": np.ones(3),
    ...             "d": np.array([1e300]), "step": jnp.array(3)})
    ['a', 'b']
    """
    names = sorted(p for p, x in flat.items() if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact))
    if not names:
        return []
    on_device = [n for n in names if isinstance(flat[n], jax.Array)]
    flags = dict(zip(on_device, _finite([flat[n] for n in on_device]))) if on_device else {}
    return [n for n in names
            if not (bool(_scalar(flags[n])) if n in flags else bool(np.all(np.isfinite(flat[n]))))]
