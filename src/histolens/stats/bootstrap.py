"""Bootstrap CIs over patients for the evaluation's own statistics, all resamples at once.

:func:`histolens.stats.metrics.bootstrap_ci` calls a statistic on the row indices of each of
``n_boot`` resamples of the patients: a thousand index arrays and a thousand calls per figure, a
dozen figures per evaluation. A resample is no more than how many times it drew each patient, and
the evaluation's figures (proportions, ROC AUC, the patient recognition rate and patient AUC) are
sums over patients weighted by those counts. :class:`PatientBootstrap` draws the same resamples
from the same seed and computes each figure for all of them together.

Same draws, same CIs, to the bit: every figure is computed from the same exact integer (or
half-integer) sums as the per-resample code and divided once in the same order, and the two
figures that are float sums of probabilities (the patient recognition rate's mean, the patient
AUC's mean probabilities) are summed in the per-resample code's order (``tests/test_bootstrap.py``
compares every figure with :func:`bootstrap_ci` on seeded examples).
"""

from __future__ import annotations

import numpy as np

from histolens.stats.metrics import percentile_interval, resample_key, safe_auc

__all__ = ["PatientBootstrap"]


# The resample counts of recent (patients, n_boot, seed): an evaluation's pooled and
# per-magnification blocks and its estimate bootstrap the same patients with the same seed.
_COUNTS: dict[tuple, np.ndarray] = {}


def _draw_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) draws of each of ``n`` patients, one resample at a time from ``seed``."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, n), dtype=np.int64)
    for b in range(n_boot):
        # rng.choice(uniq, n) draws exactly these indices: the same resamples, one at a time.
        counts[b] = np.bincount(rng.choice(n, size=n, replace=True), minlength=n)
    counts.flags.writeable = False  # shared by every PatientBootstrap of these patients
    return counts


class PatientBootstrap:
    """The ``n_boot`` patient resamples :func:`~histolens.stats.metrics.bootstrap_ci` draws from
    ``seed``, held as counts (resample x patient), and the CIs of the evaluation's figures."""

    def __init__(
        self, patients: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
    ) -> None:
        self.n_boot, self.alpha = n_boot, alpha
        patients = np.asarray(patients)
        uniq, self.inverse = np.unique(patients, return_inverse=True)
        key = resample_key(patients, n_boot, seed)
        counts = _COUNTS.get(key) if key is not None else None
        if counts is None:
            counts = _draw_counts(len(uniq), n_boot, seed)
            if key is not None:
                if len(_COUNTS) >= 16:  # a few evaluations' worth
                    _COUNTS.clear()
                _COUNTS[key] = counts
        self.counts = counts

    def _per_patient(self, flags: np.ndarray) -> np.ndarray:
        """How many rows of each patient ``flags`` marks (int64)."""
        marked = self.inverse[np.asarray(flags, bool)]
        return np.bincount(marked, minlength=self.counts.shape[1])

    def interval(self, values: np.ndarray) -> tuple[float, float]:
        """The percentile CI of one figure's resample values, as bootstrap_ci takes it."""
        return percentile_interval(values, self.n_boot, self.alpha)

    def interval_of(self, flags: np.ndarray) -> tuple[float, float]:
        """The CI of the fraction of rows ``flags`` marks (a referral rate, an accuracy)."""
        return self.interval(self.proportion(flags))

    def proportion(self, hits: np.ndarray, among: np.ndarray | None = None) -> np.ndarray:
        """Per resample, the fraction of its rows (of those ``among`` marks) that ``hits`` marks;
        NaN where it has no such rows. As ``hits[i][among[i]].mean()``: both sums are exact."""
        among = np.ones(len(self.inverse), bool) if among is None else np.asarray(among, bool)
        num = self.counts @ self._per_patient(np.asarray(hits, bool) & among)
        den = self.counts @ self._per_patient(among)
        out = np.full(self.n_boot, np.nan)
        np.divide(num.astype(np.float64), den.astype(np.float64), out=out, where=den > 0)
        return out

    def roc_auc(self, y: np.ndarray, score: np.ndarray) -> np.ndarray:
        """Per resample, ``safe_auc`` of its rows: the Mann-Whitney count of (positive,
        negative) pairs ranked right (ties a half), each pair weighted by how often the
        resample drew its two patients, over the exact product of the class counts."""
        y = np.asarray(y).astype(bool)
        score = np.asarray(score, float)
        n = self.counts.shape[1]
        pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
        # pairs[q1, q2]: (positive of q1, negative of q2) pairs ranked right, ties a half: a
        # sum of halves, exact in float64.
        pairs = np.zeros((n, n))
        for q in np.unique(self.inverse[neg]):
            theirs = np.sort(score[neg][self.inverse[neg] == q])
            below = np.searchsorted(theirs, score[pos], "left")
            tied = np.searchsorted(theirs, score[pos], "right") - below
            pairs[:, q] = np.bincount(self.inverse[pos], below + 0.5 * tied, minlength=n)
        c = self.counts.astype(np.float64)
        u = np.einsum("bi,ij,bj->b", c, pairs, c)
        n_pos = c @ self._per_patient(y).astype(np.float64)
        n_neg = c @ self._per_patient(~y).astype(np.float64)
        out = np.full(self.n_boot, np.nan)
        np.divide(u, n_pos * n_neg, out=out, where=(n_pos > 0) & (n_neg > 0))
        return out

    def recognition_rate(self, correct: np.ndarray) -> np.ndarray:
        """Per resample, the mean over the patients it drew (each once) of the fraction of the
        patient's images ``correct`` marks: ``patient_recognition_rate`` of its rows."""
        n_rows = self._per_patient(np.ones(len(self.inverse), bool))
        fraction = self._per_patient(correct) / n_rows  # (c k) / (c n) rounds as k / n
        return np.array([fraction[row > 0].mean() for row in self.counts])

    def patient_auc(self, y: np.ndarray, score: np.ndarray) -> np.ndarray:
        """Per resample, ``patient_level_auc`` of its rows: each patient drawn c times scored by
        the mean of its scores repeated c times, summed in the order np.bincount sums them."""
        score = np.asarray(score, float)
        y = np.asarray(y, float)
        n = self.counts.shape[1]
        rows = [np.flatnonzero(self.inverse == q) for q in range(n)]
        n_rows = np.array([len(r) for r in rows])
        top = int(self.counts.max(initial=0))
        # sums[q, c - 1]: patient q's scores repeated c times, added one after another.
        sums = np.zeros((n, max(top, 1)))
        label = np.zeros(n)
        for q, r in enumerate(rows):
            sums[q] = np.cumsum(np.tile(score[r], max(top, 1)))[len(r) - 1 :: len(r)]
            label[q] = y[r].sum() / len(r)  # an exact sum: (c k) / (c n) rounds as k / n
        out = np.empty(self.n_boot)
        for b, row in enumerate(self.counts):
            drawn = np.flatnonzero(row)
            c = row[drawn]
            mean = sums[drawn, c - 1] / (c * n_rows[drawn])
            out[b] = safe_auc(np.round(label[drawn]), mean)
        return out
