"""Kernels: one module per op. Importing a module registers its ``torch.ops.chronicals`` ops."""

from . import rmsnorm, swiglu  # noqa: F401
