"""A plain PyTorch training loop, nothing chronicals-specific in it.

    python examples/train_plain.py --steps 20                 # as written
    chronicals run examples/train_plain.py --steps 20         # same script, models optimized
"""

import argparse
import time

import torch
import transformers

from chronicals_fx.workload import byte_batches  # the embedded corpus: Python's own sources


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = byte_batches(args.batch, args.seq, device=device)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        loss = model(**next(batches)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
