"""Tensor-train (TT) matrices: shapes, validation, Gaussian init, TT-SVD, materialize.

A matrix ``M: (n_in, n_out)`` is the row-major reshape of a ``d``-way tensor with dims
``k_1..k_d``, ``prod(k) = n_in * n_out`` (the whole matrix is reshaped; there are no separate
row and column modes). It is held as cores ``G_i: (r_{i-1}, k_i, r_i)``, ranks
``(1, r, ..., r, 1)``:

.. math::

    M(a_1, \\dots, a_d) = G_1[:, a_1, :] \\, G_2[:, a_2, :] \\cdots G_d[:, a_d, :]

with ``sum_i r_{i-1} k_i r_i`` parameters instead of ``n_in * n_out``. Every function that takes
cores also accepts leading stack axes ``(*stack, r_{i-1}, k_i, r_i)`` (e.g. a layer axis from
``nn.scan``) and broadcasts over them.
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any
Cores = tuple  # of arrays (*stack, r_{i-1}, k_i, r_i)

# Reference shapes of the LoRETTA code: {(hidden, bottleneck): dims}; the down projection
# (hidden, bottleneck) and the up projection (bottleneck, hidden) use the same row.
LORETTA_ADAPTER_DIMS = {
    (768, 64): (8, 8, 12, 8, 8), (768, 8): (8, 8, 12, 8),
    (1024, 64): (4, 8, 8, 8, 8, 4), (1024, 8): (4, 8, 8, 8, 4),
    (4096, 64): (16, 16, 16, 4, 4, 4), (4096, 8): (16, 16, 8, 4, 4),
    (5120, 64): (5, 8, 8, 16, 8, 8), (5120, 8): (8, 8, 10, 8, 8),
    (8192, 64): (4, 16, 16, 16, 8, 4), (8192, 8): (4, 16, 16, 16, 4),
}
# Tensorized classifier / pooler dense (hidden, hidden): {hidden: dims}.
LORETTA_CLASSIFIER_DIMS = {
    768: (8, 8, 12, 12, 8, 8),
    1024: (4, 8, 8, 16, 8, 8, 4),
    4096: (4, 4, 16, 16, 16, 16, 4, 4),
}

_PRODUCT_MISMATCH = (
    "`{name}` {dims} has product {prod} but the ({n_in}, {n_out}) matrix it tensorizes has "
    "{n} entries; give dims whose product is {n}, e.g. {suggest} (from "
    "`lrtt.tt.auto_dims({n_in}, {n_out})`), or leave it None for the automatic factorization"
)
_BAD_TT_SHAPE = (
    "`tt_shape` must be None (automatic balanced factorization), an int d (the balanced "
    "factorization into d cores), \"loretta\" (the reference tables, falling back to the "
    "automatic factorization) or a sequence of positive ints whose product is n_in * n_out; "
    "got {value!r}"
)
_BAD_CORES = (
    "`cores` do not form a tensor train: shapes {shapes}; core i must be "
    "(*stack, r_(i-1), k_i, r_i) with r_0 = r_d = 1 and matching neighbouring ranks; build them "
    "with `init_gaussian` or `tt_svd`, or check their order"
)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int`` (any integral type, not bool) when it is ``>= minimum``."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}; pass a positive integer.")
    return int(value)


def _check_dims(dims, name: str) -> tuple[int, ...]:
    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__len__"):
        raise ValueError(f"`{name}` must be a sequence of ints >= 1 (e.g. [8, 8, 12, 8, 8]), "
                         f"got {dims!r}")
    dims = list(dims)
    if not dims:
        raise ValueError(f"`{name}` must be a non-empty sequence of ints >= 1, got an empty "
                         f"one; give at least one dim, or None for the automatic factorization")
    bad = [k for k in dims if not _is_int(k) or k < 1]
    if bad:
        raise ValueError(f"`{name}` must hold ints >= 1, got {dims!r} (bad entries: {bad!r}); "
                         f"use positive integers such as [8, 8, 12, 8, 8]")
    return tuple(int(k) for k in dims)


def _check_product(dims, n_in, n_out, name):
    n_in, n_out = _check_int(n_in, "n_in"), _check_int(n_out, "n_out")
    if math.prod(dims) != n_in * n_out:
        raise ValueError(_PRODUCT_MISMATCH.format(
            name=name, dims=list(dims), prod=math.prod(dims), n_in=n_in, n_out=n_out,
            n=n_in * n_out, suggest=list(auto_dims(n_in, n_out))))


def validate(dims, tt_rank, *, n_in=None, n_out=None, name="tt_shape") -> tuple[int, ...]:
    """Checks a TT shape and rank; returns ``dims`` as a tuple of ints.

    Args:
      dims: non-empty sequence of ints ``k_i >= 1``.
      tt_rank: int ``r >= 1`` (the uniform inner rank).
      n_in, n_out: when given (give both), ``prod(dims) == n_in * n_out`` is required.
      name: the argument name used in error messages.

    Raises:
      ValueError: empty or non-integer dims, a dim < 1, ``tt_rank < 1``, or a product mismatch.
    """
    dims = _check_dims(dims, name)
    _check_int(tt_rank, "tt_rank")
    if n_in is not None or n_out is not None:
        _check_product(dims, n_in, n_out, name)
    return dims


def tt_ranks(dims, tt_rank) -> tuple[int, ...]:
    """The ranks ``(1, r, ..., r, 1)``, length ``len(dims) + 1``.

    A rank above a bond's maximum ``min(prod(k[:i]), prod(k[i:]))`` is redundant but allowed (not
    capped): the reference parameter counts assume uniform ranks.
    """
    dims = validate(dims, tt_rank)
    return (1,) + (int(tt_rank),) * (len(dims) - 1) + (1,)


def core_shapes(dims, tt_rank) -> tuple[tuple[int, int, int], ...]:
    """The core shapes ``((r_0, k_1, r_1), ..., (r_{d-1}, k_d, r_d))``."""
    ranks = tt_ranks(dims, tt_rank)
    return tuple(zip(ranks[:-1], (int(k) for k in dims), ranks[1:]))


def num_core_params(dims, tt_rank) -> int:
    """Number of numbers a tensor train's cores hold, ``sum_i r_{i-1} k_i r_i``, from its shape
    alone (``lrtt.num_params`` counts the leaves of a tree).

    >>> num_core_params([8, 8, 12, 8, 8], 5)
    780
    """
    return sum(math.prod(s) for s in core_shapes(dims, tt_rank))


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + ([n] if n > 1 else [])


def _rebalance(groups: list[list[int]]) -> None:
    """Moves or swaps single primes between bins while that lowers ``sum(log(bin)**2)``."""
    cost = lambda g: math.log(math.prod(g)) ** 2
    while True:
        best = None
        for a, b in itertools.permutations(range(len(groups)), 2):
            ga, gb = groups[a], groups[b]
            for p in sorted(set(ga)):
                for q in [None, *sorted(set(gb) - {p})]:  # None: move p, else swap p and q
                    if q is None and len(ga) == 1:
                        continue
                    na, nb = list(ga), gb + [p]
                    na.remove(p)
                    if q is not None:
                        nb.remove(q)
                        na.append(q)
                    gain = cost(ga) + cost(gb) - cost(na) - cost(nb)
                    if gain > 1e-9 and (best is None or gain > best[0]):
                        best = (gain, a, b, na, nb)
        if best is None:
            return
        _, a, b, groups[a], groups[b] = best


def auto_dims(n_in, n_out, cores: int | None = None) -> tuple[int, ...]:
    """A balanced factorization of ``n = n_in * n_out`` into about ``log_8(n)`` factors, or into
    ``cores`` factors.

    ``d = max(1, round(log(n) / log(8)))`` bins (``cores`` when given; at most the number of prime
    factors, else an error); the prime
    factors, largest first, go each into the currently smallest bin, then single primes are moved
    or swapped between bins while that lowers ``sum(log(k_i)^2)`` (e.g. ``3072 * 768`` gives a 9
    and six 8s, not a 6 and a 12). The bins are laid out largest in the middle
    (``[8, 8, 12, 8, 8]``). Deterministic. A large prime factor bounds the balance
    (``11008 * 8 -> (4, 8, 43, 8, 8)``); a prime ``n`` gives ``(n,)``, a single core that is the
    dense matrix itself.

    Fewer cores hold more numbers per core and represent more matrices at the same TT rank
    (``576 * 8``: ``(8, 9, 8, 8)`` by default, ``(16, 18, 16)`` in 3 cores, ``(72, 64)`` in 2).

    >>> auto_dims(768, 64), auto_dims(4096, 8), auto_dims(576, 8, cores=3)
    ((8, 8, 12, 8, 8), (8, 8, 8, 8, 8), (16, 18, 16))
    """
    n = _check_int(n_in, "n_in") * _check_int(n_out, "n_out")
    primes = sorted(_prime_factors(n), reverse=True)
    if cores is None:
        d = max(1, min(int(math.floor(math.log(n) / math.log(8) + 0.5)), len(primes)))
    else:
        d, most = _check_int(cores, "cores"), max(len(primes), 1)
        if d > most:
            factors = f" = {' * '.join(map(str, sorted(primes)))}" if len(primes) > 1 else ""
            raise ValueError(
                f"the ({n_in}, {n_out}) matrix it tensorizes has {n}{factors} entries, which cannot "
                f"be split into {d} factors > 1 (at most {most}); ask for at most {most} cores, or "
                "give the dims as a sequence")
    groups = [[] for _ in range(d)]
    for p in primes:
        min(groups, key=math.prod).append(p)
    _rebalance(groups)
    bins = sorted((math.prod(g) for g in groups), reverse=True)
    out = [0] * d  # largest in the middle, then outwards
    for pos, k in zip(sorted(range(d), key=lambda i: (abs(i - (d - 1) / 2), i)), bins):
        out[pos] = k
    return tuple(out)


def preset_dims(n_in, n_out) -> tuple[int, ...] | None:
    """The LoRETTA reference dims for an ``(n_in, n_out)`` matrix, or None when no row applies.

    Rows: ``LORETTA_ADAPTER_DIMS`` for ``(hidden, bottleneck)`` or ``(bottleneck, hidden)``,
    ``LORETTA_CLASSIFIER_DIMS`` for ``(hidden, hidden)``. The row is validated against
    ``n_in * n_out`` before it is returned, so a wrong table row can never be used silently.
    """
    n_in, n_out = _check_int(n_in, "n_in"), _check_int(n_out, "n_out")
    row = LORETTA_ADAPTER_DIMS.get((n_in, n_out), LORETTA_ADAPTER_DIMS.get((n_out, n_in)))
    if row is None and n_in == n_out:
        row = LORETTA_CLASSIFIER_DIMS.get(n_in)
    if row is None:
        return None
    return validate(row, 1, n_in=n_in, n_out=n_out, name="LoRETTA preset")


def freeze_spec(tt_shape):
    """A ``tt_shape`` option as a hashable value of plain Python ints, for a method's config.

    ``None`` / ``"loretta"`` (any string: checked when it is used) as they are; an int ``d >= 1``
    as ``int(d)`` (a numpy integer too); a sequence of dims, or a pair of them, as tuples of
    ints. A bool or an int below 1 is an error now, not at ``init``.

    >>> freeze_spec(np.int64(3)), freeze_spec([np.int64(8), 16]), freeze_spec([[4, 8], [8, 4]])
    (3, (8, 16), ((4, 8), (8, 4)))
    """
    if tt_shape is None or isinstance(tt_shape, str):
        return tt_shape
    if isinstance(tt_shape, (bool, np.bool_)) or (_is_int(tt_shape) and tt_shape < 1):
        raise ValueError(_BAD_TT_SHAPE.format(value=tt_shape))
    if _is_int(tt_shape):
        return int(tt_shape)
    if not hasattr(tt_shape, "__len__"):
        raise ValueError(_BAD_TT_SHAPE.format(value=tt_shape))
    plain = lambda x: int(x) if _is_int(x) else x  # noqa: E731
    items = tuple(tt_shape)
    if items and all(hasattr(x, "__len__") and not isinstance(x, str) for x in items):
        return tuple(tuple(plain(k) for k in x) for x in items)
    return tuple(plain(k) for k in items)


def resolve_dims(tt_shape, n_in, n_out) -> tuple[int, ...]:
    """Turns a user's ``tt_shape`` option into dims for an ``(n_in, n_out)`` matrix.

    ``None`` -> :func:`auto_dims`; an int ``d`` -> :func:`auto_dims` into ``d`` cores;
    ``"loretta"`` -> :func:`preset_dims`, falling back to :func:`auto_dims` when no reference row
    applies; a sequence -> validated (product must be ``n_in * n_out``).

    Raises:
      ValueError: any other value, or a sequence that fails :func:`validate`.
    """
    if tt_shape is None:
        return auto_dims(n_in, n_out)
    if _is_int(tt_shape):
        if tt_shape < 1:
            raise ValueError(_BAD_TT_SHAPE.format(value=tt_shape))
        try:
            return auto_dims(n_in, n_out, cores=tt_shape)
        except ValueError as err:
            raise ValueError(f"`tt_shape={tt_shape}` (cores per tensorized matrix): {err}") from None
    if isinstance(tt_shape, str) and tt_shape == "loretta":
        return preset_dims(n_in, n_out) or auto_dims(n_in, n_out)
    if isinstance(tt_shape, (str, bytes)) or not hasattr(tt_shape, "__len__"):
        raise ValueError(_BAD_TT_SHAPE.format(value=tt_shape))
    dims = _check_dims(tt_shape, "tt_shape")
    _check_product(dims, n_in, n_out, "tt_shape")
    return dims


def init_gaussian(key, dims, tt_rank, *, n_in, n_out, stack=(), dtype=jnp.float32) -> Cores:
    """The LoRETTA reference init: i.i.d. Gaussian cores scaled to a target element std.

    .. math::

        G_i \\sim \\mathcal{N}(0, 1) \\cdot \\frac{1}{\\sqrt{r_i}} \\cdot
        \\Big(\\frac{1}{n_{in} + n_{out}}\\Big)^{1/(2d)}, \\qquad G_i: (*stack, r_{i-1}, k_i, r_i)

    with ``r_i`` the core's *right* rank (``r_d = 1``), as in the reference (yifanycc/loretta,
    ``tensor_layers/low_rank_tensors.py``, ``TensorTrain.build_factors_Gaussian``:
    ``randn(r1, n, r2) / sqrt(r2) * target_sdv**(1/order)``, with ``target_sdv =
    sqrt(1/(in + out))`` from ``TensorizedLinear_module`` in ``layers.py``). An element of ``M`` sums ``r_1 \\cdots r_{d-1}``
    products of independent entries, so ``Var M = 1 / (n_in + n_out)`` exactly.

    Args:
      key: a PRNG key, split into one key per core.
      dims, tt_rank: the TT shape; ``prod(dims) == n_in * n_out``.
      n_in, n_out: the matrix shape.
      stack: leading stack axes of every core (e.g. ``(num_layers,)``).
      dtype: the cores' dtype.

    Returns:
      A tuple of ``d`` cores.
    """
    dims = validate(dims, tt_rank, n_in=n_in, n_out=n_out)
    stack = tuple(int(s) for s in stack)
    scale = (1.0 / (n_in + n_out)) ** (1.0 / (2 * len(dims)))
    keys = jax.random.split(key, len(dims))
    return tuple(
        jax.random.normal(k, stack + shape, dtype) * jnp.asarray(scale / math.sqrt(shape[2]), dtype)
        for k, shape in zip(keys, core_shapes(dims, tt_rank)))


def _check_cores(cores, n_in, n_out) -> list[int]:
    """Checks that ``cores`` chain, with ``r_0 = r_d = 1`` and ``prod(k) = n_in * n_out``."""
    shapes = [tuple(c.shape) for c in cores]
    if not shapes or any(len(s) < 3 for s in shapes) or shapes[0][-3] != 1 or shapes[-1][-1] != 1 \
            or any(a[-1] != b[-3] for a, b in zip(shapes[:-1], shapes[1:])):
        raise ValueError(_BAD_CORES.format(shapes=shapes))
    _check_product([s[-2] for s in shapes], n_in, n_out, "cores")
    return [s[-2] for s in shapes]


def _chain(cores) -> Array:
    """Contracts (checked) cores left to right into ``(*stack, r_0, prod(k), r_d)``."""
    r0, k, r = cores[0].shape[-3:]
    out = cores[0].reshape(cores[0].shape[:-3] + (r0 * k, r))
    for g in cores[1:]:
        r, k, r_next = g.shape[-3:]
        out = jnp.matmul(out, g.reshape(g.shape[:-3] + (r, k * r_next)))  # (*s, A, k * r')
        out = out.reshape(out.shape[:-2] + (out.shape[-2] * k, r_next))
    return out.reshape(out.shape[:-2] + (r0, out.shape[-2] // r0, out.shape[-1]))


def matrix_shape(cores, n_in, n_out) -> tuple[int, ...]:
    """The shape ``(*stack, n_in, n_out)`` that :func:`materialize` returns, read off the cores'
    shapes (nothing traced: cheap under ``jit`` where an ``eval_shape`` of the contraction is not).

    >>> import jax.numpy as jnp
    >>> matrix_shape([jnp.zeros((12, 1, 4, 3)), jnp.zeros((12, 3, 6, 1))], 8, 3)
    (12, 8, 3)

    Raises:
      ValueError: the cores do not chain, ``prod(k) != n_in * n_out``, or their stack axes differ.
    """
    _check_cores(cores, n_in, n_out)
    stacks = [tuple(int(d) for d in c.shape[:-3]) for c in cores]
    try:
        stack = np.broadcast_shapes(*stacks)
    except ValueError:
        raise ValueError(f"the TT cores' stack axes {stacks} do not broadcast; give every core the same "
                         "leading (stack) axes.") from None
    return tuple(stack) + (int(n_in), int(n_out))


def materialize(cores, n_in, n_out) -> Array:
    """The dense matrix ``M: (*stack, n_in, n_out)`` of a tensor train.

    Contracts left to right, ``T_i = T_{i-1} \\times_1 G_i: (*stack, k_1 \\cdots k_i, r_i)``, then
    reshapes row-major. The largest intermediate has ``k_1 \\cdots k_i \\cdot r_i`` entries, never
    more than ``n_in * n_out`` while each rank is at most its bond's maximum.

    Raises:
      ValueError: the cores do not chain, or ``prod(k) != n_in * n_out``.
    """
    _check_cores(cores, n_in, n_out)
    full = _chain(cores)
    return full.reshape(full.shape[:-3] + (n_in, n_out))


def apply(cores, x, n_in, n_out) -> Array:
    """``x @ M`` for ``x: (..., n_in)`` (``jnp.matmul`` broadcasting against the stack axes).

    When a prefix of the dims multiplies to ``n_in`` (``k_1 \\cdots k_m = n_in``, true of every
    LoRETTA preset), ``M = L R`` with ``L: (n_in, r_m)``, ``R: (r_m, n_out)`` from the left and
    right cores, and ``(x @ L) @ R`` costs ``r_m (n_in + n_out)`` per row instead of
    ``n_in n_out``; otherwise (or when that is not cheaper) ``M`` is materialized.
    """
    dims = _check_cores(cores, n_in, n_out)
    prefix = 1
    for m, k in enumerate(dims[:-1], start=1):
        prefix *= k
        r = int(cores[m - 1].shape[-1])
        if prefix == n_in and r * (n_in + n_out) < n_in * n_out:
            left, right = _chain(cores[:m]), _chain(cores[m:])
            left = left.reshape(left.shape[:-3] + (n_in, r))
            right = right.reshape(right.shape[:-3] + (r, n_out))
            return jnp.matmul(jnp.matmul(x, left), right)
    return jnp.matmul(x, materialize(cores, n_in, n_out))


def _tt_svd_single(matrix, dims, tt_rank):
    shapes = core_shapes(dims, tt_rank)
    cores, rest, r_prev = [], matrix.reshape(-1), 1
    for r_left, k, r_right in shapes[:-1]:
        rest = rest.reshape(r_prev * k, -1)
        u, s, vt = jnp.linalg.svd(rest, full_matrices=False)
        r = min(tt_rank, s.shape[0])
        core = u[:, :r].reshape(r_prev, k, r)
        cores.append(jnp.pad(core, ((0, r_left - r_prev), (0, 0), (0, r_right - r))))
        rest, r_prev = s[:r, None] * vt[:r], r
    core = rest.reshape(r_prev, dims[-1], 1)
    cores.append(jnp.pad(core, ((0, shapes[-1][0] - r_prev), (0, 0), (0, 0))))
    return tuple(cores)


def tt_svd(matrix, dims, tt_rank) -> Cores:
    """TT-SVD (Oseledets, 2011) of ``matrix: (*stack, n_in, n_out)`` at uniform rank ``tt_rank``.

    Sweeps left to right: reshape the remainder to ``(r_{i-1} k_i, -1)``, keep the top
    ``min(tt_rank, available)`` left singular vectors as ``G_i`` and carry ``S V^T`` on. Cores are
    left-orthonormal; the last core holds the norm. Where a bond's available rank is below
    ``tt_rank`` the core is zero-padded, so shapes are exactly :func:`core_shapes` and the train
    still materializes to the same matrix. Exact (to float tolerance) when ``tt_rank`` is at least
    every bond's rank; otherwise the usual quasi-optimal truncation,
    ``||M - M_TT||_F <= sqrt(sum_i eps_i^2)`` with ``eps_i`` the discarded tail at bond ``i``.
    Stack axes are handled with ``jax.vmap``.

    Returns:
      A tuple of cores ``(*stack, r_{i-1}, k_i, r_i)``.
    """
    if matrix.ndim < 2:
        raise ValueError(f"`matrix` must be (*stack, n_in, n_out), got shape {matrix.shape}")
    *stack, n_in, n_out = matrix.shape
    dims = validate(dims, tt_rank, n_in=n_in, n_out=n_out, name="dims")
    cores = _tt_svd_batched(matrix.reshape((-1, n_in, n_out)), dims, int(tt_rank))
    return tuple(c.reshape(tuple(stack) + c.shape[1:]) for c in cores)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _tt_svd_batched(flat, dims, tt_rank):
    return jax.vmap(lambda m: _tt_svd_single(m, dims, tt_rank))(flat)
