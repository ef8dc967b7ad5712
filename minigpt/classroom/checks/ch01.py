"""Checks for chapter 01 (rank and low-rank matrices): the notebook's functions against NumPy.

Every check builds its own matrices from a fixed seed and compares the notebook's answer with the
NumPy reference (``np.linalg.matrix_rank``, ``np.linalg.svd``, ``np.linalg.norm``) or with an exact
count. Singular vectors are only defined up to sign, so factors are compared through their products.
"""

from __future__ import annotations

import numpy as np

from minigpt.classroom.checks import check, fetched, held

# (d, k, rank): tall, wide, square, full-rank and rank-1 cases.
SHAPES_AND_RANKS = ((6, 4, 1), (8, 8, 3), (5, 12, 5), (40, 30, 7), (30, 40, 30))


def _low_rank(d: int, k: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    """A d x k matrix of rank ``rank`` (almost surely): a product of Gaussian factors."""
    return rng.normal(size=(d, rank)) @ rng.normal(size=(rank, k))


def _numpy_best_rank_r(M: np.ndarray, r: int) -> tuple[np.ndarray, float]:
    """NumPy's truncated SVD M_r and the Eckart-Young error sqrt(sum of the dropped sigma^2)."""
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vt[:r], float(np.sqrt(np.sum(s[r:] ** 2)))


@check(points=1)
def matrix_rank_matches_numpy(nb):
    """matrix_rank agrees with np.linalg.matrix_rank, honours tol, and rejects non-matrices."""
    rng = np.random.default_rng(101)
    example = np.array([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]])
    assert nb.matrix_rank(example) == 1, (
        f"matrix_rank([[1, 2, 3], [3, 6, 9]]) returned {nb.matrix_rank(example)}; the second row "
        "is 3x the first, "
        "so the rank is 1. Count singular values above the tolerance, not all of them."
    )
    assert nb.matrix_rank(np.zeros((3, 4))) == 0, "the zero matrix has rank 0"
    for d, k, rank in SHAPES_AND_RANKS:
        X = _low_rank(d, k, rank, rng)
        got, want = nb.matrix_rank(X), int(np.linalg.matrix_rank(X))
        assert got == want == rank, (
            f"matrix_rank returned {got} for a {d}x{k} matrix built with rank {rank}; "
            f"np.linalg.matrix_rank says {want}"
        )
    noisy = example + 1e-10 * rng.normal(size=example.shape)
    assert nb.matrix_rank(noisy) == np.linalg.matrix_rank(noisy) == 2, (
        "with the default tolerance sigma_1 * max(d, k) * eps, noise of 1e-10 makes the 2x3 "
        "example rank 2, "
        f"but matrix_rank returned {nb.matrix_rank(noisy)}"
    )
    assert nb.matrix_rank(noisy, tol=1e-6) == 1, (
        f"matrix_rank(noisy, tol=1e-6) returned {nb.matrix_rank(noisy, tol=1e-6)}; singular values "
        "below tol "
        "must not be counted"
    )
    try:
        nb.matrix_rank(np.ones(3))
    except ValueError:
        pass
    else:
        raise AssertionError(
            "matrix_rank(np.ones(3)) should raise ValueError: M must be a 2-D matrix"
        )


@check(points=2)
def truncated_svd_matches_numpy(nb):
    """truncated_svd returns the top-r singular triplets: shapes, orthonormality, values, M_r."""
    rng = np.random.default_rng(102)
    for d, k in ((7, 5), (5, 9), (12, 12)):
        M = rng.normal(size=(d, k))
        s_ref = np.linalg.svd(M, compute_uv=False)
        for r in (1, 3, min(d, k)):
            U_r, s_r, Vt_r = nb.truncated_svd(M, r)
            shapes = (np.shape(U_r), np.shape(s_r), np.shape(Vt_r))
            assert shapes == ((d, r), (r,), (r, k)), (
                f"truncated_svd on a {d}x{k} matrix at r={r} returned shapes {shapes}; "
                f"expected U_r {(d, r)}, s_r {(r,)}, Vt_r {(r, k)}"
            )
            np.testing.assert_allclose(
                s_r,
                s_ref[:r],
                rtol=1e-10,
                atol=1e-12,
                err_msg="s_r must be the r largest singular values, largest first",
            )
            np.testing.assert_allclose(
                U_r.T @ U_r, np.eye(r), atol=1e-10, err_msg="the columns of U_r must be orthonormal"
            )
            np.testing.assert_allclose(
                Vt_r @ Vt_r.T, np.eye(r), atol=1e-10, err_msg="the rows of Vt_r must be orthonormal"
            )
            want, _ = _numpy_best_rank_r(M, r)
            np.testing.assert_allclose(
                (U_r * s_r) @ Vt_r,
                want,
                rtol=1e-9,
                atol=1e-10,
                err_msg=f"U_r diag(s_r) Vt_r must equal NumPy's rank-{r} truncation",
            )
    for bad in (0, 6):
        try:
            nb.truncated_svd(rng.normal(size=(5, 4)), bad)
        except ValueError:
            continue
        raise AssertionError(
            f"truncated_svd(M of shape (5, 4), r={bad}) should raise ValueError: "
            "r must be in [1, min(d, k)] = [1, 4]"
        )


@check(points=1)
def low_rank_factors_give_best_rank_r(nb):
    """low_rank_factors returns B (d, r), A (r, k) with B @ A = M_r and the Eckart-Young error."""
    rng = np.random.default_rng(103)
    example = np.array([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]])
    B, A = nb.low_rank_factors(example, 1)
    assert np.shape(B) == (2, 1) and np.shape(A) == (1, 3), (
        f"low_rank_factors(2x3 example, 1) returned B {np.shape(B)} and A {np.shape(A)}; expected "
        "(2, 1) and (1, 3)"
    )
    np.testing.assert_allclose(
        B @ A, example, atol=1e-12, err_msg="a rank-1 matrix must be rebuilt exactly at r=1"
    )
    for d, k, rank in SHAPES_AND_RANKS:
        exact = _low_rank(d, k, rank, rng)
        B, A = nb.low_rank_factors(exact, rank)
        np.testing.assert_allclose(
            B @ A,
            exact,
            rtol=1e-8,
            atol=1e-8,
            err_msg=f"a {d}x{k} matrix of rank {rank} must be rebuilt exactly at r={rank}",
        )
        M = rng.normal(size=(d, k))
        r = max(1, min(d, k) // 3)
        B, A = nb.low_rank_factors(M, r)
        assert np.shape(B) == (d, r) and np.shape(A) == (r, k), (
            f"for a {d}x{k} matrix at r={r} expected B {(d, r)} and A {(r, k)}, got {np.shape(B)} "
            f"and {np.shape(A)}"
        )
        want, error = _numpy_best_rank_r(M, r)
        got_error = np.linalg.norm(M - B @ A)
        assert np.isclose(got_error, error, rtol=1e-9), (
            f"||M - B A||_F = {got_error:.6f} for a {d}x{k} matrix at r={r}, but the best rank-{r} "
            "error from "
            f"np.linalg.svd is {error:.6f}"
        )
        np.testing.assert_allclose(
            B @ A,
            want,
            rtol=1e-9,
            atol=1e-10,
            err_msg="B @ A must be the truncated SVD U_r diag(s_r) Vt_r",
        )


@check(points=1)
def eckart_young_error_matches_svd(nb):
    """eckart_young_error(s, r) equals ||M - M_r||_F from np.linalg.svd, including r = 0 and r =
    p."""
    rng = np.random.default_rng(104)
    for d, k in ((9, 6), (6, 9), (10, 10)):
        M = rng.normal(size=(d, k))
        s = np.linalg.svd(M, compute_uv=False)
        for r in range(0, min(d, k) + 1):
            want = np.linalg.norm(M - _numpy_best_rank_r(M, r)[0]) if r else np.linalg.norm(M)
            got = nb.eckart_young_error(s, r)
            assert np.isclose(got, want, rtol=1e-9, atol=1e-12), (
                f"eckart_young_error(s, {r}) = {got:.6f} for a {d}x{k} matrix, but ||M - M_r||_F = "
                f"{want:.6f}; "
                "it should be sqrt of the sum of the squared singular values that are dropped (i > "
                "r)"
            )
    assert np.isclose(nb.eckart_young_error(np.array([3.0, 4.0]), 1), 3.0), (
        "eckart_young_error([3, 4], 1) should be 3: keep the largest value (4), drop the 3"
    )


@check(points=1)
def lora_parameter_count_is_exact(nb):
    """lora_parameter_count(d, k, r) = r(d + k) exactly, and rejects ranks outside [1, min(d,
    k)]."""
    cases = {
        (1000, 100, 10): 11_000,
        (8192, 8192, 16): 262_144,
        (1024, 8192, 16): 147_456,
        (2, 3, 1): 5,
    }
    for (d, k, r), want in cases.items():
        got = nb.lora_parameter_count(d, k, r)
        assert got == want, (
            f"lora_parameter_count({d}, {k}, {r}) returned {got!r}; a rank-{r} update B A stores "
            f"r*d + r*k = {want:,} "
            f"numbers (the full matrix has d*k = {d * k:,})"
        )
        assert isinstance(got, (int, np.integer)), (
            f"lora_parameter_count should return an int, got {type(got)}"
        )
    for bad in ((1000, 100, 0), (1000, 100, 101), (0, 100, 1)):
        try:
            nb.lora_parameter_count(*bad)
        except (ValueError, TypeError):
            continue
        raise AssertionError(
            f"lora_parameter_count{bad} should raise ValueError (rank in [1, min(d, k)])"
        )


@check(points=2)
def finetune_linear_recovers_the_change(nb):
    """finetune_linear returns Delta W = W_T - W0 of gradient descent, without modifying W0."""
    rng = np.random.default_rng(105)
    d_out, d_in, n, rank = 6, 10, 400, 2
    W0 = rng.normal(size=(d_out, d_in)) / np.sqrt(d_in)
    delta_true = _low_rank(d_out, d_in, rank, rng) / 4
    X = rng.normal(size=(n, d_in))
    Y = X @ (W0 + delta_true).T
    theirs = held(nb, W0)  # the notebook's own copy, to see whether it changes
    delta = nb.finetune_linear(theirs, X, Y, lr=0.5, steps=300, progress=False)
    np.testing.assert_array_equal(
        fetched(theirs), W0, err_msg="finetune_linear must not modify W0 in place"
    )
    assert np.shape(delta) == (d_out, d_in), (
        f"Delta W should have W0's shape {(d_out, d_in)}, got {np.shape(delta)}"
    )
    np.testing.assert_allclose(
        delta,
        delta_true,
        atol=1e-6,
        err_msg=(
            "on noiseless data gradient descent should converge to the true change; check the "
            "gradient "
            "(X W^T - Y)^T X / n and that you return W_T - W0, not W_T"
        ),
    )
    one_step = nb.finetune_linear(W0, X, Y, lr=0.1, steps=1, progress=False)
    want = -0.1 * (X @ W0.T - Y).T @ X / n
    np.testing.assert_allclose(
        one_step,
        want,
        rtol=1e-10,
        atol=1e-12,
        err_msg=(
            "one step of gradient descent on L(W) = 1/(2n)||X W^T - Y||_F^2 should change W by -lr "
            "(X W^T - Y)^T X / n"
        ),
    )
    assert np.allclose(nb.finetune_linear(W0, X, Y, steps=0, progress=False), 0.0), (
        "zero steps: Delta W = 0"
    )


@check(points=1)
def exercise_1_rank_for_energy_is_smallest(nb):
    """exercise_1_rank_for_energy returns the smallest r whose top-r energy reaches the budget."""
    fixed = {(0.5,): 1, (0.9,): 2, (0.95,): 3, (1.0,): 4}
    s = np.array([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, 0.25 of 14.25
    for (level,), want in fixed.items():
        got = nb.exercise_1_rank_for_energy(s, level)
        assert got == want, (
            f"exercise_1_rank_for_energy([3, 2, 1, 0.5], {level}) returned {got!r}, expected {want}"
        )
    got = nb.exercise_1_rank_for_energy(np.array([3.0, 2.0, 0.0, 0.0]), 1.0)
    assert got == 2, f"with singular values [3, 2, 0, 0] all the energy sits in rank 2, got {got!r}"
    rng = np.random.default_rng(106)
    for _ in range(20):
        spectrum = np.sort(rng.exponential(size=rng.integers(2, 30)))[::-1]
        level = float(rng.uniform(0.05, 0.999))
        shares = np.cumsum(spectrum**2) / np.sum(spectrum**2)
        want = int(np.flatnonzero(shares >= level)[0]) + 1
        got = nb.exercise_1_rank_for_energy(spectrum, level)
        assert got == want, (
            f"for energy={level:.4f} the cumulative shares are {np.round(shares, 4)}; the smallest "
            "r reaching it is "
            f"{want}, got {got!r}"
        )


@check(points=1)
def exercise_2_compression_ratio_is_exact(nb):
    """exercise_2_compression_ratio(d, k, r) = d*k / (r(d + k))."""
    for d, k, r in ((1000, 100, 10), (8192, 8192, 16), (768, 768, 8), (1024, 8192, 16)):
        got, want = nb.exercise_2_compression_ratio(d, k, r), d * k / (r * (d + k))
        assert np.isclose(got, want, rtol=1e-12), (
            f"exercise_2_compression_ratio({d}, {k}, {r}) returned {got!r}; expected d*k / "
            f"(r(d+k)) = {want:.6g}"
        )


@check(points=1)
def exercise_3_break_even_rank_is_largest_saving_rank(nb):
    """exercise_3_break_even_rank(d, k) is the largest r with r(d + k) < d*k (brute force)."""
    for d in range(1, 40, 3):
        for k in range(1, 40, 4):
            want = max((r for r in range(0, min(d, k) + 1) if r * (d + k) < d * k), default=0)
            got = nb.exercise_3_break_even_rank(d, k)
            assert got == want, (
                f"exercise_3_break_even_rank({d}, {k}) returned {got!r}; the largest r with "
                f"r*(d+k) < d*k is {want}"
            )
    assert nb.exercise_3_break_even_rank(768, 768) == 383, (
        "for 768 x 768 the break-even rank is 383"
    )


@check(points=1)
def exercise_4_norms_match_numpy(nb):
    """exercise_4_nuclear_and_frobenius matches np.linalg.norm(M, 'nuc') and np.linalg.norm(M,
    'fro')."""
    rng = np.random.default_rng(107)
    for d, k, rank in SHAPES_AND_RANKS:
        X = _low_rank(d, k, rank, rng)
        nuclear, frobenius = nb.exercise_4_nuclear_and_frobenius(X)
        want_nuc, want_fro = np.linalg.norm(X, "nuc"), np.linalg.norm(X, "fro")
        assert np.isclose(nuclear, want_nuc, rtol=1e-9), (
            f"nuclear norm {nuclear!r} != np.linalg.norm(M, 'nuc') = {want_nuc:.6f} for a {d}x{k} "
            f"rank-{rank} "
            "matrix; it is the sum of the singular values"
        )
        assert np.isclose(frobenius, want_fro, rtol=1e-9), (
            f"Frobenius norm {frobenius!r} != np.linalg.norm(M, 'fro') = {want_fro:.6f}; it is "
            "sqrt(sum sigma_i^2)"
        )


@check(points=1)
def exercise_5_rank_of_product_matches_numpy(nb):
    """exercise_5_rank_of_product returns (rank(PQ), min(rank P, rank Q)) as NumPy computes them."""
    rng = np.random.default_rng(108)
    for d, m, k, rank_p, rank_q in (
        (10, 6, 8, 3, 5),
        (10, 6, 8, 6, 2),
        (20, 4, 20, 4, 4),
        (7, 7, 7, 7, 7),
    ):
        P, Q = _low_rank(d, m, rank_p, rng), _low_rank(m, k, rank_q, rng)
        want = (
            int(np.linalg.matrix_rank(P @ Q)),
            min(int(np.linalg.matrix_rank(P)), int(np.linalg.matrix_rank(Q))),
        )
        got = tuple(nb.exercise_5_rank_of_product(P, Q))
        assert got == want, (
            f"for rank(P) = {rank_p}, rank(Q) = {rank_q}: expected {want}, got {got}"
        )
    P, Q = np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [0.0, 1.0]])
    got = tuple(nb.exercise_5_rank_of_product(P, Q))
    assert got == (0, 1), (
        f"P = diag(1, 0), Q = diag(0, 1) multiply to zero: expected (0, 1), got {got}"
    )
