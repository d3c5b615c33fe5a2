"""Built-in handlers and recipes, one module per operator family. Importing registers them."""

from . import activations, conv, dropout, elementwise, linear, norms, pooling

__all__ = ["activations", "conv", "dropout", "elementwise", "linear", "norms", "pooling"]
