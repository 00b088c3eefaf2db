"""Where a training step's GPU time goes: one variant, a few profiled steps, kernels grouped.

    python -m benchmarks.profile_step [--variant chronicals] [--batch 8 --seq 1024] [--top 25]

Same model, data and optimizer as `python -m chronicals_fx.bench` (variants `compile` and
`chronicals[:passes]`). After the warm-up steps (compilation, autotuning), `--steps` steps run
under torch.profiler; the table lists the CUDA kernels with the most time per step, and a
summary by kind (GEMM, attention, chronicals' Triton kernels, Inductor's, optimizer, other)
against the step's wall time: the gap between the two is time the GPU sat idle.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict

import torch

KINDS = (  # first match wins; patterns on the kernel name
    ("gemm", re.compile(r"gemm|cutlass|sm90_xmma|nvjet|cublas|splitK", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|cudnn", re.I)),
    ("chronicals", re.compile(r"^(rms|swiglu|rope|lce|scale_inplace|_?doc|geglu)", re.I)),
    ("inductor", re.compile(r"^triton_", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="chronicals")
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", help="also write a Chrome trace here")
    args = p.parse_args(argv)

    import chronicals
    from chronicals_fx.workload import build_model, byte_batches

    model = build_model(args.model, dtype=torch.bfloat16, device="cuda")
    if args.variant == "compile":
        model.compile()
    elif args.variant.startswith("chronicals"):
        options = {}
        if ":" in args.variant:
            options["passes"] = tuple(args.variant.split(":", 1)[1].split(","))
        chronicals.optimize(model, **options)
    elif args.variant != "eager":
        raise SystemExit(f"unknown variant {args.variant!r}")
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, fused=True)
    batches = byte_batches(args.batch, args.seq, device="cuda")

    def step():
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000 / args.steps
    if args.trace:
        prof.export_chrome_trace(args.trace)

    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[event.name]
            entry[0] += event.device_time / 1000 / args.steps      # µs → ms per step
            entry[1] += 1 / args.steps
    by_kind: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        by_kind[kind_of(name)] += ms
    busy = sum(by_kind.values())

    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  {args.variant}  "
          f"{args.model} B={args.batch} T={args.seq}: step {wall_ms:.1f} ms wall, "
          f"{busy:.1f} ms of kernels (GPU idle ≈ {max(0.0, wall_ms - busy):.1f} ms)")
    print(f"{'kind':<12} {'ms/step':>8} {'share':>6}")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<12} {ms:8.2f} {100 * ms / busy:5.1f}%")
    print(f"\n{'ms/step':>8} {'calls':>6}  kernel (top {args.top})")
    for name, (ms, calls) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{ms:8.3f} {calls:6.0f}  [{kind_of(name)}] {name[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
