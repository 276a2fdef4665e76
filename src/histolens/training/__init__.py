"""Training a model: the linear probe, Lightning fine-tuning, cross-validation.

Owns ``runner`` (``train``: dispatching a ``RunConfig``), ``data`` (the training records and
image bank), ``probe*`` (the frozen-feature probe), ``lightning_*`` (fine-tuning), ``crossval``,
``mixing`` (MixUp/CutMix) and ``distributed``. May import: everything below it
(base .. evaluation, report).
"""
