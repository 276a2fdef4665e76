"""Pure numerics: classification metrics, temperature calibration, conformal prediction.

Owns ``metrics`` (AUC, balanced accuracy, bootstrap intervals), ``calibration`` (temperature
scaling), ``conformal`` (split-conformal sets and referral rules), ``conformal_metrics`` and
``stored`` (reading a versioned part back from checkpoint metadata).
May import: ``histolens.errors`` only (numpy/scikit-learn outside). No torch, no files.
"""
