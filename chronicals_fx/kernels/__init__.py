"""Kernels: one module per op. Importing a module registers its ``torch.ops.chronicals`` ops."""

from . import linear_ce, rmsnorm, swiglu  # noqa: F401
