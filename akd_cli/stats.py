"""Statistics over seeds: what a multi-seed comparison reports (scipy.stats, numpy).

Per configuration: n, mean, sample sd and the 95% confidence interval of the mean (Student's t
with n - 1 degrees of freedom). Against a baseline: the paired difference by seed (same data,
same initialisation; only the method differs), its mean, sd and 95% interval, the paired t-test's
two-sided p-value, and the sign count (how many seeds the configuration won). With n = 1 there is
no spread: sd and interval are None, and no test is made. With all differences equal (sd 0) the
interval is the point and the t-test is undefined: p is None, said as such, not 0 or 1.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

CONFIDENCE = 0.95
SAME = 1e-12  # relative: values this close are the same value


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: Optional[float]
    ci: Optional[Tuple[float, float]]

    def as_dict(self) -> Dict:
        return asdict(self)


@dataclass(frozen=True)
class Paired:
    n: int
    mean: float              # mean of (configuration - baseline), paired by seed
    sd: Optional[float]
    ci: Optional[Tuple[float, float]]
    p: Optional[float]       # paired t-test, two-sided
    wins: int                # seeds where the configuration is above the baseline
    losses: int

    def as_dict(self) -> Dict:
        return asdict(self)


def summarise(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    from scipy import stats

    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarise")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(n, mean, None, None)
    if max(values) - min(values) <= SAME * max(1.0, max(abs(v) for v in values)):
        # equal up to rounding (0.3 - 0.2 and 0.4 - 0.3 differ in the last bit): no spread at all
        return Summary(n, mean, 0.0, (mean, mean))
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(n, mean, sd, (mean - half, mean + half))


def paired(values: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE) -> Paired:
    """The configuration against the baseline, seed by seed (both in the same seed order)."""
    from scipy import stats

    if len(values) != len(baseline):
        raise ValueError("paired samples need one value per seed on both sides")
    diffs = [float(a) - float(b) for a, b in zip(values, baseline)]
    summary = summarise(diffs, confidence)
    p = None
    if summary.n > 1 and summary.sd:
        p = float(stats.ttest_rel(values, baseline).pvalue)
    return Paired(n=summary.n, mean=summary.mean, sd=summary.sd, ci=summary.ci, p=p,
                  wins=sum(d > 0 for d in diffs), losses=sum(d < 0 for d in diffs))


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Optional[Tuple[float, float]]:
    """A distribution-free interval of the median: the order statistics x_(k) and x_(n-k+1) (from 1)
    with the largest k whose coverage, 1 - 2 P(B <= k - 1) for B ~ Binomial(n, 1/2), is at least
    ``confidence``. For timings, whose spread is skewed by the odd slow step, where a t interval of
    the mean would be pulled by that step. None when n is too small for any (n < 6 at 95%)."""
    from scipy import stats

    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    k = 0
    while k + 1 <= n - k and 2 * float(stats.binom.cdf(k, n, 0.5)) <= 1 - confidence:
        k += 1
    return None if k == 0 else (ordered[k - 1], ordered[n - k])


def format_mean_sd(summary: Summary, scale: float = 100.0, digits: int = 1) -> str:
    """"41.2 ± 0.3 (n=5)"; one seed: "41.2 (n=1)"."""
    mean = f"{summary.mean * scale:.{digits}f}"
    spread = f" ± {summary.sd * scale:.{digits}f}" if summary.sd is not None else ""
    return f"{mean}{spread} (n={summary.n})"


def format_ci(ci: Optional[Tuple[float, float]], scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return "-" if ci is None else f"[{ci[0] * scale:{sign}.{digits}f}, {ci[1] * scale:{sign}.{digits}f}]"


def format_p(p: Optional[float]) -> str:
    return "-" if p is None else (f"{p:.3f}" if p >= 0.001 else "<0.001")
