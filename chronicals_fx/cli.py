"""``chronicals demo | explain | bench | run`` — the command line.

    chronicals demo                 optimize and train a small model on the embedded corpus,
                                    eager vs optimized side by side (CPU works; GPU when present)
    chronicals explain tiny-llama   what the passes match and decline in a model
    chronicals bench ...            the end-to-end benchmark (see chronicals_fx.bench)
    chronicals run train.py ...     run an unmodified training script with its models optimized
"""

from __future__ import annotations

import argparse
import logging
import sys

from tabulate import tabulate


def _device(arg: str) -> str:
    import torch

    if arg == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return arg


def demo(args) -> int:
    import torch

    import chronicals
    from chronicals_fx.workload import MODEL_SPECS, build_model, byte_batches, train

    device = _device(args.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model_name = args.model or ("qwen2.5-0.5b" if device == "cuda" else "tiny-llama")
    batch, seq = (args.batch or (8 if device == "cuda" else 4)), (args.seq or (1024 if device == "cuda" else 128))
    print(f"chronicals demo: {model_name} ({MODEL_SPECS[model_name]['num_hidden_layers']} layers), "
          f"{device}, {str(dtype).replace('torch.', '')}, batch {batch}×{seq} tokens of Python's own "
          f"standard-library source, {args.steps} steps (first {args.warmup} untimed)\n")

    probe = build_model(model_name, dtype=dtype, device=device)
    print(chronicals.explain(probe, **next(byte_batches(batch, seq, device=device))))
    del probe

    runs = {}
    for variant in ("eager", "chronicals"):
        model = build_model(model_name, dtype=dtype, device=device)
        if variant == "chronicals":
            chronicals.optimize(model)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs[variant] = train(model, byte_batches(batch, seq, device=device), args.steps,
                              lr=args.lr, warmup_steps=args.warmup, progress=variant)
        del model

    eager = runs["eager"]
    rows = []
    for name, stats in runs.items():
        gap = max(abs(a - b) for a, b in zip(stats.losses, eager.losses))
        rows.append((name, f"{stats.tokens_per_s:,.0f}", f"{stats.median_step_ms:.1f}",
                     f"{stats.losses[0]:.3f} → {stats.losses[-1]:.3f}", f"{gap:.2e}",
                     f"{stats.min_grad_norm:.3f}",
                     f"{stats.peak_gib:.2f}" if device == "cuda" else "-",
                     "; ".join(stats.proof_of_training()) or "trained"))
    print()
    print(tabulate(rows, headers=("", "real tok/s", "step ms", "loss first → last",
                                  "max |Δloss| vs eager", "min grad norm", "peak GiB", "proof")))
    speedup = runs["chronicals"].tokens_per_s / eager.tokens_per_s
    print(f"\nchronicals vs eager: {speedup:.2f}× tokens/s (timed steps only; compilation happens "
          f"in the untimed first steps).")
    if device == "cpu":
        print("On a CPU the fused kernels are not used (their plain-torch references run): "
              "the demo shows the rewrite and the loss parity; speed is a GPU matter.")
    return 0 if not runs["chronicals"].proof_of_training() else 1


def explain(args) -> int:
    import torch

    import chronicals
    from chronicals_fx.workload import MODEL_SPECS, build_model, byte_batches

    device = _device(args.device)
    if args.model in MODEL_SPECS:
        model = build_model(args.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                            device=device, attn_implementation=args.attn)
    else:  # a Hugging Face config name or local path (a local path needs no network)
        import transformers

        config = transformers.AutoConfig.from_pretrained(args.model)
        config._attn_implementation = args.attn
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config)
    print(chronicals.explain(model, **next(byte_batches(1, args.seq, device=device))))
    return 0


def run(args) -> int:
    from chronicals_fx.runtime.launch import run_script

    options = {k: v for k, v in (("passes", args.passes), ("compiler", args.compiler)) if v}
    if "passes" in options:
        options["passes"] = tuple(options["passes"].split(","))
    run_script(args.script, args.script_args, **options)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="chronicals", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log the backend's reports")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="optimize and train a small model, eager vs optimized")
    p.add_argument("--model", help="model spec (default: qwen2.5-0.5b on GPU, tiny-llama on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--lr", type=float, default=1e-3)
    p.set_defaults(func=demo)

    p = sub.add_parser("explain", help="report what the passes find in a model")
    p.add_argument("model", help="a model spec (tiny-llama, qwen2.5-0.5b, llama-3-8b) or an HF config path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--attn", default="sdpa", help="attention implementation: sdpa or eager")
    p.set_defaults(func=explain)

    p = sub.add_parser("run", help="run a training script unmodified, its models optimized")
    p.add_argument("--passes", help="comma-separated passes to run "
                                    "(default: chronicals.DEFAULT_PASSES, all of them)")
    p.add_argument("--compiler", help="inductor (default), aot_eager or eager")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)

    p = sub.add_parser("bench", help="end-to-end training benchmark (GPU)", add_help=False)
    p.set_defaults(func=None)

    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    if args.command == "bench":
        from chronicals_fx.bench import main as bench_main

        return bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
