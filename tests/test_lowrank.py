"""The factored algebra against dense torch oracles on small random matrices."""

import pytest
import torch

from mergekit_tada.lowrank import Factored, stack, svd, truncate
from mergekit_tada.methods.tada import find_conflicts, tada_combine


def tada_lora(task, domain, rank, **kw):
    """TaDA's merged update of one module, truncated to ``rank``: (lora, record)."""
    merged, record = tada_combine(task, domain, **kw)
    return truncate(merged, rank), record


def rand_factored(m, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    return Factored(torch.randn(m, k, generator=g), torch.randn(k, n, generator=g))


def rel(a, b):
    return float(
        torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())
    )


@pytest.mark.parametrize("m,k,n", [(40, 4, 30), (16, 8, 64), (6, 9, 5)])
def test_svd_of_product_is_exact(m, k, n):
    f = rand_factored(m, k, n, seed=m + n)
    s = svd(f)
    dense = f.B.double() @ f.A.double()
    ref = torch.linalg.svdvals(dense)[: len(s)]
    assert len(s) == min(m, k, n)
    assert rel(s.U @ torch.diag(s.S) @ s.V.T, dense) < 1e-5
    assert torch.allclose(s.S.double(), ref, rtol=1e-5)
    eye = torch.eye(len(s))
    assert torch.allclose(s.U.T @ s.U, eye, atol=1e-5)
    assert torch.allclose(s.V.T @ s.V, eye, atol=1e-5)


def test_svd_drops_null_directions():
    f = rand_factored(20, 3, 15, seed=1)
    padded = Factored(
        torch.cat([f.B, torch.zeros(20, 1)], 1), torch.cat([f.A, torch.ones(1, 15)], 0)
    )
    s = svd(padded)
    assert len(s) == 3
    assert rel(s.U @ torch.diag(s.S) @ s.V.T, f.dense()) < 1e-5
    zero = Factored(torch.zeros(5, 2), torch.zeros(2, 4))
    assert len(svd(zero)) == 0


def test_stack_is_the_weighted_sum():
    a, b = rand_factored(12, 3, 9, 1), rand_factored(12, 5, 9, 2)
    s = stack([a, b], [0.3, -2.0])
    assert rel(s.dense(), 0.3 * a.dense() - 2.0 * b.dense()) < 1e-6
    assert s.rank_bound == 8


@pytest.mark.parametrize("rank", [1, 3, 7, 12])
def test_truncation_is_eckart_young(rank):
    f = stack([rand_factored(30, 4, 25, 3), rand_factored(30, 5, 25, 4)], [1.0, 0.5])
    t = truncate(svd(f), rank)
    dense = f.dense().double()
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    k = min(rank, 9)
    best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    assert t.B.shape == (30, rank) and t.A.shape == (rank, 25)
    assert rel(t.B @ t.A, best) < 1e-5
    expected_energy = float((s[k:] ** 2).sum() / (s**2).sum())
    assert t.truncation_energy == pytest.approx(expected_energy, rel=1e-4, abs=1e-9)
    # B = U S^1/2 and A = S^1/2 V^T: both factors carry the same column norms.
    assert torch.allclose(t.B.norm(dim=0), t.A.norm(dim=1), rtol=1e-4)


def test_truncate_rejects_nonpositive_rank():
    with pytest.raises(ValueError):
        truncate(svd(rand_factored(4, 2, 4, 0)), 0)


def _orthonormal(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g))[0]


def _opposing_pair(sigma_t, sigma_d):
    """Task = s1 u1 v1^T + s2 u2 v2^T; domain = -sd u1 v1^T + 0.7 u3 v3^T."""
    U, V = _orthonormal(24, 3, 7), _orthonormal(18, 3, 8)
    task = Factored(U[:, :2] * torch.tensor([sigma_t, 0.5]), V[:, :2].T)
    domain = Factored(
        torch.stack([-U[:, 0] * sigma_d, U[:, 2] * 0.7], 1), V[:, [0, 2]].T
    )
    return U, V, task, domain


def conflicts(task, domain, task_gate, domain_gate, kappa):
    """find_conflicts on two explicit thin SVDs (cosines from their vectors)."""
    cosines = (task.U.T @ domain.U) * (task.V.T @ domain.V)
    return find_conflicts(cosines, task.S, domain.S, task_gate, domain_gate, kappa)


@pytest.mark.parametrize(
    "task_gate,domain_gate,drops", [(0.5, 0.5, "domain"), (0.2, 0.8, "task")]
)
def test_opposing_direction_is_dropped(task_gate, domain_gate, drops):
    U, V, task, domain = _opposing_pair(sigma_t=2.0, sigma_d=1.0)
    c = conflicts(svd(task), svd(domain), task_gate, domain_gate, kappa=0.3)
    lora, record = tada_lora(
        task,
        domain,
        4,
        task_gate=task_gate,
        domain_gate=domain_gate,
        conflict_elimination=True,
        kappa=0.3,
    )
    u1v1 = torch.outer(U[:, 0], V[:, 0])
    rest_t = 0.5 * torch.outer(U[:, 1], V[:, 1])
    rest_d = 0.7 * torch.outer(U[:, 2], V[:, 2])
    if drops == "domain":  # w_T * 2.0 > w_D * 1.0: the domain's -u1 v1^T goes
        assert c.dropped_task == [] and c.dropped_domain == [0]
        expected = task_gate * (2.0 * u1v1 + rest_t) + domain_gate * rest_d
    else:  # 0.2 * 2.0 < 0.8 * 1.0: the task's u1 v1^T goes
        assert c.dropped_task == [0] and c.dropped_domain == []
        expected = task_gate * rest_t + domain_gate * (-1.0 * u1v1 + rest_d)
    assert record["dropped_task"] == c.dropped_task
    assert record["dropped_domain"] == c.dropped_domain
    assert rel(lora.B @ lora.A, expected) < 1e-5


def test_no_conflict_below_threshold_or_when_disabled():
    U, V, task, domain = _opposing_pair(2.0, 1.0)
    # c_ij >= -1 always, so a threshold above 1 never drops anything.
    assert conflicts(svd(task), svd(domain), 0.5, 0.5, kappa=1.01).dropped_domain == []
    lora, _ = tada_lora(
        task,
        domain,
        6,
        task_gate=0.5,
        domain_gate=0.5,
        conflict_elimination=False,
        kappa=0.3,
    )
    assert rel(lora.B @ lora.A, 0.5 * task.dense() + 0.5 * domain.dense()) < 1e-5


def test_module_in_one_adapter_keeps_its_gated_update():
    f = rand_factored(10, 3, 8, 5)
    lora, record = tada_lora(
        None, f, 3, task_gate=0.3, domain_gate=0.7, conflict_elimination=True, kappa=0.3
    )
    assert rel(lora.B @ lora.A, 0.7 * f.dense()) < 1e-5
    assert record["dropped_task"] == [] and lora.truncation_energy < 1e-6


def test_svd_coordinates_match_dense():
    """(X, S, Y) from the Grams alone: B A = (B X) S (A^T Y)^T, orthonormal bases."""
    from mergekit_tada.lowrank import svd_coordinates

    f = rand_factored(40, 5, 30, 1)
    B, A = f.B.double(), f.A.double()
    x, s, y = svd_coordinates(B.T @ B, A @ A.T)
    u, v = B @ x, A.T @ y
    dense = B @ A
    assert rel(u @ torch.diag(s) @ v.T, dense) < 1e-10
    assert torch.allclose(s, torch.linalg.svdvals(dense)[: len(s)], rtol=1e-10)
    assert torch.allclose(u.T @ u, torch.eye(len(s), dtype=torch.float64), atol=1e-10)
    assert torch.allclose(v.T @ v, torch.eye(len(s), dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_add_product_is_w_plus_ba_rounded_once(dtype):
    """Row blocks (7 rows, not dividing 30): W + B A within one rounding to dtype."""
    from mergekit_tada.lowrank import add_product

    f = rand_factored(30, 4, 12, 5)
    W = torch.randn(30, 12).to(dtype)
    W64, B64, A64 = W.double(), f.B.double(), f.A.double()
    reference = W64 + B64 @ A64
    out = add_product(W, f.B, f.A, rows=7)
    assert out.dtype == dtype and out.shape == W.shape
    # one rounding to dtype, plus float32 accumulation of the k products
    bound = torch.finfo(dtype).eps * reference.abs() + 8 * torch.finfo(
        torch.float32
    ).eps * (W64.abs() + B64.abs() @ A64.abs())
    assert ((out.double() - reference).abs() <= bound).all()
    assert (out.double() - W64).abs().max() > 1  # the update is there
