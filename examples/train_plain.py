"""A plain PyTorch training loop, nothing chronicals-specific in it.

    python examples/train_plain.py                            # eager, as written
    python examples/train_plain.py --compile                  # torch.compile(model): Inductor
    chronicals run examples/train_plain.py                    # same script, model optimized
    python examples/train_plain.py --size qwen0.5b            # GPU: Qwen2.5-0.5B shape, bf16, 8×1024

Prints each step's loss and grad norm, then one ``CHRONICALS_EXAMPLE {json}`` line with the
real-token throughput of the steps after ``--warmup`` (see benchmarks/examples.py).
"""

import torch

# the embedded corpus (Python's own sources), model shapes and the result line
from chronicals_fx.workload import (
    EXAMPLE_SIZES,
    ExampleMeter,
    build_model,
    byte_batches,
    example_parser,
)


def main():
    p = example_parser(compile_help="torch.compile(model)")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    spec, dtype, batch, seq, steps, warmup = EXAMPLE_SIZES[args.size]
    steps, warmup = args.steps or steps, args.warmup if args.warmup is not None else warmup
    device = "cuda" if torch.cuda.is_available() else "cpu"

    model = build_model(spec, dtype=dtype, device=device, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device == "cuda")
    if args.compile:
        model = torch.compile(model)
    batches = byte_batches(args.batch or batch, args.seq or seq, device=device)
    meter = ExampleMeter(warmup=warmup)
    model.train()
    for _ in range(steps):
        inputs = next(batches)
        loss = model(**inputs).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.step_done(int((inputs["labels"] != -100).sum()))
        meter.log(loss.item(), grad_norm.item())
    meter.finish(script="train_plain", size=args.size, compile=args.compile)


if __name__ == "__main__":
    main()
