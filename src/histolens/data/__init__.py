"""Images and records on disk: layouts, manifests, splits, audit and synthetic data.

Owns ``records`` (``ImageRecord``, dataset layouts and discovery), ``imageio`` / ``imagefiles``
(reading images and listing image files), ``splits`` (patient-level splits and ``split.csv``),
``summary``, ``audit`` (dataset-shortcut audit) and ``synth`` (synthetic H&E-like data).
May import: ``histolens.errors``, ``histolens.atomic``, ``histolens.config``, ``histolens.stats``.
The user's data is only read.
"""
