"""chronicals-fx: find transformer ops by what they compute, run fused Triton kernels for them.

    import chronicals
    chronicals.optimize(model)                            # in place, any nn.Module
    torch.compile(model, backend="chronicals")            # by name, no import needed
    print(chronicals.explain(model, input_ids=ids))       # what matched, what declined, why
"""

from .api import explain, optimize, report_of
from .config import OP_NAMES, Config
from .report import Decline, Match, Report

__version__ = "0.1.0"
__all__ = ["optimize", "explain", "report_of", "Config", "Report", "Match", "Decline",
           "OP_NAMES", "__version__"]
