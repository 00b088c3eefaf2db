"""chronicals-fx: find transformer ops by what they compute, run fused Triton kernels for them.

    import chronicals
    chronicals.optimize(model)                            # in place, any nn.Module
    torch.compile(model, backend="chronicals")            # by name, no import needed
    print(chronicals.explain(model, input_ids=ids))       # what matched, what declined, why
"""

from .api import explain, optimize, report_of
from .config import DEFAULT_PASSES, OP_NAMES, Config
from .report import Decline, Match, Report
from .runtime.hf import register_with_accelerate as _register_with_accelerate

# `TrainingArguments(torch_compile=True, torch_compile_backend="chronicals")` passes accelerate's
# check of backend names once chronicals is imported (chronicals_fx/runtime/hf.py says how).
_register_with_accelerate()

__version__ = "0.1.0"
__all__ = ["optimize", "explain", "report_of", "Config", "Report", "Match", "Decline",
           "OP_NAMES", "DEFAULT_PASSES", "__version__"]
