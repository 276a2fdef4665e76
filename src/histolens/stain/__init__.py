"""Stain normalisation and augmentation of H&E images.

Owns ``normalize`` (``StainNormalizer``: Reinhard, Macenko), ``augment`` (HED jitter),
``math`` (colour-space and optical-density arithmetic shared by both) and ``reference``
(choosing a reference image). May import: base modules, ``histolens.stats``, ``histolens.data``.
"""
