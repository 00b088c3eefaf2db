"""A Hugging Face Trainer script, nothing chronicals-specific in it.

    python examples/train_hf_trainer.py --max_steps 20
    chronicals run examples/train_hf_trainer.py --max_steps 20
"""

import sys

import torch
import transformers
from datasets import Dataset

from chronicals_fx.workload import corpus_bytes


def main():
    parser = transformers.HfArgumentParser(transformers.TrainingArguments)
    defaults = ["--output_dir", "/tmp/chronicals-example", "--per_device_train_batch_size", "4",
                "--learning_rate", "1e-3", "--logging_steps", "5", "--report_to", "none",
                "--save_strategy", "no", "--max_steps", "20"]
    (args,) = parser.parse_args_into_dataclasses(defaults + sys.argv[1:])
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, use_cache=False)
    model = transformers.LlamaForCausalLM(config)
    data = corpus_bytes(1 << 20)
    rows = [list(data[i:i + 128]) for i in range(0, len(data) - 128, 128)][:2048]
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    result = trainer.train()
    print(f"train_loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
