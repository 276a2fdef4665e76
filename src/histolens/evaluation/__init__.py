"""Measuring a model: metrics on held-out data, the headline estimate, referral, plots.

Owns ``evaluate`` (evaluating a checkpoint and finalising a run), ``metrics`` (metrics of
predictions), ``records`` (which records are evaluated), ``referral`` (conformal referral),
``estimate`` (the headline estimate: cross-validated or held-out), ``performance`` (how it is
quoted) and ``plots``. May import: everything below it (base .. inference).
"""
