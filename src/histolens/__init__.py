"""histolens: breast-cancer histopathology classification, evaluation and explanation."""

from histolens import moved
from histolens.errors import HistolensError

moved.install()  # the flat layout's module paths still import, with a DeprecationWarning

__version__ = "0.1.0"
__all__ = ["HistolensError", "__version__"]
