"""A TRL ``SFTTrainer`` script with packing, nothing chronicals-specific in it.

    python examples/train_trl_sft.py                          # eager, as written
    python examples/train_trl_sft.py --compile                # SFTConfig(torch_compile=True)
    chronicals run examples/train_trl_sft.py                  # same script, model optimized
    python examples/train_trl_sft.py --size qwen0.5b          # GPU: Qwen2.5-0.5B shape, bf16, 8×1024

The documents are the functions, methods and classes of Python's own standard-library sources
(no download), tokenized by a byte-level tokenizer built here (no download either): token id =
byte value. ``packing=True`` with best-fit-decreasing packing (``bfd_split``: a document longer
than a row is split, not truncated) fills rows of ``max_length`` tokens and trains padding-free:
each batch is one row of all its documents, ``position_ids`` restarting at every document so
that none attends to another, padded to ``batch × max_length`` tokens so that every step has the
same shape (``--pad_to_multiple_of none`` lets it vary: torch.compile then recompiles with
dynamic shapes). TRL computes the loss itself (its chunked log-prob LM head), not the model.

Any other ``SFTConfig`` flag passes through. Prints each step's loss and grad norm, then one
``CHRONICALS_EXAMPLE {json}`` line with the real-token throughput of the steps after ``--warmup``
(see benchmarks/examples.py). Needs ``pip install trl`` (the ``examples`` extra).
"""

import re

import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from trl import SFTConfig, SFTTrainer

# the embedded corpus (Python's own sources), model shapes and the result line
from chronicals_fx.workload import (
    EXAMPLE_SIZES,
    ExampleMeter,
    build_model,
    corpus_bytes,
    example_parser,
    example_trainer_callback,
)


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE without merges: ids 0–255 are the bytes, then end-of-text and padding."""
    # GPT-2's printable stand-ins for the 256 byte values, which the ByteLevel pre-tokenizer emits
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    stand_in = {b: chr(b) if b in printable else None for b in range(256)}
    extra = 0
    for b in range(256):
        if stand_in[b] is None:
            stand_in[b] = chr(256 + extra)
            extra += 1
    vocab = {stand_in[b]: b for b in range(256)}
    vocab.update({"<|endoftext|>": 256, "<pad>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<pad>")


def documents(n_bytes: int) -> list[str]:
    """Functions, methods and classes of the standard library, one document each."""
    text = corpus_bytes(n_bytes).decode("utf-8", errors="ignore")
    docs = re.split(r"\n(?=(?:    )?(?:def|class|async def) )", text)
    return [d.strip() for d in docs if len(d.strip()) >= 16]


def main():
    p = example_parser(compile_help="SFTConfig(torch_compile=True)",
                       epilog="other flags: trl.SFTConfig")
    args, trl_flags = p.parse_known_args()
    spec, dtype, batch, seq, steps, warmup = EXAMPLE_SIZES[args.size]
    batch, seq, steps = args.batch or batch, args.seq or seq, args.steps or steps
    defaults = ["--output_dir", "/tmp/chronicals-example-trl", "--per_device_train_batch_size",
                str(batch), "--max_steps", str(steps), "--max_length", str(seq),
                "--packing", "true", "--packing_strategy", "bfd_split", "--learning_rate", "1e-3",
                "--lr_scheduler_type", "constant", "--bf16", "false",  # bf16 weights instead
                "--gradient_checkpointing", "false",  # TRL turns it on; a 0.5B model fits
                "--max_grad_norm", "1.0", "--logging_steps", "1", "--report_to", "none",
                "--save_strategy", "no", "--dataloader_drop_last", "true",
                "--disable_tqdm", "true", "--seed", "0",
                # every batch one row of batch × max_length tokens: one shape, one compilation
                "--pad_to_multiple_of", str(batch * seq)]
    if args.compile:
        defaults.append("--torch_compile")
    (config,) = transformers.HfArgumentParser(SFTConfig).parse_args_into_dataclasses(
        defaults + trl_flags)
    config.include_num_input_tokens_seen = "non_padding"  # real tokens: padding-free batches

    tokenizer = byte_tokenizer()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the Trainer would move it there
    model = build_model(spec, dtype=dtype, device=device, seed=0)  # random init, no download
    # more text than the run needs (one byte is one token); packing drops none of it
    dataset = Dataset.from_dict({"text": documents(2 * batch * seq * steps + (1 << 16))})

    meter = ExampleMeter(warmup=args.warmup if args.warmup is not None else warmup)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[example_trainer_callback(meter)])
    result = trainer.train()
    print(f"train_loss {result.training_loss:.4f}")
    meter.finish(script="train_trl_sft", size=args.size, compile=config.torch_compile,
                 compile_backend=config.torch_compile_backend, packing=config.packing,
                 padding_free=trainer.padding_free)


if __name__ == "__main__":
    main()
