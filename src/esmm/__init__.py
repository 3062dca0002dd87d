"""esmm: entire-space multi-task conversion modelling (ESMM and its family) in PyTorch."""

__version__ = "0.2.0"
