"""A Hugging Face Trainer script, nothing chronicals-specific in it.

    python examples/train_hf_trainer.py                       # eager, as written
    python examples/train_hf_trainer.py --compile             # TrainingArguments(torch_compile=True)
    chronicals run examples/train_hf_trainer.py               # same script, model optimized
    python examples/train_hf_trainer.py --size qwen0.5b       # GPU: Qwen2.5-0.5B shape, bf16, 8×1024

Any other ``TrainingArguments`` flag passes through (``--max_steps 20``, ``--torch_compile_backend
chronicals`` after ``import chronicals`` or under ``chronicals run``, ...). Prints each step's loss
and grad norm, then one ``CHRONICALS_EXAMPLE {json}`` line with the real-token throughput of the
steps after ``--warmup`` (see benchmarks/examples.py).
"""

import torch
import transformers

# the embedded corpus (Python's own sources), model shapes and the result line
from chronicals_fx.workload import (
    EXAMPLE_SIZES,
    ExampleMeter,
    build_model,
    corpus_bytes,
    example_parser,
    example_trainer_callback,
)


def main():
    p = example_parser(compile_help="TrainingArguments(torch_compile=True)",
                       epilog="other flags: transformers.TrainingArguments")
    args, hf_flags = p.parse_known_args()
    spec, dtype, batch, seq, steps, warmup = EXAMPLE_SIZES[args.size]
    seq = args.seq or seq
    defaults = ["--output_dir", "/tmp/chronicals-example-hf", "--per_device_train_batch_size",
                str(args.batch or batch), "--max_steps", str(args.steps or steps),
                "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
                "--max_grad_norm", "1.0", "--logging_steps", "1", "--report_to", "none",
                "--save_strategy", "no", "--include_num_input_tokens_seen", "true",
                "--dataloader_drop_last", "true", "--disable_tqdm", "true", "--seed", "0"]
    if args.compile:
        defaults.append("--torch_compile")
    (training_args,) = transformers.HfArgumentParser(transformers.TrainingArguments) \
        .parse_args_into_dataclasses(defaults + hf_flags)

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the Trainer would move it there
    model = build_model(spec, dtype=dtype, device=device, seed=0)  # random init, no download
    data = corpus_bytes(4 << 20)  # bytes are the tokens: ids 0–255, no padding
    rows = [list(data[i:i + seq]) for i in range(0, len(data) - seq, seq)][:4096]
    dataset = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows]

    meter = ExampleMeter(warmup=args.warmup if args.warmup is not None else warmup)
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=dataset,
                                   callbacks=[example_trainer_callback(meter)])
    result = trainer.train()
    print(f"train_loss {result.training_loss:.4f}")
    meter.finish(script="train_hf_trainer", size=args.size, compile=training_args.torch_compile,
                 compile_backend=training_args.torch_compile_backend)


if __name__ == "__main__":
    main()
