"""Built-in handlers, one module per operator family. Importing registers them."""

from . import activations, conv, dropout, linear, norms, pooling

__all__ = ["activations", "conv", "dropout", "linear", "norms", "pooling"]
