"""histolens: breast-cancer histopathology classification, evaluation and explanation."""

from histolens.errors import HistolensError

__version__ = "0.1.0"
__all__ = ["HistolensError", "__version__"]
