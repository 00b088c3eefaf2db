"""Sequence packing: best-fit-decreasing bins, packed batches, and a Trainer collator.

Padding a batch of variable-length documents to its longest one wastes the padded positions;
packing concatenates several documents into each row of ``capacity`` tokens instead. A packed row
must not let one document learn from another, so every batch here follows one convention:

* ``labels`` is ``input_ids`` with ``-100`` at the first token of every document and on padding.
  HF causal-LM losses shift labels left: the logits at position ``p - 1`` are scored against
  ``labels[p]``. At a document start ``s`` that logit comes from the previous document's last
  token, so ``labels[s] = -100`` removes exactly the cross-document prediction (an unpacked
  document never predicts its first token either).
* ``position_ids`` restart at 0 for every document. The unused tail of a row is padding
  (``pad_token_id``) and forms its own segment with positions ``0, 1, ...``. A new segment starts
  exactly where ``position_ids == 0``, which is how HF's flash-attention path and its mask builders
  (no ``attention_mask``, packed ``position_ids``) find document boundaries.
* ``cu_seq_lens`` (int32) are the cumulative segment lengths over the flattened ``[B * T]`` batch,
  from 0 to ``B * T``, counting every padding tail as a segment, i.e. the positions where
  ``position_ids.flatten() == 0`` followed by ``B * T``. ``max_length`` is the longest segment
  (padding tails included): the ``cu_seqlens`` / ``max_seqlen`` pair of varlen attention kernels.

The attention must honour those boundaries: with a plain causal mask, tokens of a packed row
attend to earlier documents of the same row.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_LONG_DOCUMENTS = ("truncate", "split")
_STREAM_WINDOW = 16384


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def pack_bfd(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Pack items into bins of ``capacity`` by best-fit decreasing.

    Items are taken longest first (equal lengths by index); each goes into the bin whose remaining
    capacity is the smallest that still fits it (ties: the lowest bin id), or opens a new bin.
    BFD shares FFD's worst-case ratio 11/9: Johnson (1974) shows ``BFD <= 11/9 * OPT + 4``; for
    FFD the additive term is tightened to 6/9 (Dosa 2007). On realistic length distributions both
    come within a fraction of a percent of the lower bound ``ceil(sum / capacity)``.

    Cost: remaining capacities are integers in ``1..capacity``, so bins are kept in buckets by
    remaining capacity — a min-heap of bin ids per value — plus a sorted list of the non-empty
    values. A placement is one ``bisect`` (``O(log C)``) and one or two heap operations
    (``O(log n)``); adding or removing a value shifts that list, which holds at most
    ``min(C, bins)`` entries, by one C-level memmove. With the ``O(n log n)`` sort this packs
    1M lognormal lengths (mean 6, sigma 1, clipped to [1, 4096]) into 4096-token bins in
    1.5-2 s on one core of the development machine (AMD EPYC, CPython 3.11), 0.004% above the
    lower bound; a 64-ary bitset tree with a strict ``O(log C)`` bound ran twice as slow.

    Args:
        lengths: positive integer lengths, each ``<= capacity``.
        capacity: bin size.

    Returns:
        Bins in the order they were opened, each a list of indices into ``lengths`` in placement
        order (non-increasing length). Every index appears exactly once.

    Raises:
        ValueError: a length outside ``1..capacity``, non-integer lengths, or ``capacity < 1``.
    """
    capacity = _check_positive_int("capacity", capacity)
    sizes = np.asarray(lengths)
    if sizes.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {sizes.shape}")
    if sizes.size == 0:
        return []
    if not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(f"lengths must be integers, got dtype {sizes.dtype}")
    sizes = sizes.astype(np.int64, copy=False)
    low, high = int(sizes.argmin()), int(sizes.argmax())
    if sizes[low] < 1:
        raise ValueError(
            f"lengths must be >= 1 (drop empty items first): lengths[{low}] = {sizes[low]}"
        )
    if sizes[high] > capacity:
        raise ValueError(
            f"lengths[{high}] = {sizes[high]} exceeds capacity {capacity}; "
            "truncate or split it first"
        )

    order = np.argsort(-sizes, kind="stable")
    bins: list[list[int]] = []
    buckets: list[list[int] | None] = [None] * (capacity + 1)  # remaining -> heap of bin ids
    open_values: list[int] = []  # sorted remaining capacities with a non-empty bucket
    for index, size in zip(order.tolist(), sizes[order].tolist()):
        slot = bisect.bisect_left(open_values, size)
        if slot == len(open_values):
            bin_id = len(bins)
            bins.append([index])
            rest = capacity - size
        else:
            remaining = open_values[slot]
            heap = buckets[remaining]
            bin_id = heapq.heappop(heap)
            if not heap:
                del open_values[slot]
            bins[bin_id].append(index)
            rest = remaining - size
        if rest:
            heap = buckets[rest]
            if heap:
                heapq.heappush(heap, bin_id)
            else:
                buckets[rest] = [bin_id]
                bisect.insort(open_values, rest)
    return bins


def _split_pieces(lengths: np.ndarray, capacity: int, long_documents: str):
    """Cut documents into pieces of at most ``capacity`` tokens; empty documents give none.

    Returns ``(doc, start, length)`` arrays, one entry per piece, in document order.
    """
    if long_documents == "truncate":
        doc = np.flatnonzero(lengths > 0)
        return doc, np.zeros_like(doc), np.minimum(lengths[doc], capacity)
    chunks = -(-lengths // capacity)
    doc = np.repeat(np.arange(len(lengths)), chunks)
    first = np.cumsum(chunks) - chunks
    start = (np.arange(len(doc)) - np.repeat(first, chunks)) * capacity
    return doc, start, np.minimum(lengths[doc] - start, capacity)


def _build_batch(
    rows: list[list[np.ndarray]],
    width: int,
    pad_token_id: int,
    label_rows: list[list[np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Lay ``rows`` (lists of token arrays, one per document) out as a ``[len(rows), width]`` batch.

    ``label_rows`` (same structure) replace the default labels, i.e. the tokens themselves;
    either way the first label of each document is ``-100``. See the module docstring.
    """
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_token_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.empty(shape, dtype=np.int64)
    arange = np.arange(width)
    segments = []
    for r, docs in enumerate(rows):
        pos = 0
        for d, tokens in enumerate(docs):
            n = len(tokens)
            source = tokens if label_rows is None else label_rows[r][d]
            input_ids[r, pos : pos + n] = tokens
            labels[r, pos + 1 : pos + n] = source[1:]
            position_ids[r, pos : pos + n] = arange[:n]
            segments.append(n)
            pos += n
        if pos < width:
            position_ids[r, pos:] = arange[: width - pos]
            segments.append(width - pos)
    real_tokens = sum(len(tokens) for docs in rows for tokens in docs)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seq_lens": torch.from_numpy(
            np.concatenate([[0], np.cumsum(segments)]).astype(np.int32)
        ),
        "max_length": int(max(segments)),
        "num_real_tokens": torch.tensor(real_tokens, dtype=torch.int64),
        "num_label_tokens": torch.tensor(int((labels != IGNORE_INDEX).sum()), dtype=torch.int64),
    }


def _tokens(item: Any, column: str) -> np.ndarray:
    tokens = item[column] if isinstance(item, Mapping) else item
    return np.asarray(tokens, dtype=np.int64).reshape(-1)


class _ListSource:
    """A sized sequence of token lists or of mappings with a token column."""

    def __init__(self, data: Sequence, column: str):
        self.data, self.column = data, column

    def lengths(self) -> np.ndarray:
        return np.fromiter(
            (len(_tokens(x, self.column)) for x in self.data), dtype=np.int64, count=len(self.data)
        )

    def fetch(self, docs: list[int]) -> list[np.ndarray]:
        return [_tokens(self.data[d], self.column) for d in docs]


class _ArrowSource:
    """A map-style ``datasets.Dataset``, read through Arrow without building Python rows."""

    def __init__(self, dataset: Any, column: str):
        if column not in dataset.column_names:
            raise ValueError(f"dataset has no {column!r} column (columns: {dataset.column_names})")
        self.table, self.column = dataset.select_columns([column]).with_format("arrow"), column

    def lengths(self) -> np.ndarray:
        import pyarrow.compute as pc

        parts = [
            pc.fill_null(pc.list_value_length(batch[self.column]), 0).to_numpy(zero_copy_only=False)
            for batch in self.table.iter(batch_size=65536)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def fetch(self, docs: list[int]) -> list[np.ndarray]:
        column = self.table[docs].column(self.column).to_pylist()
        return [
            np.asarray(tokens if tokens is not None else [], dtype=np.int64) for tokens in column
        ]


def _sized_source(source: Any, column: str) -> _ListSource | _ArrowSource | None:
    """The sized reader for ``source``, or ``None`` when it can only be streamed."""
    hf = sys.modules.get("datasets")  # an HF dataset implies `datasets` is already imported
    if hf is not None:
        if isinstance(source, hf.DatasetDict | hf.IterableDatasetDict):
            raise ValueError(f"got a dataset dict with splits {list(source)}; pass one split")
        if isinstance(source, hf.Dataset):
            return _ArrowSource(source, column)
        if isinstance(source, hf.IterableDataset):
            return None
    if isinstance(source, Mapping):
        raise TypeError("pass a dataset or a list of documents, not a mapping of columns")
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return _ListSource(source, column)
    if isinstance(source, Iterator):
        raise TypeError(
            "a one-shot iterator cannot be read once per epoch; pass a re-iterable source"
        )
    if isinstance(source, Iterable):
        return None
    raise TypeError(f"cannot read documents from {type(source).__name__}")


@dataclass
class _Window:
    """Documents packed by one ``pack_bfd`` call: piece ``i`` is ``doc[i][start:start+length]``."""

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    bins: list[list[int]]
    tokens: list[np.ndarray] | None  # a streaming window's documents; None: fetch from the source


class PackedDataset(IterableDataset):
    """Batches of documents packed into rows of ``capacity`` tokens (see the module docstring).

    Documents come from a map-style or streaming ``datasets`` dataset with a ``column`` of token
    ids, or from any sequence/iterable of token-id lists (or of mappings holding ``column``).
    Empty documents are dropped and counted in :attr:`stats`; longer-than-``capacity`` ones are
    truncated (``long_documents="truncate"``) or cut into ``capacity``-token pieces (``"split"``,
    each piece is then a document of its own: positions restart, its first label is -100).

    Packing. Documents are packed by :func:`pack_bfd` in windows of ``window`` documents in source
    order. ``window=None`` packs a sized source in one window (best packing; the bins are computed
    once, on first use) and reads a streaming source in windows of 16384 documents, holding one
    window's tokens in memory. Bins are fixed across epochs; their order is shuffled per epoch
    with ``numpy.random.default_rng([seed, epoch, ...])`` — over all bins for a sized source,
    within each window for a streaming one.

    Sharding. Every rank computes the same bin order, cuts it into groups of
    ``world_size * rows_per_batch`` bins and takes the ``rows_per_batch`` bins from
    ``rank * rows_per_batch`` on of each group, so ranks get disjoint bins and equally many full
    batches. What is left at the
    end (fewer than a group) is dropped with ``drop_last``; otherwise rank ``r`` takes bins
    ``r, r + world_size, ...`` of it as one final, smaller batch, so every bin is yielded exactly
    once over all ranks and ranks may differ by that one batch (use ``drop_last=True`` for DDP).
    Streaming sources are read in full by every rank. ``DataLoader`` workers split a rank's
    batches round-robin, which the loader's in-order fetching turns back into the same sequence.

    Epochs and resumption. ``set_epoch(e)`` selects the shuffle; a streaming source's own
    ``set_epoch`` (HF ``IterableDataset`` shuffling) is called with the same epoch at the start of
    each pass. A pass that runs to the end advances the epoch by one. ``state_dict()`` is
    ``{"epoch", "batches_yielded", ...}`` for this rank; ``load_state_dict`` makes the next
    ``iter()`` yield exactly the batches after that point. Skipped batches are not built, but a
    streaming source is re-read up to the resume point. With ``num_workers > 0`` the dataset
    object seen by the training loop does not count batches; build the state from the number of
    batches the loop consumed instead.

    Batches: ``input_ids``, ``labels``, ``position_ids`` (``[rows, capacity]`` int64),
    ``cu_seq_lens`` (int32), ``max_length`` (int), ``num_real_tokens`` and ``num_label_tokens``
    (int64 scalars). A final non-``drop_last`` batch may have fewer rows.
    """

    def __init__(
        self,
        source: Any,
        capacity: int,
        rows_per_batch: int = 1,
        *,
        long_documents: str = "truncate",
        pad_token_id: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        window: int | None = None,
        column: str = "input_ids",
    ):
        self.capacity = _check_positive_int("capacity", capacity)
        self.rows_per_batch = _check_positive_int("rows_per_batch", rows_per_batch)
        self.world_size = _check_positive_int("world_size", world_size)
        if window is not None:
            _check_positive_int("window", window)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if long_documents not in _LONG_DOCUMENTS:
            raise ValueError(
                f"long_documents must be one of {_LONG_DOCUMENTS}, got {long_documents!r}"
            )
        self.source = source
        self.long_documents, self.pad_token_id = long_documents, pad_token_id
        self.seed, self.shuffle, self.rank, self.drop_last = seed, shuffle, rank, drop_last
        self.column = column
        self._sized = _sized_source(source, column)
        self.window = window if window is not None or self._sized is not None else _STREAM_WINDOW
        self._planned: list[_Window] | None = None
        self._stats = self._empty_stats()
        self._epoch = self._start = self._position = 0

    # -- packing ---------------------------------------------------------------------------------

    @staticmethod
    def _empty_stats() -> dict[str, int]:
        keys = (
            "documents",
            "empty_documents",
            "long_documents",
            "truncated_tokens",
            "pieces",
            "bins",
            "real_tokens",
        )
        return dict.fromkeys(keys, 0)

    def _pack_window(
        self, lengths: np.ndarray, offset: int, tokens: list[np.ndarray] | None
    ) -> _Window:
        doc, start, length = _split_pieces(lengths, self.capacity, self.long_documents)
        window = _Window(doc + offset, start, length, pack_bfd(length, self.capacity), tokens)
        stats = self._stats
        stats["documents"] += len(lengths)
        stats["empty_documents"] += int((lengths == 0).sum())
        stats["long_documents"] += int((lengths > self.capacity).sum())
        stats["truncated_tokens"] += int(lengths.sum() - length.sum())
        stats["pieces"] += len(length)
        stats["bins"] += len(window.bins)
        stats["real_tokens"] += int(length.sum())
        return window

    def _plan(self) -> list[_Window]:
        """All windows of a sized source, packed once."""
        if self._planned is None:
            lengths = self._sized.lengths()
            size = self.window or max(len(lengths), 1)
            self._planned = [
                self._pack_window(lengths[lo : lo + size], lo, None)
                for lo in range(0, len(lengths), size)
            ]
            stats = self._stats
            logger.info(
                "packed %d documents (%d empty dropped, %d longer than %d %s) into %d rows, "
                "%.2f%% real tokens",
                stats["documents"],
                stats["empty_documents"],
                stats["long_documents"],
                self.capacity,
                "truncated" if self.long_documents == "truncate" else "split",
                stats["bins"],
                100 * stats["real_tokens"] / max(stats["bins"] * self.capacity, 1),
            )
        return self._planned

    def _stream_windows(self, epoch: int) -> Iterator[_Window]:
        """Read and pack a streaming source window by window; statistics restart with each pass."""
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)
        self._stats = self._empty_stats()
        tokens: list[np.ndarray] = []
        for item in self.source:
            tokens.append(_tokens(item, self.column))
            if len(tokens) == self.window:
                yield self._stream_window(tokens)
                tokens = []
        if tokens:
            yield self._stream_window(tokens)

    def _stream_window(self, tokens: list[np.ndarray]) -> _Window:
        return self._pack_window(np.array([len(t) for t in tokens], dtype=np.int64), 0, tokens)

    def _bin_order(self, epoch: int) -> Iterator[tuple[_Window, int]]:
        """Every bin of one epoch, in the shuffled order all ranks agree on."""
        if self._sized is not None:
            windows = self._plan()
            refs = [(w, b) for w in windows for b in range(len(w.bins))]
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(len(refs))
                if self.shuffle
                else range(len(refs))
            )
            for i in order:
                yield refs[i]
            return
        for index, window in enumerate(self._stream_windows(epoch)):
            count = len(window.bins)
            order = (
                np.random.default_rng([self.seed, epoch, index]).permutation(count)
                if self.shuffle
                else range(count)
            )
            for b in order:
                yield window, int(b)

    def _rank_batches(self, epoch: int) -> Iterator[list[tuple[_Window, int]]]:
        """This rank's batches of one epoch, as lists of bin references."""
        rows, group_size = self.rows_per_batch, self.world_size * self.rows_per_batch
        group = []
        for ref in self._bin_order(epoch):
            group.append(ref)
            if len(group) == group_size:
                yield group[self.rank * rows : (self.rank + 1) * rows]
                group = []
        tail = group[self.rank :: self.world_size]
        if tail and not self.drop_last:
            yield tail

    def _build(self, refs: list[tuple[_Window, int]]) -> dict[str, Any]:
        fetched: dict[int, np.ndarray] = {}
        if self._sized is not None:
            docs = sorted({int(w.doc[i]) for w, b in refs for i in w.bins[b]})
            fetched = dict(zip(docs, self._sized.fetch(docs)))
        rows = []
        for window, b in refs:
            row = []
            for i in window.bins[b]:
                doc, start = int(window.doc[i]), int(window.start[i])
                tokens = window.tokens[doc] if window.tokens is not None else fetched[doc]
                row.append(tokens[start : start + int(window.length[i])])
            rows.append(row)
        return _build_batch(rows, self.capacity, self.pad_token_id)

    # -- iteration and state ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start = self._epoch, self._start
        self._start, self._position = 0, start
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, refs in enumerate(self._rank_batches(epoch)):
            if index < start or (index - start) % workers != worker:
                continue
            batch = self._build(refs)
            self._position = index + 1
            yield batch
        self._epoch, self._position = epoch + 1, 0

    def __len__(self) -> int:
        """Batches per epoch on this rank; a streaming source has no length (``TypeError``)."""
        if self._sized is None:
            raise TypeError("a PackedDataset over a streaming source has no length")
        bins = sum(len(w.bins) for w in self._plan())
        full, tail = divmod(bins, self.world_size * self.rows_per_batch)
        return full + int(not self.drop_last and tail > self.rank)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of epoch ``epoch`` and start the next ``iter()`` at its beginning."""
        self._epoch, self._start, self._position = int(epoch), 0, 0

    def state_dict(self) -> dict[str, int]:
        """Position of this rank: ``epoch`` and the number of its batches already yielded."""
        return {
            "epoch": self._epoch,
            "batches_yielded": self._position,
            "seed": self.seed,
            "capacity": self.capacity,
            "rows_per_batch": self.rows_per_batch,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume: the next ``iter()`` yields the batches after ``state["batches_yielded"]``."""
        for key in ("seed", "capacity", "rows_per_batch", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"state was saved with {key}={state[key]}, "
                    f"this dataset has {getattr(self, key)}"
                )
        self._epoch = int(state["epoch"])
        self._start = self._position = int(state["batches_yielded"])

    @property
    def stats(self) -> dict[str, int]:
        """Counts over the packed documents (all of a sized source; a stream's pass so far)."""
        if self._sized is not None:
            self._plan()
        return dict(self._stats)

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / (rows * capacity) over all packed rows, before sharding; nan if none."""
        stats = self.stats
        return (
            stats["real_tokens"] / (stats["bins"] * self.capacity)
            if stats["bins"]
            else float("nan")
        )


def packed_batches(
    source: Any, capacity: int, rows_per_batch: int = 1, **options: Any
) -> Iterator[dict[str, Any]]:
    """One epoch of ``PackedDataset(source, capacity, rows_per_batch, **options)``."""
    return iter(PackedDataset(source, capacity, rows_per_batch, **options))


class PackingCollator:
    """Collate features with ``input_ids`` (and optionally ``labels``) into packed rows.

    A drop-in ``data_collator`` for HF ``Trainer`` / TRL, like ``DataCollatorWithFlattening``:
    returns ``input_ids``, ``labels`` and ``position_ids`` and no ``attention_mask``, under the
    conventions of the module docstring (first label of each document -100, positions restart).
    Features' own ``labels`` (e.g. prompt tokens already -100) are kept, except the first.

    The batch also carries ``use_cache=False``: transformers (5.x) derives the documents from
    ``position_ids`` only when the forward runs without a KV cache, and Llama/Qwen configs
    default to ``use_cache=True`` even in training, which silently attends across documents.
    Pass ``use_cache=None`` to leave the key out (a model whose forward takes no such argument).

    ``capacity=None`` concatenates the batch into one ``[1, total]`` row without padding.
    With a ``capacity``, documents (cut per ``long_documents``) are packed by :func:`pack_bfd` into
    ``[rows, capacity]``; the number of rows varies from batch to batch. Empty features are skipped.
    """

    def __init__(
        self,
        capacity: int | None = None,
        pad_token_id: int = 0,
        long_documents: str = "truncate",
        column: str = "input_ids",
        use_cache: bool | None = False,
    ):
        if capacity is not None:
            _check_positive_int("capacity", capacity)
        if long_documents not in _LONG_DOCUMENTS:
            raise ValueError(
                f"long_documents must be one of {_LONG_DOCUMENTS}, got {long_documents!r}"
            )
        self.capacity, self.pad_token_id = capacity, pad_token_id
        self.long_documents, self.column = long_documents, column
        self.use_cache = use_cache

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, Any]:
        tokens = [_tokens(f, self.column) for f in features]
        labels = [_tokens(f, "labels") if "labels" in f else t for f, t in zip(features, tokens)]
        for ids, lab in zip(tokens, labels):
            if len(ids) != len(lab):
                raise ValueError(f"a feature has {len(ids)} {self.column} but {len(lab)} labels")
        lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        if not lengths.sum():
            raise ValueError("the batch holds no tokens")
        if self.capacity is None:
            kept = [i for i in range(len(tokens)) if len(tokens[i])]
            batch = _build_batch(
                [[tokens[i] for i in kept]],
                int(lengths.sum()),
                self.pad_token_id,
                [[labels[i] for i in kept]],
            )
        else:
            doc, start, length = _split_pieces(lengths, self.capacity, self.long_documents)
            cut = [slice(s, s + n) for s, n in zip(start.tolist(), length.tolist())]
            bins = pack_bfd(length, self.capacity)
            rows = [[tokens[doc[i]][cut[i]] for i in b] for b in bins]
            label_rows = [[labels[doc[i]][cut[i]] for i in b] for b in bins]
            batch = _build_batch(rows, self.capacity, self.pad_token_id, label_rows)
        out = {key: batch[key] for key in ("input_ids", "labels", "position_ids")}
        if self.use_cache is not None:
            out["use_cache"] = self.use_cache
        return out
