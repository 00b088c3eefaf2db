"""Kernels: one module per op. Importing a module registers its ``torch.ops.chronicals`` ops."""

from . import attention, linear_ce, rmsnorm, rope, swiglu  # noqa: F401
