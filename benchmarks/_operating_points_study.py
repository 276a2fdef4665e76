"""The operating points of issue 26 on the protocol: what each fold's shipped decision does on
its held-out groups, per magnification and per patient, against the estimate ``train`` prints.

Used by ``generalisation.py`` for the default configuration (``--operating-points-all``: every
configuration): each fold's model decides its held-out groups' images (every magnification) at
the thresholds its checkpoint stores (chosen on the fold's own training groups' out-of-fold
predictions), under the default rule (Youden per magnification) and under ``sensitivity:0.95``
and ``specificity:0.95`` (chosen again from the same stored predictions, as ``histolens
calibrate`` does). Held-out figures pool the repeats; their 95% CIs resample patient
groups (a group's images in every repeat move together). The estimate is that of one ``train``
of the default on all groups (5-fold patient-level cross-validation), as a user would see it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RULES = ("youden", "sensitivity:0.95", "specificity:0.95")
REFERENCE = 200  # the magnification the scored one's logit gap is measured from
SCORED = 100  # the magnification whose thresholds' noise the report shows


@dataclass
class HeldOut:
    """Held-out images of all folds and repeats: group, magnification, label, calibrated p,
    referral, and per rule the image threshold and the patient decision (per group and repeat)."""

    group: list[str] = field(default_factory=list)
    repeat: list[int] = field(default_factory=list)
    mag: list[int] = field(default_factory=list)
    y: list[int] = field(default_factory=list)
    p: list[float] = field(default_factory=list)
    refer: list[bool] = field(default_factory=list)
    thr: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in RULES})
    patient_thr: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in RULES})
    patient_limit: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in RULES})
    estimate: dict = field(default_factory=dict)  # of train on all groups (cross-validated)
    # Per fold, the scored magnification's youden threshold: its value, its training patients
    # (benign, malignant) and its sd in logit, chosen each way, when those are bootstrapped.
    fold_thr: list[tuple[float, tuple[int, int], dict[str, float]]] = field(default_factory=list)
    # Per fold, the scored magnification's mean logit minus REFERENCE's, per class (benign,
    # malignant), over the fold's training patients' out-of-fold predictions: whether
    # magnification moves both classes alike (what the shared choice assumes).
    fold_gap: list[tuple[float, float]] = field(default_factory=list)

    def add_fold(self, run_dir: Path, test_recs, positive: str, repeat: int) -> None:
        """The fold's held-out rows from its predictions.csv and its checkpoint's decision."""
        from histolens.checkpoint.io import read_metadata
        from histolens.inference.predictions_csv import parse_flag

        ops = read_metadata(run_dir).decision
        by_rule = {r: (ops if r == "youden" else ops.refit(r)) for r in RULES}
        scored = str(SCORED)
        if scored in ops.thresholds:
            noise = _threshold_noise(ops, scored)
            self.fold_thr.append((ops.thresholds[scored], ops.patients[scored], noise))
        if ops.has_predictions:
            gap = _class_gaps(ops, scored, str(REFERENCE))
            if gap is not None:
                self.fold_gap.append(gap)
        by_path = {r.path: r for r in test_recs}
        with open(run_dir / "predictions.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                rec = by_path[row["path"]]
                self.group.append(rec.group)
                self.repeat.append(repeat)
                self.mag.append(int(rec.magnification))
                self.y.append(int(rec.label == positive))
                self.p.append(float(row[f"p_{positive}"]))
                self.refer.append(parse_flag(row["refer"]))
                for r, o in by_rule.items():
                    self.thr[r].append(o.threshold_for(rec.magnification))
                    self.patient_thr[r].append(o.patient.threshold)
                    self.patient_limit[r].append(o.patient.disagreement_limit)


def _threshold_noise(ops, stratum: str, n_boot: int = 200, seed: int = 0) -> dict[str, float]:
    """The sd (in logit) of ``stratum``'s youden threshold, chosen each way (``separate`` and
    ``shared``), when the fold's training patients are drawn again with replacement within each
    class (a patient drawn twice counts as two); draws leaving ``stratum`` without a threshold
    of its own are skipped for both ways alike."""
    from scipy.special import logit

    from histolens.stats.decisions import OperatingPoints
    from histolens.stats.operating_points import MAGNIFICATION_THRESHOLDS

    p, y, codes = ops.p, ops.y, ops.patient_codes
    strata = np.asarray(ops.strata, dtype=object)
    patients = np.unique(codes)
    label = {q: int(y[codes == q][0]) for q in patients}
    by_class = [np.array([q for q in patients if label[q] == c]) for c in (0, 1)]
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {m: [] for m in MAGNIFICATION_THRESHOLDS}
    for _ in range(n_boot):
        draw = np.concatenate([rng.choice(c, len(c)) for c in by_class])
        rows = [np.flatnonzero(codes == q) for q in draw]
        idx = np.concatenate(rows)
        who = np.concatenate([np.full(len(i), k) for k, i in enumerate(rows)])
        chosen = {
            m: OperatingPoints.fit(
                "youden", y[idx], p[idx], who, strata[idx], keep_predictions=False, method=m
            ).thresholds.get(stratum)
            for m in out
        }
        if any(t is None for t in chosen.values()):
            continue
        for m, t in chosen.items():
            out[m].append(float(logit(np.clip(t, 1e-6, 1 - 1e-6))))
    return {m: float(np.std(v)) for m, v in out.items()}


def _class_gaps(ops, stratum: str, reference: str) -> tuple[float, float] | None:
    """Per class, the mean over patients of each patient's mean logit at ``stratum`` minus the
    same at ``reference`` (None when a class is missing at either)."""
    from scipy.special import logit

    z = logit(np.clip(ops.p, 1e-6, 1 - 1e-6))
    strata = np.asarray(ops.strata, dtype=object)
    out = []
    for c in (0, 1):
        level = []
        for s in (stratum, reference):
            at = (strata == s) & (ops.y == c)
            pats = np.unique(ops.patient_codes[at])
            if not len(pats):
                return None
            level.append(np.mean([z[at & (ops.patient_codes == q)].mean() for q in pats]))
        out.append(float(level[0] - level[1]))
    return out[0], out[1]


def _window(p: np.ndarray, y: np.ndarray, target: float = 0.75) -> str:
    """The thresholds at which the held-out images reach ``target`` sensitivity and specificity
    both: a diagnosis of how precisely a threshold must land (never used to set one)."""
    from scipy.special import logit

    grid = np.linspace(0.005, 0.995, 991)
    ok = [t for t in grid if (p[y == 1] >= t).mean() >= target and (p[y == 0] < t).mean() >= target]
    if not ok:
        return f"no single threshold gives both rates >= {target} on these held-out images"
    width = logit(max(ok)) - logit(min(ok))
    return (
        f"thresholds giving both rates >= {target} on these held-out images (diagnosis only): "
        f"{min(ok):.3f}-{max(ok):.3f}, {width:.2f} wide in logit"
    )


def _ci(stat, clusters: np.ndarray, n_boot: int = 1000, seed: int = 0) -> str:
    from histolens.stats.metrics import bootstrap_ci

    value = stat(np.arange(len(clusters)))
    lo, hi = bootstrap_ci(stat, clusters, n_boot, seed)
    return f"{value:.3f} [{lo:.2f}-{hi:.2f}]"


def _rate(called: np.ndarray, y: np.ndarray, cls: int):
    def stat(i: np.ndarray) -> float:
        of = y[i] == cls
        return float((called[i][of] == bool(cls)).mean()) if of.any() else np.nan

    return stat


def _per_repeat(called: np.ndarray, y: np.ndarray, at: np.ndarray, repeat: np.ndarray) -> str:
    """Sensitivity and specificity of each repeat at ``at``, with their sd: the spread a change
    must beat."""
    sens, spec = [], []
    for r in np.unique(repeat[at]):
        i = np.flatnonzero(at & (repeat == r))
        sens.append(_rate(called, y, 1)(i))
        spec.append(_rate(called, y, 0)(i))
    cells = "  ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(sens, spec, strict=True))
    return f"{cells}  (sd {np.std(sens):.3f} / {np.std(spec):.3f})"


def _patients(h: HeldOut, at: np.ndarray, rule: str):
    """Per (repeat, group) at the images ``at``: label, decision, image accuracy (recognition)."""
    from histolens.stats.conformal import centred_probabilities

    p, y = np.array(h.p)[at], np.array(h.y)[at]
    thr = np.array(h.thr[rule])[at]
    centred = centred_probabilities(np.stack([1 - p, p], 1), thr)[:, 1]
    keys = np.array(
        [f"{r}|{g}" for r, g in zip(np.array(h.repeat)[at], np.array(h.group)[at], strict=True)]
    )
    pt = np.array(h.patient_thr[rule])[at]
    out = {"group": [], "y": [], "called": [], "accuracy": []}
    for k in np.unique(keys):
        i = keys == k
        out["group"].append(k.split("|", 1)[1])
        out["y"].append(int(y[i].mean() >= 0.5))
        out["called"].append(bool(centred[i].mean() >= pt[i][0]))
        out["accuracy"].append(float(((p[i] >= thr[i]) == y[i].astype(bool)).mean()))
    return {k: np.array(v) for k, v in out.items()}


def report(h: HeldOut, estimate: dict, scored: int = 100) -> list[str]:
    """The tables of issue 26's closing note, as lines."""
    lines: list[str] = []
    if not h.p:
        return ["No held-out predictions were collected for the operating-point study."]
    mag, y, p = np.array(h.mag), np.array(h.y), np.array(h.p)
    groups, refer = np.array(h.group), np.array(h.refer)
    at = mag == scored
    lines.append(
        f"Operating points on held-out {scored}X images ({at.sum()} image predictions over repeats):"
    )
    lines.append(
        "  rule               sensitivity [95% CI]  specificity [95% CI]  referred (alpha 0.1)"
        "  per repeat: sens / spec (sd)"
    )
    repeat = np.array(h.repeat)
    for rule in RULES:
        called = p >= np.array(h.thr[rule])
        sens = _ci(_rate(called[at], y[at], 1), groups[at])
        spec = _ci(_rate(called[at], y[at], 0), groups[at])
        ref = f"{refer[at].mean():.0%}" if rule == "youden" else "-"
        lines.append(
            f"  {rule:<18} {sens:<21} {spec:<21} {ref:<21} {_per_repeat(called, y, at, repeat)}"
        )
    if h.fold_thr:
        thr, counts, noise = zip(*h.fold_thr, strict=True)
        benign, malignant = zip(*counts, strict=True)
        lines.append(
            f"  {scored}X youden threshold of the {len(thr)} folds: {min(thr):.2f}-{max(thr):.2f}"
            f" (median {np.median(thr):.2f}), chosen on {min(benign)}-{max(benign)} benign and "
            f"{min(malignant)}-{max(malignant)} malignant training patient groups"
        )
        for way in noise[0]:
            sd = np.array([n[way] for n in noise])
            lines.append(
                f"    its sd in logit when the fold's training patients are bootstrapped, chosen "
                f"{way}: {sd.min():.2f}-{sd.max():.2f} (median {np.median(sd):.2f})"
            )
        if h.fold_gap:
            gaps = np.array(h.fold_gap)
            lines.append(
                f"    {scored}X minus {REFERENCE}X mean logit of the folds' training patients "
                f"(out-of-fold): benign {gaps[:, 0].min():+.2f} to {gaps[:, 0].max():+.2f} "
                f"(median {np.median(gaps[:, 0]):+.2f}), malignant {gaps[:, 1].min():+.2f} to "
                f"{gaps[:, 1].max():+.2f} (median {np.median(gaps[:, 1]):+.2f})"
            )
        shared = np.array([n["shared"] for n in noise])
        separate = np.array([n["separate"] for n in noise])
        lines.append(
            f"    shared below separate in {(shared < separate).sum()} of {len(noise)} folds"
        )
    lines.append(f"  {_window(p[at], y[at])}")
    lines.append("")
    lines.append(
        "Per magnification, default rule: held-out (pooled over repeats) vs the estimate train printed"
    )
    lines.append(
        "  mag   held-out sens         held-out spec         estimate sens [CI]     inside?  patients (b/m)"
    )
    called = p >= np.array(h.thr["youden"])
    for m in sorted(set(h.mag)):
        i = mag == m
        block = (estimate.get("per_magnification") or {}).get(f"{m}X", {})
        est = block.get("metrics", {}).get("sensitivity")
        ci = block.get("ci95", {}).get("sensitivity")
        held_sens = _rate(called[i], y[i], 1)(np.arange(i.sum()))
        inside = "n/a" if not ci else ("yes" if ci[0] <= held_sens <= ci[1] else "NO")
        est_text = f"{est:.3f} [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else "n/a"
        ppc = block.get("patients_per_class", {})
        lines.append(
            f"  {m}X{'':<{4 - len(str(m))}} {_ci(_rate(called[i], y[i], 1), groups[i]):<21} "
            f"{_ci(_rate(called[i], y[i], 0), groups[i]):<21} {est_text:<22} {inside:<8} "
            f"{ppc.get('benign', 0)}/{ppc.get('malignant', 0)}"
        )
    lines.append("")
    lines.append(
        f"Patient-level decisions from held-out {scored}X images (patient = group, per repeat):"
    )
    lines.append(
        "  rule               patient recognition   patient sensitivity   patient specificity"
        "   | image sens [95% CI]   image spec [95% CI]"
    )
    for rule in RULES:
        d = _patients(h, at, rule)
        called_img = p >= np.array(h.thr[rule])
        rec = _ci(lambda i, a=d["accuracy"]: float(a[i].mean()), d["group"])
        psens = _ci(_rate(d["called"], d["y"], 1), d["group"])
        pspec = _ci(_rate(d["called"], d["y"], 0), d["group"])
        isens = _ci(_rate(called_img[at], y[at], 1), groups[at])
        ispec = _ci(_rate(called_img[at], y[at], 0), groups[at])
        lines.append(f"  {rule:<18} {rec:<21} {psens:<21} {pspec:<21} | {isens:<21} {ispec}")
    return lines
