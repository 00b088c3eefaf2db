"""Training-loop helpers that sit outside the compiled graph: LoRA+ optimizer groups and packing."""

from chronicals_fx.runtime.loraplus import (
    create_loraplus_optimizer,
    loraplus_param_groups,
    loraplus_summary,
)
from chronicals_fx.runtime.packing import PackedDataset, PackingCollator, pack_bfd, packed_batches

__all__ = [
    "PackedDataset",
    "PackingCollator",
    "create_loraplus_optimizer",
    "loraplus_param_groups",
    "loraplus_summary",
    "pack_bfd",
    "packed_batches",
]
