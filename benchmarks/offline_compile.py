"""Compile a Triton or Gluon kernel launch for an NVIDIA target without a GPU or a driver.

What the launch ``kernel[grid](*args, **kwargs)`` would run (its specialization on these
arguments: CPU tensors do), compiled for ``cuda:arch`` (90: sm_90a) by the Triton installed.
Used by the Gluon sweeps (registers, spills, SASS) and by tests/kernels/compiled_ptx.py (the
roundings a kernel keeps). It reaches into Triton's launch path (the binder, ``_pack_args``):
checked with Triton 3.6 and 3.9.
"""

from __future__ import annotations


def compile_offline(kernel, args, kwargs, arch: int = 90):
    """The CompiledKernel (``asm["ptx"]``, ``asm["cubin"]``, ``metadata.shared``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, _ = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, None)
    source = GluonASTSource if isinstance(kernel, GluonJITFunction) else ASTSource
    return triton_compile(source(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)
