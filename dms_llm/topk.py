"""The differentiable top-k operator of DMS (DESIGN.md §1).

One operator answers "how many of these N units to keep" for R rows at once (e.g. the MLP channels of every
layer). Each row has its own importance vector; the pruning ratio ``a`` is either one per row or shared by all
rows (the ``--uniform`` search, where every layer must keep the same count).

    rank'_i = #{j : c_i > c_j} / N             (ties broken by index: the lower index ranks higher)
    m_i     = sigmoid(lam * (rank'_i - a))     (soft mask; lam = N for widths, 4N for heads and depth)
    k       = round((1 - a) * N)               (hard count: the k units of highest importance are kept)
    c_i    <- 0.99 c_i + 0.01 (m_i g_i)^2      (Taylor importance, g_i = dL_task/dm_i)
"""

from __future__ import annotations

import torch
from torch import nn


def integer_ranks(importance: torch.Tensor) -> torch.Tensor:
    """Rank of every unit within its row, 0 (least important) .. N-1 (most important), all distinct.

    Ties are broken deterministically: among equal importances the unit with the lower index ranks higher
    (is kept first)."""
    n = importance.shape[-1]
    # a stable descending sort keeps lower indices first among ties -> they get the higher rank
    order = torch.sort(importance, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(n - 1, -1, -1, device=importance.device).expand_as(order).contiguous()
    return torch.empty_like(order).scatter_(-1, order, positions)


def normalized_ranks(importance: torch.Tensor) -> torch.Tensor:
    """c'_i = #{j : c_i > c_j} / N with deterministic tie-breaking, in [0, 1)."""
    return integer_ranks(importance).to(importance.dtype) / importance.shape[-1]


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5)


class DifferentiableTopK(nn.Module):
    """Soft top-k masks over ``num_units`` units for ``rows`` rows, driven by learnable pruning ratios.

    Args:
        num_units: N, the number of units per row.
        rows: how many independent choices (e.g. one per layer).
        shared_ratio: one ``a`` for all rows (uniform widths) instead of one per row.
        temperature_scale: lam = temperature_scale * N (1 for channels, 4 for heads and depth).
        min_units: at least this many units stay in every row (``a`` is clamped to 1 - min_units/N).
        momentum: the moving-average factor of the importance update (0.99 in the paper).
    """

    def __init__(
        self,
        num_units: int,
        rows: int = 1,
        shared_ratio: bool = False,
        temperature_scale: float = 1.0,
        min_units: int = 1,
        momentum: float = 0.99,
    ):
        super().__init__()
        if num_units < 1 or rows < 1:
            raise ValueError(f"a top-k operator needs at least one unit and one row, got N={num_units}, rows={rows}")
        if not 0 <= min_units <= num_units:
            raise ValueError(f"min_units must be in [0, {num_units}], got {min_units}")
        self.num_units = num_units
        self.rows = rows
        self.shared_ratio = shared_ratio
        self.lam = temperature_scale * num_units
        self.min_units = min_units
        self.momentum = momentum
        self.ratio = nn.Parameter(torch.zeros(1 if shared_ratio else rows))
        self.register_buffer("importance", torch.zeros(rows, num_units))

    @property
    def max_ratio(self) -> float:
        return 1.0 - self.min_units / self.num_units

    def ratios(self) -> torch.Tensor:
        """The pruning ratio of every row, shape (rows,)."""
        return self.ratio.expand(self.rows)

    def soft_mask(self) -> torch.Tensor:
        """Differentiable masks in (0, 1), shape (rows, N)."""
        ranks = normalized_ranks(self.importance).to(self.ratio.dtype)
        return torch.sigmoid(self.lam * (ranks - self.ratios()[:, None]))

    def kept_counts(self) -> torch.Tensor:
        """Hard number of kept units per row: round((1 - a) N), shape (rows,), int64."""
        counts = round_half_up((1.0 - self.ratios().detach().double()) * self.num_units).long()
        return counts.clamp(self.min_units, self.num_units)

    def hard_mask(self, counts: torch.Tensor | None = None) -> torch.Tensor:
        """0/1 masks keeping the ``counts`` (default: :meth:`kept_counts`) most important units per row."""
        counts = self.kept_counts() if counts is None else counts.to(self.importance.device)
        ranks = integer_ranks(self.importance)  # N-1 = most important
        return (ranks >= (self.num_units - counts)[:, None]).to(self.ratio.dtype)

    def kept_indices(self, counts: torch.Tensor | None = None) -> list[list[int]]:
        """Sorted indices of the kept units of every row."""
        mask = self.hard_mask(counts)
        return [torch.nonzero(row).flatten().tolist() for row in mask]

    @torch.no_grad()
    def update_importance(self, mask: torch.Tensor, grad: torch.Tensor) -> None:
        """Taylor importance moving average: c <- momentum c + (1 - momentum) (m g)^2."""
        score = (mask.detach().float() * grad.detach().float()).pow(2)
        self.importance.mul_(self.momentum).add_(score, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def set_importance(self, importance: torch.Tensor) -> None:
        """Start the moving average from a warm-up estimate."""
        self.importance.copy_(importance)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep ``a`` in [0, 1 - min_units / N]."""
        self.ratio.clamp_(0.0, self.max_ratio)

    def extra_repr(self) -> str:
        return (
            f"num_units={self.num_units}, rows={self.rows}, shared_ratio={self.shared_ratio}, lam={self.lam:g}, "
            f"min_units={self.min_units}"
        )


__all__ = ["DifferentiableTopK", "normalized_ranks", "integer_ranks"]
