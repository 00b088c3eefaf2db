"""Per-op forward+backward microbenchmark: eager, Inductor, Liger (when importable), chronicals.

    python -m benchmarks.ops [--ops rmsnorm swiglu ...] [--json results.json]

Each op's cases live in ``benchmarks/op_cases/<op>.py`` as ``cases(device, dtype)``. The copy
bandwidth and bf16 matmul rate are measured first, in the same run, as the ceilings.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import pkgutil
import sys

import torch
from tabulate import tabulate

import chronicals_fx.kernels  # noqa: F401  (registers torch.ops.chronicals.*)
from benchmarks import op_cases
from benchmarks.harness import copy_bandwidth_gbps, matmul_tflops, measure_case


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="*", help="ops to run (default: every op_cases module)")
    parser.add_argument("--variants", nargs="*", help="variants to run besides eager")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks need a CUDA device", file=sys.stderr)
        return 2

    copy_gbps = copy_bandwidth_gbps()
    mm = matmul_tflops()
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  copy {copy_gbps:.0f} GB/s"
          f"  bf16 matmul {mm:.0f} TFLOP/s", flush=True)
    names = args.ops or [m.name for m in pkgutil.iter_modules(op_cases.__path__)]
    results = []
    for name in names:
        module = importlib.import_module(f"benchmarks.op_cases.{name}")
        for case in module.cases("cuda", torch.bfloat16):
            rows = measure_case(case, copy_gbps, args.variants)
            results += rows
            base = {r.variant: r.ms for r in rows}
            print(f"\n## {case.op} {case.shape}")
            print(tabulate([(r.variant, f"{r.ms:.3f}", f"{r.gbps:.0f}", f"{r.pct_copy:.0f}%",
                             f"{r.tflops:.0f}" if r.tflops else "", f"{r.extra_mib:.0f}",
                             f"{r.max_rel_err:.1e}",
                             f"{base.get('inductor', float('nan')) / r.ms:.2f}x", r.note)
                            for r in rows],
                           headers=("variant", "ms", "GB/s", "% copy", "TFLOP/s", "extra MiB",
                                    "max rel err", "vs inductor", "note")), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "copy_gbps": copy_gbps, "matmul_tflops": mm,
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
