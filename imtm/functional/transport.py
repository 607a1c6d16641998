r"""Optimal-transport plans between two padded token sets (ELA's patch-word alignment).

:func:`transport_plan` solves a batch of discrete optimal-transport problems
with uniform marginals over the *real* tokens of each side: padded tokens carry
no mass and receive none. Its default solver is the inexact proximal point
method (IPOT, Xie et al. 2020), batched in torch; POT's exact network simplex
(``ot.emd``) and its Sinkhorn (``ot.sinkhorn``) are available as backends and
serve as the reference in the tests and in ``benchmarks/bench_ela_transport.py``.

Why IPOT by default (measured by ``benchmarks/bench_ela_transport.py`` on
64 problems of 197 x 20, one CPU thread of a shared machine): 50 IPOT iterations at
:math:`\beta = 0.5` land within 0.33% on average (0.37% at most) of the exact
transport cost of ``ot.emd``; as one batched tensor program they ran 1.06x to 2.1x
faster than ``ot.emd`` called problem by problem in three runs (the machine's load
moved the ratio; 1.72x in the run quoted in ``benchmarks/README.md``), and 82x faster than
``ot.sinkhorn`` one by one at the same accuracy (which needs reg = 0.01) and 11x
faster than POT's batched log-Sinkhorn. Unlike ``ot.emd`` it stays on the inputs'
device, is differentiable, and never leaves the batch for a host loop. Entropic
Sinkhorn (``method="sinkhorn"``, in the log domain here) is offered for smooth plans.

Shape glossary: ``B`` problems, ``N`` source tokens (image patches), ``M``
target tokens (words).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from numbers import Integral, Real

import torch

from imtm._checks import suggest

__all__ = [
    "TRANSPORT_METHODS",
    "cosine_cost",
    "flush_threshold",
    "transport_cost",
    "transport_plan",
]


def flush_threshold(dtype: torch.dtype) -> float:
    """Plan entries below this are set to zero in every IPOT iteration.

    IPOT multiplies each entry by :math:`e^{-C/\\beta}` once per iteration, so the
    entries a plan does not use decay geometrically and can become denormal
    floats, whose arithmetic is several times slower on some CPUs (on the Xeon of
    ``benchmarks/bench_ela_transport.py`` the difference was within the noise). A plan sums to 1
    over at most ``N * M`` entries, so an entry at ``sqrt(tiny)`` of the dtype
    (about 1e-19 in float32, 1e-154 in float64) is far below the rounding of any
    entry that matters; zeroing it changes no digit of the result.
    """
    return math.sqrt(torch.finfo(dtype).tiny)


def _marginals(cost: torch.Tensor, source_mask, target_mask):
    """Uniform weights over real tokens (zero on padding), and the float masks."""
    b, n, m = cost.shape
    if source_mask is None:
        source_mask = torch.ones(b, n, dtype=torch.bool, device=cost.device)
    if target_mask is None:
        target_mask = torch.ones(b, m, dtype=torch.bool, device=cost.device)
    ms = source_mask.to(cost.dtype)
    mt = target_mask.to(cost.dtype)
    # clamp: a problem with no real token on a side gets zero marginals (an all-zero plan), not NaN.
    a = ms / ms.sum(1, keepdim=True).clamp_min(1.0)
    bb = mt / mt.sum(1, keepdim=True).clamp_min(1.0)
    return a, bb, ms, mt, source_mask, target_mask


def _ipot(
    cost, a, b, ms, mt, *, beta: float, n_iter: int, inner_iter: int, flush: bool = True
) -> torch.Tensor:
    """Batched IPOT (Xie et al. 2020, Algorithm 1) with padding masked out of the kernel.

    ``flush=False`` keeps would-be denormals (only to measure what flushing saves).
    """
    tiny = torch.finfo(cost.dtype).tiny
    threshold = flush_threshold(cost.dtype) if flush else 0.0
    pair = ms.unsqueeze(2) * mt.unsqueeze(1)
    # Padding rows and columns of the kernel are exact zeros, so they never gain mass; their
    # scalings are a / max(Q v, tiny) = 0 / tiny = 0 (a and b are zero there), never 0 / 0.
    kernel = torch.exp(-cost / beta) * pair
    plan = pair
    v = mt
    # Without autograd the iterations reuse their buffers (no graph needs the old values).
    inplace = not (torch.is_grad_enabled() and cost.requires_grad)
    for _ in range(n_iter):
        q = kernel * plan
        for _ in range(inner_iter):
            # Both products as (1, .) x (., .) batched rows: on CPU a (B, N, M) x (B, M, 1)
            # product runs a slow matrix-vector path (measured ~10x slower at 197 x 20).
            u = a / torch.bmm(v.unsqueeze(1), q.transpose(1, 2)).squeeze(1).clamp_min(tiny)
            v = b / torch.bmm(u.unsqueeze(1), q).squeeze(1).clamp_min(tiny)
        if inplace:
            plan = q.mul_(u.unsqueeze(2)).mul_(v.unsqueeze(1))
            # Flush would-be denormals to zero (see flush_threshold): they are slow on some CPUs.
            # (threshold_ is one fused pass; a compare + masked_fill was ~50x slower here.)
            torch.nn.functional.threshold_(plan, threshold, 0.0)  # type: ignore[attr-defined]
        else:
            plan = torch.nn.functional.threshold(
                u.unsqueeze(2) * q * v.unsqueeze(1), threshold, 0.0
            )
    return plan


def _log_sinkhorn(cost, a, b, ms, mt, *, reg: float, n_iter: int) -> torch.Tensor:
    """Batched entropic Sinkhorn in the log domain; padding excluded with -inf.

    Log-domain values reach ``C / reg`` (tens to hundreds): bfloat16 resolves them to about 0.5,
    which moved the marginals by tens of percent, so the iterations run in at least float32 and
    the plan comes back in the cost's dtype.
    """
    out_dtype = cost.dtype
    work = torch.promote_types(out_dtype, torch.float32)
    cost, a, b, ms, mt = (t.to(work) for t in (cost, a, b, ms, mt))
    neg = torch.finfo(cost.dtype).min
    pair = (ms.unsqueeze(2) * mt.unsqueeze(1)) > 0
    log_k = torch.where(pair, -cost / reg, torch.full_like(cost, neg))
    tiny = torch.finfo(cost.dtype).tiny
    log_a = torch.where(ms > 0, a.clamp_min(tiny).log(), torch.full_like(a, neg))
    log_b = torch.where(mt > 0, b.clamp_min(tiny).log(), torch.full_like(b, neg))
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for _ in range(n_iter):
        f = log_a - torch.logsumexp(log_k + g.unsqueeze(1), dim=2)
        g = log_b - torch.logsumexp(log_k + f.unsqueeze(2), dim=1)
    log_plan = f.unsqueeze(2) + log_k + g.unsqueeze(1)
    return torch.where(pair, log_plan.exp(), torch.zeros_like(cost)).to(out_dtype)


def _pot_per_problem(solve, cost, a, b, source_mask, target_mask) -> torch.Tensor:
    """Solve each problem with a POT function on its real rows and columns (a reference backend).

    POT solves in float64 (it goes through NumPy, which has no bfloat16); the plan comes back
    in the cost's dtype.
    """
    out = torch.zeros_like(cost)
    for k in range(cost.shape[0]):
        rows = source_mask[k].nonzero().flatten()
        cols = target_mask[k].nonzero().flatten()
        if rows.numel() == 0 or cols.numel() == 0:
            continue
        sub = cost[k].index_select(0, rows).index_select(1, cols).double()
        aa, bb = a[k, rows].double(), b[k, cols].double()
        aa, bb = aa / aa.sum(), bb / bb.sum()
        out[k, rows.unsqueeze(1), cols.unsqueeze(0)] = solve(aa, bb, sub).to(cost.dtype)
    return out


def _emd(cost, a, b, ms, mt, *, source_mask, target_mask, n_iter, **_):
    import ot

    with torch.no_grad():
        return _pot_per_problem(
            lambda aa, bb, c: ot.emd(aa, bb, c, numItermax=max(100_000, n_iter)),
            cost.detach(),
            a,
            b,
            source_mask,
            target_mask,
        )


def _pot_sinkhorn(cost, a, b, ms, mt, *, source_mask, target_mask, reg, n_iter, **_):
    import ot

    # stopThr=0: exactly n_iter iterations, as the torch solvers; POT then warns that it did not
    # "converge", which only restates that choice.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sinkhorn did not converge")
        return _pot_per_problem(
            lambda aa, bb, c: ot.sinkhorn(aa, bb, c, reg, numItermax=n_iter, stopThr=0.0),
            cost.detach(),
            a,
            b,
            source_mask,
            target_mask,
        )


def _run_ipot(cost, a, b, ms, mt, *, beta, n_iter, inner_iter, **_):
    return _ipot(cost, a, b, ms, mt, beta=beta, n_iter=n_iter, inner_iter=inner_iter)


def _run_sinkhorn(cost, a, b, ms, mt, *, reg, n_iter, **_):
    return _log_sinkhorn(cost, a, b, ms, mt, reg=reg, n_iter=n_iter)


#: The solvers of :func:`transport_plan`. ``"ipot"`` and ``"sinkhorn"`` are batched torch
#: programs (differentiable, on the inputs' device); ``"emd"`` and ``"pot_sinkhorn"`` call
#: POT once per problem on its real tokens (no gradient; a reference, not a hot path).
TRANSPORT_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "ipot": _run_ipot,
    "sinkhorn": _run_sinkhorn,
    "emd": _emd,
    "pot_sinkhorn": _pot_sinkhorn,
}


def _check_mask(mask, shape, name: str, fn: str, device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"{fn}: {name} must be a bool tensor (True = real token), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}"
        )
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{fn}: {name} is on {mask.device} but cost is on {device}")


def transport_plan(
    cost: torch.Tensor,
    source_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    *,
    method: str = "ipot",
    n_iter: int = 50,
    beta: float = 0.5,
    inner_iter: int = 1,
    reg: float = 0.05,
) -> torch.Tensor:
    r"""Optimal-transport plans between the real tokens of two padded sets, batched.

    For each problem, with :math:`a` uniform over the real source tokens and
    :math:`b` uniform over the real target tokens, the plan approximates

    .. math::

        T^\ast = \arg\min_{T \in \Pi(a, b)} \langle T, C \rangle
        \qquad \text{(ELA, Eq. 5)}

    The default solver is IPOT, the inexact proximal point method (Xie et al.
    2020, Algorithm 1): starting from :math:`T = \mathbf 1\mathbf 1^\top`,

    .. math::

        Q \leftarrow e^{-C/\beta} \odot T, \quad
        u \leftarrow a \oslash Q v, \quad v \leftarrow b \oslash Q^\top u, \quad
        T \leftarrow \operatorname{diag}(u)\, Q\, \operatorname{diag}(v),

    repeated ``n_iter`` times (``inner_iter`` scaling steps each). Unlike
    Sinkhorn it converges to the *exact* (unregularised) plan as iterations grow;
    :math:`\beta` sets the proximal step. Padded tokens carry no mass and
    receive none; a problem with no real token on a side gives an all-zero plan;
    nothing is NaN.

    Args:
        cost: ``(B, N, M)`` transport costs (ELA: the cosine distance of patch and
            word states, see :func:`cosine_cost`).
        source_mask: ``(B, N)`` bool, True for real source tokens; ``None``: all real.
        target_mask: ``(B, M)`` bool, True for real target tokens; ``None``: all real.
        method: ``"ipot"`` (default, batched torch), ``"sinkhorn"`` (batched
            log-domain entropic Sinkhorn with ``reg``), ``"emd"`` (POT's exact
            ``ot.emd``, per problem) or ``"pot_sinkhorn"`` (POT's ``ot.sinkhorn``,
            per problem). The POT backends give no gradient, and solve in float64
            (NumPy has no bfloat16); their plans come back in ``cost``'s dtype.
        n_iter: outer iterations (IPOT), Sinkhorn iterations, or the minimum
            iteration cap of ``ot.emd``.
        beta: IPOT's proximal step :math:`\beta > 0`.
        inner_iter: IPOT's scaling steps per iteration (the paper: 1).
        reg: entropic regularisation of the two Sinkhorn methods.

    Returns:
        ``(B, N, M)`` non-negative plans; row sums :math:`\approx a`, column sums
        :math:`\approx b`: exactly ``b`` after an IPOT or ``"sinkhorn"`` iteration; POT's
        ``"pot_sinkhorn"`` ends on the rows (row sums exactly ``a``); ``"emd"`` meets both.

    Shape:
        - cost: ``(B, N, M)``
        - source_mask: ``(B, N)``; target_mask: ``(B, M)``
        - output: ``(B, N, M)``

    References:
        Xie, Wang, Wang and Zha, "A Fast Proximal Point Method for Computing
        Exact Wasserstein Distance", UAI 2020, Algorithm 1;
        Yang et al., "Pre-training Cross-Modal Retrieval by Expansive
        Lexicon-Patch Alignment", LREC-COLING 2024, Eq. 5;
        Flamary et al., "POT: Python Optimal Transport", JMLR 2021.

    Example:
        >>> c = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
        >>> transport_plan(c, n_iter=20).round(decimals=3)
        tensor([[[0.5000, 0.0000],
                 [0.0000, 0.5000]]])
    """
    fn = "transport_plan"
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"{fn}: cost must be a (B, N, M) tensor, got {type(cost).__name__}")
    if cost.dim() != 3:
        raise ValueError(f"{fn}: cost must have shape (B, N, M), got {tuple(cost.shape)}")
    if not cost.is_floating_point():
        raise TypeError(f"{fn}: cost must be floating point, got {cost.dtype}")
    if method not in TRANSPORT_METHODS:
        raise ValueError(
            f"{fn}: method must be one of {sorted(TRANSPORT_METHODS)}, got {method!r}."
            + suggest(method, TRANSPORT_METHODS)
        )
    for name, value in (("n_iter", n_iter), ("inner_iter", inner_iter)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{fn}: {name} must be a positive integer, got {value!r}")
    for name, number in (("beta", beta), ("reg", reg)):
        if (
            isinstance(number, bool)
            or not isinstance(number, Real)
            or not 0 < float(number) < math.inf
        ):
            raise ValueError(f"{fn}: {name} must be a finite number > 0, got {number!r}")
    b, n, m = cost.shape
    _check_mask(source_mask, (b, n), "source_mask", fn, cost.device)
    _check_mask(target_mask, (b, m), "target_mask", fn, cost.device)
    a, bb, ms, mt, source_mask, target_mask = _marginals(cost, source_mask, target_mask)
    real = (ms.unsqueeze(2) * mt.unsqueeze(1)) > 0
    # Padding may hold anything (NaN included); it never enters the arithmetic.
    cost = torch.where(real, cost, torch.zeros_like(cost))
    return TRANSPORT_METHODS[method](
        cost,
        a,
        bb,
        ms,
        mt,
        beta=float(beta),
        n_iter=int(n_iter),
        inner_iter=int(inner_iter),
        reg=float(reg),
        source_mask=source_mask,
        target_mask=target_mask,
    )


def transport_cost(plan: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    r"""``(B,)`` transport cost :math:`\langle T, C \rangle` of each plan (padding ignored).

    Example:
        >>> transport_cost(torch.full((1, 2, 2), 0.25), torch.ones(1, 2, 2))
        tensor([1.])
    """
    return (plan * torch.where(plan > 0, cost, torch.zeros_like(cost))).sum((1, 2))


def cosine_cost(source: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""``(B, N, M)`` cosine distance :math:`1 - \cos(x_i, y_j)` between paired token sets.

    Args:
        source: ``(B, N, D)`` (ELA: patch states).
        target: ``(B, M, D)`` (ELA: word states), the same ``B`` (problem ``k`` pairs
            ``source[k]`` with ``target[k]``).

    Raises:
        ValueError: shapes that are not ``(B, N, D)`` and ``(B, M, D)``.
        TypeError: source and target of two different dtypes.

    Example:
        >>> cosine_cost(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
        tensor([[[0., 1.]]])
    """
    if (
        source.dim() != 3
        or target.dim() != 3
        or source.shape[0] != target.shape[0]
        or source.shape[2] != target.shape[2]
    ):
        raise ValueError(
            f"cosine_cost: expected source (B, N, D) and target (B, M, D), got {tuple(source.shape)} "
            f"and {tuple(target.shape)}"
        )
    if source.dtype != target.dtype:
        raise TypeError(
            f"cosine_cost: source is {source.dtype} but target is {target.dtype}; cast one to the other's dtype"
        )
    x = torch.nn.functional.normalize(source, dim=-1, eps=eps)
    y = torch.nn.functional.normalize(target, dim=-1, eps=eps)
    return 1.0 - torch.bmm(x, y.transpose(1, 2))
