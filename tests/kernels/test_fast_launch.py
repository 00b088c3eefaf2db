"""kernels._triton.fast_launch on the CPU: when it goes through Triton's JIT and when it reuses
the compiled kernel, with which arguments. The JIT and the compiled kernel's launcher are
stand-ins that record their calls (launching needs a GPU; the GPU tests of the fused loss and
the Gluon GEMMs run through it for real)."""

import pytest
import torch
import triton
import triton.language as tl

from chronicals_fx.kernels import _triton


def _kernel_source(X, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = True):
    pass


# a JIT function even under TRITON_INTERPRET=1 (which the suite sets: @triton.jit would give an
# interpreted one, which fast_launch leaves to the interpreter)
_kernel = triton.runtime.JITFunction(_kernel_source)


class _Compiled:
    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *values: self.launches.append((grid, values))


@pytest.fixture
def jit(monkeypatch):
    """The JIT's calls (args, kwargs, grid), each returning a new stand-in compiled kernel."""
    calls = []

    def run(*args, grid, warmup, **kwargs):
        calls.append((args, kwargs, grid))
        return _Compiled()

    monkeypatch.setattr(_kernel, "run", run)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_triton, "_COMPILED", {})
    monkeypatch.setattr(_triton, "FAST_LAUNCH", True)
    return calls


def test_second_call_launches_the_compiled_kernel_with_every_parameter(jit):
    x = torch.zeros(64, dtype=torch.bfloat16)
    compiled = _triton.fast_launch(_kernel)[(4,)](x, 64, 0.5, BLOCK=16, num_warps=4)
    assert len(jit) == 1 and jit[0][2] == (4,)
    again = _triton.fast_launch(_kernel)[(8, 2)](x, 64, 0.5, BLOCK=16, num_warps=4)
    assert again is compiled and len(jit) == 1
    # the grid padded to three dimensions; constexprs and defaults in parameter order; launch
    # options (num_warps) are the compiled kernel's own, not parameters
    assert compiled.launches == [((8, 2, 1), (x, 64, 0.5, 16, True))]


@pytest.mark.parametrize("change", ["alignment", "int", "dtype", "constexpr", "option", "float"])
def test_anything_triton_specializes_on_compiles_again(jit, change):
    x = torch.zeros(64, dtype=torch.bfloat16)
    args, kwargs = [x, 64, 0.5], dict(BLOCK=16, num_warps=4)
    _triton.fast_launch(_kernel)[(1,)](*args, **kwargs)
    if change == "alignment":
        args[0] = x[1:]                       # 2 bytes past a 16-byte boundary
    elif change == "int":
        args[1] = 65
    elif change == "dtype":
        args[0] = x.float()
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    elif change == "option":
        kwargs["num_warps"] = 8
    else:
        args[2] = 0.25                        # exact values: a constexpr float would differ
    _triton.fast_launch(_kernel)[(1,)](*args, **kwargs)
    assert len(jit) == 2


def test_interpreted_kernels_are_left_to_the_interpreter(monkeypatch):
    interpreted = triton.runtime.interpreter.InterpretedFunction(_kernel_source)
    calls = []
    monkeypatch.setattr(interpreted, "run", lambda *a, grid, warmup, **k: calls.append(grid))
    monkeypatch.setattr(_triton, "_COMPILED", {})
    monkeypatch.setattr(_triton, "FAST_LAUNCH", True)
    for _ in range(2):
        _triton.fast_launch(interpreted)[(3,)](torch.zeros(4), 4, 0.5, BLOCK=4)
    assert calls == [(3,), (3,)] and not _triton._COMPILED


def test_unkeyable_arguments_and_the_switch_take_the_jit(jit, monkeypatch):
    x = torch.zeros(64)
    for _ in range(2):
        _triton.fast_launch(_kernel)[(1,)](x, 64, [0.5], BLOCK=16)      # a list: no key
    assert len(jit) == 2
    monkeypatch.setattr(_triton, "FAST_LAUNCH", False)
    for _ in range(2):
        _triton.fast_launch(_kernel)[(1,)](x, 64, 0.5, BLOCK=16)
    assert len(jit) == 4 and not _triton._COMPILED


def test_descriptor_key_holds_geometry_tile_and_layout():
    class Descriptor:     # the attributes Triton's host TMA descriptors have
        def __init__(self, base, block, layout="a"):
            self.base, self.shape, self.strides = base, list(base.shape), list(base.stride())
            self.block_shape, self.layout, self.padding = block, layout, "zero"

    t = torch.zeros(128, 64, dtype=torch.bfloat16)
    key = _triton._arg_key(Descriptor(t, [64, 64]))
    assert key == _triton._arg_key(Descriptor(t.clone(), [64, 64]))      # another buffer
    assert key != _triton._arg_key(Descriptor(t, [32, 64]))
    assert key != _triton._arg_key(Descriptor(t, [64, 64], layout="b"))
    assert key != _triton._arg_key(Descriptor(t[:64], [64, 64]))


def test_a_callers_key_stands_for_the_arguments(jit):
    """With the caller's key, the arguments are not keyed: the same key launches the compiled
    kernel with this call's values (in parameter order); another key compiles again."""
    x = torch.zeros(64, dtype=torch.bfloat16)
    compiled = _triton.fast_launch(_kernel, key=("a", 64))[(4,)](x, 64, 0.5, BLOCK=16)
    y = torch.ones(64, dtype=torch.bfloat16)
    again = _triton.fast_launch(_kernel, key=("a", 64))[(2,)](y, 64, 0.25, BLOCK=16)
    assert again is compiled and len(jit) == 1
    assert compiled.launches == [((2, 1, 1), (y, 64, 0.25, 16, True))]
    _triton.fast_launch(_kernel, key=("a", 128))[(4,)](x, 128, 0.5, BLOCK=16)
    assert len(jit) == 2
