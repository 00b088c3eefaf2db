"""LoRA+ convergence demonstration: the same LoRA run with ratio 16 (LoRA+) and ratio 1 (plain
LoRA), same model, data, steps and base learning rate. Runs on CPU or GPU.

    python -m benchmarks.loraplus_convergence [--steps 60] [--lr 2e-4]
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from chronicals_fx.runtime import create_loraplus_optimizer
from chronicals_fx.workload import build_model, byte_batches, train


def run(ratio: float, args) -> list[float]:
    from peft import LoraConfig, get_peft_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.model, device=device, seed=0)
    # a "pretrained" starting point: a few full steps, then freeze and adapt with LoRA
    train(model, byte_batches(args.batch, args.seq, device=device), 10, lr=1e-3, warmup_steps=0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             lora_dropout=0.0))
    torch.manual_seed(1)
    opt = create_loraplus_optimizer(model, lr=args.lr, ratio=ratio)
    batches = byte_batches(args.batch, args.seq, device=device)
    for _ in range(10):  # both runs adapt on the same batches, after the same pretraining
        next(batches)
    stats = train(model, batches, args.steps, warmup_steps=0, optimizer=opt)
    assert not stats.proof_of_training(), stats.proof_of_training()
    return stats.losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args(argv)
    curves = {ratio: run(ratio, args) for ratio in (1.0, 16.0)}
    marks = sorted({0, 9, 19, 39, args.steps - 1} & set(range(args.steps)))
    print(tabulate([(f"ratio {r:g}", *(f"{c[i]:.3f}" for i in marks)) for r, c in curves.items()],
                   headers=("", *(f"step {i + 1}" for i in marks))))
    tail = {r: sum(c[-10:]) / 10 for r, c in curves.items()}
    print(f"mean loss, last 10 steps: ratio 1 {tail[1.0]:.3f}, ratio 16 {tail[16.0]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
