"""Elo ratings of policy snapshots from human A/B comparisons (Bai et al. 2022 report models as Elo).

Each cycle's human evaluation is a match between its candidate and the
deployed policy: wins, ties and losses as labelers judged them. The ratings
are the Bradley-Terry fit of all matches so far, P(i beats j) = 1 / (1 +
10^((r_j - r_i) / 400)), a tie counted as half a win for each side, on the
Elo scale with one policy (the anchor, usually P0) at 0. A Gaussian prior of
``prior_sd`` Elo on every rating keeps an unbeaten policy's rating finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ELO_PER_NAT = 400 / math.log(10)
"""Elo points per unit of log-odds"""


@dataclass(frozen=True)
class Match:
    """The human verdicts of one A/B evaluation between two policies."""

    a: int
    """one policy's id (the candidate)"""
    b: int
    """the other's (the deployed policy)"""
    wins_a: int
    ties: int
    wins_b: int


def fit_elo(
    matches: Sequence[Match], *, anchor: int | None = None, prior_sd: float | None = 400.0, iterations: int = 200
) -> dict[int, float]:
    """Ratings of every policy in ``matches``, the anchor (default: the lowest id) at 0.

    Maximises the Bradley-Terry log-likelihood (plus the Gaussian prior) by
    Newton steps on each rating in turn; with ``prior_sd=None`` it is the
    plain maximum-likelihood fit (two policies, 3 wins to 1: 400 log10 3).
    """
    players = sorted({m.a for m in matches} | {m.b for m in matches})
    if not players:
        return {}
    anchor = players[0] if anchor is None else anchor
    if anchor not in players:
        raise ValueError(f"anchor {anchor} played no match")
    theta = {p: 0.0 for p in players}
    precision = 0.0 if prior_sd is None else (ELO_PER_NAT / prior_sd) ** 2  # the prior in log-odds units
    # scores[i][j]: what i scored against j (a tie is half a win), games[i][j]: games between them
    scores: dict[int, dict[int, float]] = {p: {} for p in players}
    games: dict[int, dict[int, float]] = {p: {} for p in players}
    for m in matches:
        n = m.wins_a + m.ties + m.wins_b
        for i, j, s in ((m.a, m.b, m.wins_a + 0.5 * m.ties), (m.b, m.a, m.wins_b + 0.5 * m.ties)):
            scores[i][j] = scores[i].get(j, 0.0) + s
            games[i][j] = games[i].get(j, 0.0) + n
    for _ in range(iterations):
        moved = 0.0
        for i in players:
            if i == anchor and precision == 0.0:
                continue  # without a prior the scale's origin is free: hold the anchor
            gradient, curvature = -precision * theta[i], precision
            for j, n in games[i].items():
                p = 1.0 / (1.0 + math.exp(theta[j] - theta[i]))
                gradient += scores[i][j] - n * p
                curvature += n * p * (1 - p)
            if curvature > 0:
                step = gradient / curvature
                theta[i] += step
                moved = max(moved, abs(step))
        if moved < 1e-10:
            break
    origin = theta[anchor]
    return {p: (theta[p] - origin) * ELO_PER_NAT for p in players}
