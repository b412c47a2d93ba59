"""Weighted combinations of low-rank adapters: PEFT's ``add_weighted_adapter`` as a pure function.

Every input entry at a leaf is ``ΔW_i = s_i · A_i B_i`` (``A_i: (*stack, in, r_i)``,
``B_i: (*stack, r_i, out)``, ``s_i`` its scale); :func:`combine` returns one LoRA adapter of
scale 1 whose ``A' B'`` is PEFT's ``combination_type`` of them (peft 0.21
``LoraModel.add_weighted_adapter``), leaf by leaf.
"""

from __future__ import annotations

import collections
import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from lrtt._adapter import LoraFactors, TTFactors, entries, is_entry
from lrtt._groups import as_tree
from lrtt._paths import exact_patterns, nest
from lrtt.methods._lora import LoRA
from lrtt.methods._loretta_rep import LorettaRep

HOWS = ("linear", "cat", "svd")
MISSING = ("error", "zero")
_ENTRY_OF = {LoRA: LoraFactors, LorettaRep: TTFactors}

Term = tuple  # (weight, a (*stack, in, r), b (*stack, r, out), scale)


def combine(
    method: Any,
    adapters: Sequence[Any],
    weights: Sequence[float],
    *,
    how: str = "svd",
    rank: int | None = None,
    clamp: float | None = None,
    missing: str = "error",
    return_error: bool = False,
):
    """One LoRA adapter from a weighted combination of LoRA or LorettaRep adapters (PEFT's
    ``add_weighted_adapter``, whose default ``combination_type`` is ``"svd"``, as here).

    At each adapted leaf, with the inputs ``ΔW_i = s_i A_i B_i`` and weights ``w_i``, the result
    is ``ΔW' = A' B'`` (scale 1), ``A': (*stack, in, r')``, ``B': (*stack, r', out)``:

    * ``"linear"`` (``r' = r``, every input of one rank): ``A' = Σ σ_i √|w_i s_i| A_i``,
      ``B' = Σ √|w_i s_i| B_i`` with ``σ_i = sign(w_i s_i)``. Not ``Σ w_i ΔW_i``: the product
      has the cross terms ``A_i B_j``; cheap, and PEFT calls it a rough approximation.
    * ``"cat"`` (``r' = Σ r_i``): ``A' = [w_1 s_1 A_1, …, w_n s_n A_n]`` (side by side),
      ``B' = [B_1; …; B_n]`` (stacked): ``A' B' = Σ w_i ΔW_i`` exactly.
    * ``"svd"`` (``r' = rank``): ``M = Σ w_i ΔW_i = U S Vᵀ`` (singular values descending),
      ``A' = U[:, :r']``, ``B' = S[:r'] Vᵀ[:r', :]``: the best rank-``r'`` approximation of
      ``M`` in Frobenius norm (Eckart–Young).

    These are PEFT's factors transposed (PEFT's ``lora_A.weight = A'ᵀ: (r', in)``,
    ``lora_B.weight = B'ᵀ: (out, r')``): the scale goes on ``A`` (``linear``: its sign too), the
    singular values on ``B`` (PEFT's ``lora_B = U·S`` of ``ΔW_torch = Mᵀ``). Singular vectors are
    unique up to sign, so ``svd``'s factors may differ from PEFT's by the sign of a pair of
    columns/rows; ``A' B'`` does not. The result has scale 1 (PEFT's ``lora_alpha = r = r'``).
    Stacked leaves (``"layer in out"``) are combined per layer (batched ``jnp.linalg.svd``).

    LorettaRep adapters are combined through the LoRA they equal (``TT_A``, ``TT_B``
    materialized, as :func:`lrtt.save_peft` writes them): the result is a LoRA adapter, since a
    sum of tensor-train adapters is not a tensor-train adapter of the same TT ranks.

    Differences from PEFT: ranks are per leaf (PEFT pads ``cat`` with zero rows up to one global
    rank; the product is the same); one adapter is combined as ``how`` says (PEFT switches
    to ``linear`` for one adapter, ignoring ``svd_rank``); ``svd`` computes the reduced SVD
    (PEFT's ``svd_full_matrices=True`` gives the same first ``r'`` vectors); the scale is 1
    whatever the inputs' rslora (peft ≤ 0.21.2 keeps the first adapter's ``use_rslora`` and so
    scales its result by ``√r'``, fixed in huggingface/peft#3449).

    Args:
      method: the :class:`lrtt.LoRA` or :class:`lrtt.LorettaRep` that made the adapters, or a
        sequence of them, one per adapter (e.g. the methods :func:`lrtt.load_peft` returns); all
        of one class with the same ``layouts``.
      adapters: the adapter trees (``method.init``, :func:`lrtt.load_peft`, a checkpoint), or
        their flat ``{path: entry}`` dicts (:func:`lrtt.entries`), over the same leaves.
      weights: one finite float per adapter; negative values subtract.
      how: ``"svd"`` (default, as PEFT), ``"cat"`` or ``"linear"`` (see the table).
      rank: ``svd`` only: the new rank ``r'`` of every leaf, ``1 <= rank <= min(in, out)``.
        None: the largest rank of any input entry (PEFT's default ``svd_rank``), capped at each
        leaf's ``min(in, out)`` (where the approximation is exact).
      clamp: ``svd`` only (PEFT's ``svd_clamp``): a quantile ``q`` in ``[0, 1]``; the entries
        of ``A'`` and ``B'`` are clipped to ``[-h, h]``, ``h`` the ``q``-quantile of all of them
        (per leaf and layer). None: no clipping.
      missing: ``"error"`` (default): every adapter must adapt the same leaves. ``"zero"``: as
        PEFT, a leaf some adapters lack is combined from those that have it (the others count
        as ``ΔW_i = 0``).
      return_error: also return ``{path: ‖A' B' - Σ w_i ΔW_i‖_F / ‖Σ w_i ΔW_i‖_F}`` over the
        whole leaf (all layers), from dense ``ΔW`` (0 where both are 0, inf where only the sum
        is): ~1e-7 for ``cat`` (float32 rounding), the truncation error for ``svd``, the cross
        terms for ``linear``.

    Returns:
      ``(lora, adapter)``, or ``(lora, adapter, error)`` with ``return_error``: ``adapter`` holds
      a :class:`lrtt.LoraFactors` of scale 1 at every combined leaf (factors in the inputs'
      dtype, computed in at least float32), and ``lora`` is the :class:`lrtt.LoRA` to use it
      with (:func:`lrtt.merge`, :func:`lrtt.wrap`, :func:`lrtt.save_peft`, optax masks): ``rank``
      the commonest new rank, ``rank_pattern`` the others, ``alpha=None`` (scale 1), and the
      inputs' ``targets`` (when all agree; else one exact pattern per leaf), ``layouts``,
      ``dropout`` and ``param_dtype``.

    Raises:
      ValueError: no adapters, a ``weights`` length other than the adapters', a non-finite
        weight, an unknown ``how`` / ``missing``, ``rank`` / ``clamp`` without ``svd``, a method
        other than LoRA / LorettaRep or a mix of them, an adapter whose entries are not its
        method's, ``Trainable`` entries (PEFT's ``modules_to_save``: PEFT refuses two adapters
        training the same module and otherwise gives the new adapter an untrained copy),
        adapters over different leaves (with ``missing="error"``) or of different shapes at a
        leaf, ``linear`` over different ranks, a ``cat`` rank above ``min(in, out)`` (lrtt's
        LoRA refuses it; ``svd`` at that rank is exact), an ``svd`` ``rank`` out of range.

    It runs eagerly, not under ``jax.jit``: the weights are Python floats and the errors are
    read back to the host.

    Example:
      >>> import jax, jax.numpy as jnp, lrtt
      >>> params = {"attn": {"q_proj": {"kernel": jnp.ones((16, 32))}}}
      >>> method = lrtt.LoRA(rank=4, targets="q_proj")
      >>> def trained(seed):  # stands in for a trained adapter (B != 0)
      ...     adapter = method.init(jax.random.key(seed), params)
      ...     return jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed + 1), x.shape), adapter)
      >>> one, two = trained(0), trained(2)
      >>> lora, both = lrtt.combine(method, [one, two], [0.7, -0.3], how="cat")
      >>> lora.rank, jax.tree.map(jnp.shape, both)["attn"]["q_proj"]["kernel"]
      (8, LoraFactors(a=(16, 8), b=(8, 32), scale=1.0))
      >>> leaf = "attn/q_proj/kernel"
      >>> want = 0.7 * lrtt.delta(method, params, one)[leaf] - 0.3 * lrtt.delta(method, params, two)[leaf]
      >>> bool(jnp.allclose(lrtt.delta(lora, params, both)[leaf], want, rtol=0, atol=1e-5))
      True
      >>> lora, small, error = lrtt.combine(method, [one, two], [0.7, -0.3], how="svd", rank=4, return_error=True)
      >>> lora.rank, round(error[leaf], 2)  # the rank-4 truncation of a rank-8 sum
      (4, 0.33)
    """
    adapters = list(adapters)
    weights = _check_weights(weights, len(adapters))
    _check_options(how, rank, clamp, missing)
    methods = _check_methods(method, len(adapters))
    flats = [_low_rank_entries(m, a, k) for k, (m, a) in enumerate(zip(methods, adapters))]
    terms = _align(flats, weights, missing)
    new_rank = rank if rank is not None else max(t[1].shape[-1] for ts in terms.values() for t in ts)
    if how == "svd":
        _check_svd_rank(terms, new_rank, explicit=rank is not None)
    if how == "cat":
        _check_cat_ranks(terms)
    if how == "linear":
        _check_linear_ranks(terms)
    out = {path: _combine_leaf(how, ts, new_rank, clamp) for path, ts in terms.items()}
    lora = _output_method(methods, {p: e.a.shape[-1] for p, e in out.items()}, [set(f) for f in flats])
    if not return_error:
        return lora, nest(out)
    return lora, nest(out), {path: relative_error(out[path], ts) for path, ts in terms.items()}


# --- checks -----------------------------------------------------------------------------------


def _check_weights(weights: Sequence[float], n: int) -> tuple[float, ...]:
    """``weights`` as floats: one per adapter, each finite."""
    if n == 0:
        raise ValueError("`adapters` is empty: combine needs at least one adapter (and one weight per adapter).")
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"got {n} adapters but {len(weights)} weights: give one weight per adapter, in order.")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (numbers.Real, jax.Array)) or jnp.ndim(w) != 0:
            raise ValueError(f"weights[{i}] = {w!r} is not a real number: give one float per adapter.")
        if not math.isfinite(float(w)):
            raise ValueError(f"weights[{i}] = {float(w)} is not finite: give a finite weight for every adapter.")
        out.append(float(w))
    return tuple(out)


def _check_options(how: str, rank: Any, clamp: Any, missing: str) -> None:
    if how not in HOWS:
        raise ValueError(
            f"`how` must be one of {list(HOWS)}, got {how!r} (PEFT's ties / dare / magnitude_prune "
            "combinations are not implemented)."
        )
    if missing not in MISSING:
        raise ValueError(f"`missing` must be one of {list(MISSING)}, got {missing!r}.")
    if how != "svd" and (rank is not None or clamp is not None):
        given = "rank" if rank is not None else "clamp"
        raise ValueError(
            f"`{given}` applies to how='svd' only: 'linear' keeps the inputs' common rank and 'cat' "
            f"sums them. Drop `{given}`, or use how='svd'."
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"`rank` must be a positive int (the new rank of every leaf) or None, got {rank!r}.")
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, numbers.Real)
                              or not 0.0 <= clamp <= 1.0):
        raise ValueError(f"`clamp` must be a quantile in [0, 1] (PEFT's svd_clamp) or None, got {clamp!r}.")


def _check_methods(method: Any, n: int) -> tuple[Any, ...]:
    """One method per adapter, all LoRA or all LorettaRep, with one ``layouts``."""
    methods = tuple(method) if isinstance(method, (list, tuple)) else (method,) * n
    if len(methods) != n:
        raise ValueError(f"got {len(methods)} methods for {n} adapters: pass one method, or one per adapter.")
    for m in methods:
        if type(m) not in _ENTRY_OF:
            raise ValueError(
                f"combine takes LoRA or LorettaRep adapters, got a {type(m).__name__}: only their updates "
                "W0 + s·A·B are linear in low-rank factors (LorettaAdp's bottlenecks are not)."
            )
    kinds = sorted({type(m).__name__ for m in methods})
    if len(kinds) > 1:
        raise ValueError(
            f"the adapters are of different methods {kinds}: combine adapters of one method. Turn the "
            "LorettaRep adapters into the LoRA they equal first: lrtt.combine(rep_method, [adapter], [1.0], how='cat')."
        )
    if len({m.layouts for m in methods}) > 1:
        raise ValueError(
            "the methods have different `layouts`, so a leaf would be read as different matrices: "
            f"{[m.layouts for m in methods]}. Combine adapters made with the same layouts."
        )
    return methods


def _low_rank_entries(method: Any, adapter: Any, k: int) -> dict[str, Any]:
    """``{path: entry}`` of adapter ``k``: every entry its method's low-rank kind."""
    found = entries(as_tree(adapter))
    if not found:
        raise ValueError(f"adapter {k} has no entries: pass adapter trees made by method.init or lrtt.load_peft.")
    trained = sorted(p for p, e in found.items() if is_entry(e) and e.whole_leaf)
    if trained:
        raise ValueError(
            f"adapter {k} trains leaves in full (Trainable, PEFT's modules_to_save): {trained[:5]}. "
            "Those cannot be weighted like low-rank factors: PEFT's add_weighted_adapter refuses two "
            "adapters that train the same module, and otherwise gives the new adapter an untrained copy "
            "of the base module. Combine the low-rank entries only: pass "
            "{p: e for p, e in lrtt.entries(adapter).items() if not e.whole_leaf}, "
            "and keep the trained leaves you want from one adapter yourself."
        )
    kind = _ENTRY_OF[type(method)]
    other = sorted(f"{p} ({type(e).__name__})" for p, e in found.items() if not isinstance(e, kind))
    if other:
        raise ValueError(
            f"adapter {k} has entries that are not {kind.__name__}, which {type(method).__name__} makes: "
            f"{other[:5]}. Was it made by another method? Pass the method that made each adapter."
        )
    return found


def _align(flats: list[dict], weights: tuple[float, ...], missing: str) -> dict[str, list[Term]]:
    """``{path: [(w_i, A_i, B_i, s_i), ...]}`` over the adapted leaves (in order of first appearance).

    Raises:
      ValueError: the adapters adapt different leaves (``missing="error"``), or different shapes.
    """
    paths = list(dict.fromkeys(p for flat in flats for p in flat))
    if missing == "error":
        lacking = {k: [p for p in paths if p not in flat] for k, flat in enumerate(flats)}
        lacking = {k: ps for k, ps in lacking.items() if ps}
        if lacking:
            shown = "; ".join(f"adapter {k} lacks {ps[:3]}{' …' if len(ps) > 3 else ''}" for k, ps in lacking.items())
            raise ValueError(
                f"the adapters adapt different leaves: {shown}. Combine adapters over the same targets, or "
                "pass missing='zero' to combine each leaf from the adapters that have it (PEFT's behaviour)."
            )
    terms = {}
    for path in paths:
        terms[path] = [(w, *flat[path].factor_matrices(), float(flat[path].scale))
                       for w, flat in zip(weights, flats) if path in flat]
        _check_shapes(path, terms[path])
    return terms


def _check_shapes(path: str, terms: list[Term]) -> None:
    shapes = {(a.shape[:-1], b.shape[:-2] + b.shape[-1:]) for _, a, b, _ in terms}
    if len(shapes) > 1:
        shown = sorted(f"A{a.shape}·B{b.shape}" for _, a, b, _ in terms)
        raise ValueError(
            f"the adapters' factors of {path!r} are of different matrices: {shown}. Were they made for "
            "different models or layouts?"
        )


def _check_svd_rank(terms: dict[str, list[Term]], rank: int, *, explicit: bool) -> None:
    """An explicit svd ``rank`` fits every leaf: ``rank <= min(in, out)``."""
    if not explicit:
        return
    small = {p: min(ts[0][1].shape[-2], ts[0][2].shape[-1]) for p, ts in terms.items()}
    over = sorted(p for p, m in small.items() if rank > m)
    if over:
        limit = min(small.values())
        raise ValueError(
            f"svd `rank`={rank} is larger than min(in, out) of {len(over)} leaves, e.g. {over[0]!r} "
            f"({small[over[0]]}): no rank-{rank} factorization of that matrix exists. Use rank <= {limit}, "
            "or rank=None (the inputs' largest rank, capped per leaf)."
        )


def _check_cat_ranks(terms: dict[str, list[Term]]) -> None:
    """``cat``'s rank ``Σ r_i`` fits every leaf: ``<= min(in, out)``, as :class:`LoRA` requires."""
    for path, ts in terms.items():
        r, limit = sum(a.shape[-1] for _, a, _, _ in ts), min(ts[0][1].shape[-2], ts[0][2].shape[-1])
        if r > limit:
            raise ValueError(
                f"how='cat' gives {path!r} rank {r} (the sum of the inputs' ranks), above min(in, out) = {limit} "
                f"of its matrix, which lrtt.LoRA refuses. Use how='svd', rank={limit}: exact at that rank."
            )


def _check_linear_ranks(terms: dict[str, list[Term]]) -> None:
    """``linear`` sums the factors: every input of a leaf has one rank (PEFT requires one ``r``)."""
    for path, ts in terms.items():
        ranks = [a.shape[-1] for _, a, _, _ in ts]
        if len(set(ranks)) > 1:
            raise ValueError(
                f"how='linear' sums the factors themselves, so every adapter needs the same rank; got ranks "
                f"{ranks} at {path!r}. Use how='cat' (exact, rank {sum(ranks)}) or how='svd' (rank of your choice)."
            )


# --- the combinations ---------------------------------------------------------------------------


def _combine_leaf(how: str, terms: list[Term], rank: int, clamp: float | None) -> LoraFactors:
    """One leaf's combined factors, scale 1, in the inputs' dtype."""
    dtype = jnp.result_type(*[x for _, a, b, _ in terms for x in (a, b)])
    work = jnp.promote_types(dtype, jnp.float32)
    terms = [(w, a.astype(work), b.astype(work), s) for w, a, b, s in terms]
    if how == "linear":
        a, b = linear(terms)
    elif how == "cat":
        a, b = cat(terms)
    else:
        a, b = svd(dense_sum(terms), min(rank, terms[0][1].shape[-2], terms[0][2].shape[-1]), clamp)
    return LoraFactors(a.astype(dtype), b.astype(dtype), scale=1.0)


def linear(terms: list[Term]) -> tuple[jax.Array, jax.Array]:
    """PEFT's ``linear``: ``A' = Σ σ_i √|w_i s_i| A_i``, ``B' = Σ √|w_i s_i| B_i``, ``σ_i = sign(w_i s_i)``
    (all ``A_i`` of one rank)."""
    a = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * a for w, a, _, s in terms)
    b = sum(math.sqrt(abs(w * s)) * b for w, _, b, s in terms)
    return a, b


def cat(terms: list[Term]) -> tuple[jax.Array, jax.Array]:
    """PEFT's ``cat``: ``A' = [w_1 s_1 A_1, …]`` along the rank axis, ``B' = [B_1; …]``."""
    a = jnp.concatenate([(w * s) * a for w, a, _, s in terms], axis=-1)
    b = jnp.concatenate([b for _, _, b, _ in terms], axis=-2)
    return a, b


def dense_sum(terms: list[Term]) -> jax.Array:
    """``Σ w_i s_i A_i B_i: (*stack, in, out)``."""
    return sum((w * s) * _matmul(a, b) for w, a, b, s in terms)


def svd(m: jax.Array, rank: int, clamp: float | None = None) -> tuple[jax.Array, jax.Array]:
    """PEFT's ``svd``: ``M = U S Vᵀ`` → ``A' = U[..., :r]``, ``B' = S[..., :r, None] · Vᵀ[..., :r, :]``,
    then (``clamp``) both clipped to ``± quantile(entries of A' and B', clamp)`` per matrix."""
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    a = u[..., :, :rank]
    b = s[..., :rank, None] * vh[..., :rank, :]
    if clamp is not None:
        stack = m.shape[:-2]
        dist = jnp.concatenate([b.reshape(*stack, -1), a.reshape(*stack, -1)], axis=-1)
        hi = jnp.quantile(dist, clamp, axis=-1)[..., None, None]
        a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
    return a, b


def relative_error(entry: LoraFactors, terms: list[Term]) -> float:
    """``‖scale·A B - Σ w_i s_i A_i B_i‖_F / ‖Σ w_i s_i A_i B_i‖_F`` (0 for 0/0, inf for x/0)."""
    work = jnp.promote_types(entry.a.dtype, jnp.float32)
    want = dense_sum([(w, a.astype(work), b.astype(work), s) for w, a, b, s in terms])
    got = entry.scale * _matmul(entry.a.astype(work), entry.b.astype(work))
    num, den = float(jnp.linalg.norm(got - want)), float(jnp.linalg.norm(want))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


# --- the returned method ----------------------------------------------------------------------


def _output_method(methods: tuple, ranks: dict[str, int], path_sets: list[set[str]]) -> LoRA:
    """The :class:`LoRA` of the combined adapter: scale 1 everywhere, per-leaf ranks, the inputs' targets."""
    first = methods[0]
    same = len({m.targets for m in methods}) == 1 and all(s == path_sets[0] for s in path_sets)
    targets = first.targets if same else exact_patterns(list(ranks))
    common = collections.Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = [(pattern, r) for path, r in ranks.items() if r != common
                    for pattern in exact_patterns([path])]
    return LoRA(
        rank=common,
        alpha=None,
        targets=targets,
        dropout=first.dropout,
        rank_pattern=rank_pattern,
        layouts=first.layouts,
        param_dtype=first.param_dtype,
    )
