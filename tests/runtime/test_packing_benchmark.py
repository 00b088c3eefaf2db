"""benchmarks/packing.py's data side: both layouts train on the same documents, each under the
label convention it claims (the GPU run itself is `python -m benchmarks.packing`)."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import numpy as np

from benchmarks.packing import (
    IGNORE,
    _spans,
    document_pieces,
    packed_dataset,
    padded_batches,
    stdlib_documents,
)

T, ROWS = 128, 3


def _pieces():
    return document_pieces(T, stdlib_documents()[:25])


def test_documents_are_top_level_blocks_with_their_decorators():
    docs = stdlib_documents()
    assert len(docs) > 1000
    for doc in docs[:300]:
        if doc.startswith(b"@"):
            body = doc.split(b"\n")
            first = next(line for line in body if not line.startswith(b"@"))
            assert first.startswith((b"def ", b"class ", b"async def ")), doc[:200]


def test_padded_and_packed_layouts_hold_the_same_documents():
    pieces = _pieces()
    assert max(map(len, pieces)) == T and min(map(len, pieces)) >= 2

    def key(tokens):
        return tuple(tokens.tolist())

    want = Counter(key(p) for p in pieces)

    padded = Counter()
    for batch in islice(padded_batches(pieces, ROWS, T), len(pieces) // ROWS):
        mask = batch["attention_mask"].bool()
        assert batch["num_real_tokens"] == int(mask.sum())
        assert (batch["labels"][~mask] == IGNORE).all()
        assert (batch["labels"][mask] == batch["input_ids"][mask]).all()
        for ids, m in zip(batch["input_ids"], mask):
            n = int(m.sum())
            assert m[:n].all()                      # right padding
            padded[key(ids[:n].numpy())] += 1
    assert sum((want - padded).values()) == len(pieces) % ROWS and not padded - want

    packed = Counter()
    dataset = packed_dataset(pieces, ROWS, T)
    dataset.drop_last = False
    for batch in dataset:
        for ids, labels, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
            spans = _spans(pos, labels)
            for s, e in spans:
                assert labels[s] == IGNORE and (labels[s + 1:e] == ids[s + 1:e]).all()
                assert (pos[s:e] == np.arange(e - s)).all()
                packed[key(ids[s:e].numpy())] += 1
            tail = spans[-1][1] if spans else 0
            assert (labels[tail:] == IGNORE).all()
    assert packed == want
