"""Networks and the image -> tensor -> feature pipeline.

Owns ``backbones`` (the backbone catalogue: ``registry``, offline ``weights``, ``hub`` models),
``classifier`` (``HistoClassifier``: backbone + head), ``transforms``, ``adapt`` (test-time
adaptation), ``pipeline`` (tiling and feature extraction) and ``feature_cache``.
May import: base modules, ``histolens.stats``, ``histolens.data``, ``histolens.stain``.
"""
