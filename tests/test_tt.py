"""Tests for lrtt/_tt.py: TT shapes, validation, factorization, init, TT-SVD, materialize."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrtt.tt._core import (
    LORETTA_ADAPTER_DIMS,
    LORETTA_CLASSIFIER_DIMS,
    apply,
    auto_dims,
    core_shapes,
    init_gaussian,
    materialize,
    matrix_shape,
    num_core_params,
    preset_dims,
    resolve_dims,
    tt_ranks,
    tt_svd,
    validate,
)

SHAPES = [  # (dims, n_in, n_out)
    ((6, 4), 4, 6),
    ((4, 6, 5), 12, 10),
    ((2, 3, 4, 5), 8, 15),
    ((4, 4, 3, 2, 2), 16, 12),
]


def _normal(seed, shape):
    """Test data from numpy (jax.random would compile one kernel per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _random_cores(seed, dims, rank, stack=()):
    return tuple(_normal(seed + i, stack + s) for i, s in enumerate(core_shapes(dims, rank)))


def _element(cores, index):
    """M(a_1..a_d) = G_1[:, a_1, :] @ ... @ G_d[:, a_d, :], evaluated in numpy."""
    out = np.eye(1)
    for g, a in zip(cores, index):
        out = out @ np.asarray(g, np.float64)[:, a, :]
    return out[0, 0]


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# One compiled program per shape instead of one per eager op: keeps the file fast, and checks
# that everything traces under jit.
_materialize = jax.jit(materialize, static_argnums=(1, 2))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _svd_roundtrip(matrix, dims, rank):
    cores = tt_svd(matrix, dims, rank)
    return cores, materialize(cores, *matrix.shape[-2:])


# ---------------------------------------------------------------- shapes and counts

def test_ranks_and_core_shapes():
    assert tt_ranks([8, 8, 12, 8, 8], 5) == (1, 5, 5, 5, 5, 1)
    assert tt_ranks([7], 3) == (1, 1)
    assert tt_ranks([2, 2], 100) == (1, 100, 1)  # not capped
    assert core_shapes([4, 6, 5], 3) == ((1, 4, 3), (3, 6, 3), (3, 5, 1))


@pytest.mark.parametrize("dims,rank", [([8, 8, 12, 8, 8], 5), ([4, 6, 5], 3), ([9], 2)])
def test_num_core_params_is_sum_of_core_sizes(dims, rank):
    cores = _random_cores(0, dims, rank)
    assert num_core_params(dims, rank) == sum(c.size for c in cores)
    assert num_core_params([8, 8, 12, 8, 8], 5) == 780


# ---------------------------------------------------------------- validation

def test_validate_accepts_and_returns_tuple():
    assert validate([8, 8, 12, 8, 8], 5, n_in=768, n_out=64) == (8, 8, 12, 8, 8)
    assert validate(np.array([4, 3]), np.int64(2)) == (4, 3)


def test_validate_product_mismatch_message():
    with pytest.raises(ValueError, match=r"`tt_shape` \[8, 8, 12\] has product 768") as info:
        validate([8, 8, 12], 5, n_in=768, n_out=64)
    msg = str(info.value)
    assert "49152 entries" in msg and "[8, 8, 12, 8, 8]" in msg and "auto_dims(768, 64)" in msg
    with pytest.raises(ValueError, match=r"`dims` \[2, 2\] has product 4"):
        validate([2, 2], 1, n_in=2, n_out=3, name="dims")


@pytest.mark.parametrize("dims,rank,pattern", [
    ([4, 4], 0, r"tt_rank.*>= 1.*got 0"),
    ([4, 4], 2.0, r"tt_rank.*got 2\.0"),
    ([], 2, r"non-empty.*empty"),
    ([4, 2.5], 2, r"ints >= 1.*2\.5"),
    ([4, 0], 2, r"ints >= 1.*bad entries: \[0\]"),
    ([4, True], 2, r"ints >= 1"),
    ("44", 2, r"sequence of ints"),
    (16, 2, r"sequence of ints"),
])
def test_validate_rejects(dims, rank, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate(dims, rank)


# ---------------------------------------------------------------- factorization and presets

@pytest.mark.parametrize("n_in,n_out,ratio", [
    (768, 64, 1.5), (4096, 8, 1.0), (1024, 1024, 2.0), (3072, 768, 1.5), (1000, 10, 1.0),
    (5120, 8, 2.0), (12, 12, 1.0), (4096, 11008 // 43, 2.0),
])
def test_auto_dims_product_and_balance(n_in, n_out, ratio):
    dims = auto_dims(n_in, n_out)
    assert math.prod(dims) == n_in * n_out
    assert max(dims) / min(dims) <= ratio
    assert len(dims) == max(1, round(math.log(n_in * n_out) / math.log(8)))
    assert auto_dims(n_in, n_out) == dims  # deterministic


def test_auto_dims_examples_and_edge_cases():
    assert auto_dims(768, 64) == (8, 8, 12, 8, 8)
    assert auto_dims(4096, 8) == (8,) * 5
    assert auto_dims(997, 1) == (997,)  # prime
    assert auto_dims(1, 1) == (1,)
    assert math.prod(auto_dims(11008, 8)) == 11008 * 8  # large prime factor 43
    with pytest.raises(ValueError, match="n_in"):
        auto_dims(0, 4)


def test_every_preset_row_has_the_right_product():
    for (hidden, bottleneck), dims in LORETTA_ADAPTER_DIMS.items():
        assert math.prod(dims) == hidden * bottleneck, (hidden, bottleneck, dims)
        assert preset_dims(hidden, bottleneck) == tuple(dims)
        assert preset_dims(bottleneck, hidden) == tuple(dims)  # up projection, same row
    for hidden, dims in LORETTA_CLASSIFIER_DIMS.items():
        assert math.prod(dims) == hidden * hidden, (hidden, dims)
        assert preset_dims(hidden, hidden) == tuple(dims)
    assert preset_dims(768, 32) is None and preset_dims(64, 64) is None


def test_resolve_dims():
    assert resolve_dims(None, 768, 64) == auto_dims(768, 64)
    assert resolve_dims("loretta", 4096, 64) == (16, 16, 16, 4, 4, 4)
    assert resolve_dims("loretta", 64, 4096) == (16, 16, 16, 4, 4, 4)
    assert resolve_dims("loretta", 100, 10) == auto_dims(100, 10)  # no row: fallback
    assert resolve_dims([10, 10, 10], 100, 10) == (10, 10, 10)
    assert resolve_dims(np.array([10, 100]), 100, 10) == (10, 100)
    with pytest.raises(ValueError, match=r"has product 100 .* give dims whose product is 1000"):
        resolve_dims((10, 10), 100, 10)
    assert resolve_dims(2, 100, 10) == auto_dims(100, 10, cores=2) == (40, 25)  # an int: that many cores
    for bad in ("LoRETTA", "auto", 0, True, 2.5):
        with pytest.raises(ValueError, match=r"`tt_shape` must be None.*\"loretta\".*sequence"):
            resolve_dims(bad, 100, 10)


# ---------------------------------------------------------------- materialize / apply

@pytest.mark.parametrize("dims,n_in,n_out", SHAPES)
def test_materialize_matches_elementwise_formula(dims, n_in, n_out):
    cores = _random_cores(1, dims, 3)
    dense = np.asarray(materialize(cores, n_in, n_out))
    assert dense.shape == (n_in, n_out)
    rng = np.random.default_rng(0)
    for _ in range(10):
        index = tuple(int(rng.integers(k)) for k in dims)
        flat = np.ravel_multi_index(index, dims)  # row-major reshape of the whole matrix
        np.testing.assert_allclose(dense.reshape(-1)[flat], _element(cores, index), rtol=1e-5,
                                   atol=1e-5)


def test_materialize_stack_axes_and_jit():
    dims, n_in, n_out = (4, 6, 5), 12, 10
    cores = _random_cores(2, dims, 3, stack=(2, 3))
    dense = jax.jit(materialize, static_argnums=(1, 2))(cores, n_in, n_out)
    assert dense.shape == (2, 3, n_in, n_out)
    one = materialize(tuple(c[1, 2] for c in cores), n_in, n_out)
    np.testing.assert_allclose(dense[1, 2], one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stack", [(), (3,), (2, 3)])
def test_matrix_shape_is_the_materialized_shape_without_tracing(stack):
    dims, n_in, n_out = (4, 6, 5), 12, 10
    cores = _random_cores(4, dims, 3, stack=stack)
    assert matrix_shape(cores, n_in, n_out) == materialize(cores, n_in, n_out).shape
    with pytest.raises(ValueError, match="has product 120 .* 121 entries"):
        matrix_shape(cores, 11, 11)
    with pytest.raises(ValueError, match="do not form a tensor train"):
        matrix_shape((cores[0], cores[2], cores[1]), n_in, n_out)


def test_matrix_shape_names_stacks_that_do_not_broadcast():
    cores = list(_random_cores(5, (4, 6, 5), 3, stack=(3,)))
    cores[1] = cores[1][:2]
    with pytest.raises(ValueError, match=r"stack axes \[\(3,\), \(2,\), \(3,\)\] do not broadcast"):
        matrix_shape(cores, 12, 10)


def test_materialize_rejects_bad_cores():
    cores = _random_cores(3, (4, 6, 5), 3)
    with pytest.raises(ValueError, match="has product 120 .* 121 entries"):
        materialize(cores, 11, 11)
    with pytest.raises(ValueError, match="do not form a tensor train"):
        materialize((cores[0], cores[2], cores[1]), 12, 10)


@pytest.mark.parametrize("dims,n_in,n_out,rank", [
    ((8, 8, 12, 8, 8), 768, 64, 5),  # aligned split: (x @ L) @ R
    ((4, 6, 5), 12, 10, 3),  # no prefix multiplies to 12: materialized
    ((4, 3, 10), 12, 10, 2),
])
def test_apply_equals_x_at_materialized(dims, n_in, n_out, rank):
    cores = _random_cores(4, dims, rank, stack=(2,))
    x = _normal(5, (2, 7, n_in))
    want = np.asarray(x) @ np.asarray(_materialize(cores, n_in, n_out))
    got = jax.jit(apply, static_argnums=(2, 3))(cores, x, n_in, n_out)
    assert got.shape == (2, 7, n_out)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


# ---------------------------------------------------------------- TT-SVD

@pytest.mark.parametrize("dims,n_in,n_out", SHAPES)
def test_tt_svd_exact_at_full_rank(dims, n_in, n_out):
    matrix = _normal(6, (n_in, n_out))
    full = max(min(math.prod(dims[:i]), math.prod(dims[i:])) for i in range(1, len(dims)))
    cores, dense = _svd_roundtrip(matrix, dims, full)
    assert tuple(c.shape for c in cores) == core_shapes(dims, full)
    assert _rel_err(dense, matrix) < 1e-5


def test_tt_svd_stack_axis_and_padding():
    dims, n_in, n_out, rank = (2, 3, 4, 5), 8, 15, 30  # bonds allow at most 2, 6, 5
    matrix = _normal(7, (3, n_in, n_out))
    cores = tt_svd(matrix, dims, rank)  # eager here, jitted elsewhere
    assert tuple(c.shape for c in cores) == tuple((3,) + s for s in core_shapes(dims, rank))
    cores = [np.asarray(c) for c in cores]
    assert not np.any(cores[0][..., 2:])  # padded with zeros beyond the available rank 2
    assert not np.any(cores[1][:, 2:]) and not np.any(cores[1][..., 6:])
    dense = _materialize(cores, n_in, n_out)
    assert dense.shape == (3, n_in, n_out)
    assert _rel_err(dense, matrix) < 1e-5


def test_tt_svd_truncated():
    dims, n_in, n_out = (4, 4, 3, 2, 2), 16, 12
    matrix = _normal(8, (2, n_in, n_out))
    errs = []
    for rank in (1, 3, 16):
        cores, dense = _svd_roundtrip(matrix, dims, rank)
        assert tuple(c.shape[1:] for c in cores) == core_shapes(dims, rank)
        errs.append(_rel_err(dense, matrix))
    assert all(np.isfinite(errs)) and 0 < errs[0] < 1
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5


def test_tt_svd_low_rank_matrix_is_recovered_at_low_rank():
    dims, n_in, n_out = (8, 8, 12, 8, 8), 768, 64
    cores = _random_cores(9, dims, 2)
    matrix = _materialize(cores, n_in, n_out)
    _, dense = _svd_roundtrip(matrix, dims, 2)
    assert _rel_err(dense, matrix) < 1e-4


def test_tt_svd_rejects_bad_dims():
    with pytest.raises(ValueError, match=r"`dims` \[4, 4\] has product 16 .* 20 entries"):
        tt_svd(jnp.ones((4, 5)), [4, 4], 2)


# ---------------------------------------------------------------- Gaussian init

def test_init_gaussian_shapes_and_element_std():
    dims, n_in, n_out, rank = (8, 8, 12, 8, 8), 768, 64, 5
    key = jax.random.key(10, impl="rbg")  # any key works; rbg compiles fast on CPU
    cores = init_gaussian(key, dims, rank, n_in=n_in, n_out=n_out, stack=(8,))
    assert tuple(c.shape for c in cores) == tuple((8,) + s for s in core_shapes(dims, rank))
    assert all(c.dtype == jnp.float32 for c in cores)
    dense = np.asarray(_materialize(cores, n_in, n_out))
    target = math.sqrt(1 / (n_in + n_out))
    assert 0.7 * target < dense.std() < 1.3 * target
    # each core is N(0, 1) / sqrt(right rank) * (1 / (n_in + n_out)) ** (1 / (2 d))
    scale = (1 / (n_in + n_out)) ** (1 / (2 * len(dims)))
    for c in cores:
        assert abs(np.asarray(c).std() / (scale / math.sqrt(c.shape[-1])) - 1) < 0.25
    assert not np.allclose(cores[1][0], cores[1][1])  # stack members differ


def test_init_gaussian_dtype_keys_and_validation():
    key = jax.random.key(0, impl="rbg")
    cores = init_gaussian(key, (4, 6, 5), 3, n_in=12, n_out=10, dtype=jnp.bfloat16)
    assert all(c.dtype == jnp.bfloat16 for c in cores)
    again = init_gaussian(key, (4, 6, 5), 3, n_in=12, n_out=10, dtype=jnp.bfloat16)
    assert all(np.array_equal(a, b) for a, b in zip(cores, again))
    assert not np.array_equal(cores[1][0], cores[1][1])  # one key per core, fresh draws
    (single,) = init_gaussian(jax.random.key(0), (6,), 2, n_in=2, n_out=3)  # default threefry
    assert single.shape == (1, 6, 1)
    np.testing.assert_allclose(materialize((single,), 2, 3).reshape(-1), single.reshape(-1))
    with pytest.raises(ValueError, match="has product 120"):
        init_gaussian(jax.random.key(0), (4, 6, 5), 3, n_in=12, n_out=12)


def test_the_old_name_of_num_core_params_says_the_new_one():
    import lrtt.tt

    with pytest.raises(AttributeError, match=r"lrtt.tt.num_params was renamed lrtt.tt.num_core_params"):
        lrtt.tt.num_params
