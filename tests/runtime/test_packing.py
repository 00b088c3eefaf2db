import itertools
import math
import time
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from chronicals_fx.runtime import PackedDataset, PackingCollator, pack_bfd, packed_batches

datasets = pytest.importorskip("datasets")

FRESH_SEEDS = np.random.SeedSequence().generate_state(4).tolist()  # new every run, shown on failure


# -- helpers --------------------------------------------------------------------------------------


def naive_bfd(lengths, capacity):
    """Best-fit decreasing by linear scans: the definition pack_bfd must reproduce exactly."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, remaining = [], []
    for i in order:
        fits = [b for b, r in enumerate(remaining) if r >= lengths[i]]
        if fits:
            best = min(fits, key=lambda b: (remaining[b], b))
            bins[best].append(i)
            remaining[best] -= lengths[i]
        else:
            bins.append([i])
            remaining.append(capacity - lengths[i])
    return bins


def optimal_bins(lengths, capacity):
    """Exact bin-packing optimum by backtracking (tiny inputs only)."""
    items = sorted(lengths, reverse=True)

    def fits(k):
        loads = [0] * k

        def place(i):
            if i == len(items):
                return True
            tried = set()
            for b in range(k):
                if loads[b] + items[i] <= capacity and loads[b] not in tried:
                    tried.add(loads[b])
                    loads[b] += items[i]
                    if place(i + 1):
                        return True
                    loads[b] -= items[i]
            return False

        return place(0)

    return next(k for k in range(1, len(items) + 1) if fits(k))


def assert_valid_packing(bins, lengths, capacity):
    lengths = np.asarray(lengths)
    flat = np.fromiter(itertools.chain.from_iterable(bins), dtype=np.int64, count=len(lengths))
    assert np.array_equal(np.sort(flat), np.arange(len(lengths))), "every item placed exactly once"
    sizes = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    assert sizes.min(initial=1) >= 1, "no empty bin"
    loads = np.bincount(
        np.repeat(np.arange(len(bins)), sizes), weights=lengths[flat], minlength=len(bins)
    )
    assert loads.max(initial=0) <= capacity


def make_docs(n, seed, max_len=40, empty=0):
    """n documents of tokens >= 1 with distinct first tokens, so tokens identify a document."""
    rng = np.random.default_rng(seed)
    docs = [
        [i + 1] + rng.integers(1, 1000, int(rng.integers(0, max_len))).tolist() for i in range(n)
    ]
    for i in rng.choice(n, empty, replace=False):
        docs[i] = []
    return docs


def check_batch(batch, capacity, pad=0):
    """Format invariants of a packed batch (module docstring of chronicals_fx.runtime.packing)."""
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    rows = ids.shape[0]
    assert ids.shape == labels.shape == pos.shape == (rows, capacity)
    assert ids.dtype == labels.dtype == pos.dtype == torch.int64
    starts = pos == 0
    assert starts[:, 0].all()
    assert (pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1).all(), (
        "positions count up per segment"
    )
    padding = ids == pad
    for r in range(rows):  # padding is a suffix that starts a segment of its own
        n_real = int((~padding[r]).sum())
        assert not padding[r, :n_real].any() and padding[r, n_real:].all()
        assert n_real == capacity or pos[r, n_real] == 0
    assert (labels[starts | padding] == -100).all()
    assert torch.equal(labels[~(starts | padding)], ids[~(starts | padding)])
    cu = batch["cu_seq_lens"]
    assert cu.dtype == torch.int32
    expected = torch.cat(
        [torch.nonzero(pos.flatten() == 0).flatten(), torch.tensor([rows * capacity])]
    )
    assert torch.equal(cu.long(), expected)
    assert batch["max_length"] == int(torch.diff(cu).max())
    assert int(batch["num_real_tokens"]) == int((~padding).sum())
    assert int(batch["num_label_tokens"]) == int((labels != -100).sum())


def documents(batch, pad=0):
    """Token tuples of the non-padding segments of a batch, row by row."""
    docs = []
    for ids, pos in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
        starts = [p for p, v in enumerate(pos) if v == 0] + [len(pos)]
        for lo, hi in zip(starts, starts[1:]):
            if ids[lo] != pad:
                docs.append(tuple(ids[lo:hi]))
    return docs


def rows(batch):
    return [tuple(r) for r in batch["input_ids"].tolist()]


def same_batches(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys()
        and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)
        for x, y in zip(a, b)
    )


# -- pack_bfd -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", FRESH_SEEDS + [0, 1])
def test_pack_bfd_matches_definition(seed):
    rng = np.random.default_rng(seed)
    for _ in range(30):
        capacity = int(rng.integers(1, 200))
        lengths = rng.integers(1, capacity + 1, size=int(rng.integers(0, 300)))
        if rng.random() < 0.5:  # many ties
            lengths = rng.choice(lengths[:5], size=len(lengths)) if len(lengths) else lengths
        bins = pack_bfd(lengths, capacity)
        assert bins == naive_bfd(lengths.tolist(), capacity), f"seed {seed}"
        assert_valid_packing(bins, lengths, capacity)


@pytest.mark.parametrize("seed", FRESH_SEEDS + [0])
def test_pack_bfd_within_11_9_of_optimum(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        capacity = int(rng.integers(5, 30))
        lengths = rng.integers(1, capacity + 1, size=int(rng.integers(1, 9))).tolist()
        bins = len(pack_bfd(lengths, capacity))
        optimum = optimal_bins(lengths, capacity)
        assert optimum <= bins <= 11 / 9 * optimum + 1, f"seed {seed}: {lengths} / {capacity}"


def test_pack_bfd_exact_fits_and_best_fit_choice():
    assert sorted(map(sorted, pack_bfd([6, 4, 6, 4], 10))) == [[0, 1], [2, 3]]
    assert len(pack_bfd([3, 7, 5, 5, 10, 2, 8], 10)) == 4
    assert pack_bfd([10, 10], 10) == [[0], [1]]
    assert pack_bfd([1] * 5, 5) == [[0, 1, 2, 3, 4]]
    assert pack_bfd([], 8) == []
    # longest first: 7 -> bin0 (rest 3), 5 -> bin1 (rest 5), 4 -> bin1 (rest 1), 3 -> bin0 (rest 0),
    # 2 fits nowhere -> bin2
    assert pack_bfd([7, 5, 3, 4, 2], 10) == [[0, 2], [1, 3], [4]]
    # best fit, not first fit: rests are 3 (bin0) and 2 (bin1), the 1 goes to the tighter bin1
    assert pack_bfd([7, 4, 4, 1], 10) == [[0], [1, 2, 3]]


def test_pack_bfd_deterministic_and_tie_break_by_index():
    lengths = [5, 3, 5, 3, 5, 3]
    assert pack_bfd(lengths, 8) == pack_bfd(np.array(lengths), 8) == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize(
    "lengths, capacity, message",
    [
        ([3, 0, 2], 8, "lengths\\[1\\] = 0"),
        ([3, -1], 8, ">= 1"),
        ([3, 9, 2], 8, "lengths\\[1\\] = 9 exceeds capacity 8"),
        ([1.5, 2.0], 8, "integers"),
        ([[1, 2]], 8, "one-dimensional"),
        ([1], 0, "capacity"),
    ],
)
def test_pack_bfd_rejects_bad_input(lengths, capacity, message):
    with pytest.raises(ValueError, match=message):
        pack_bfd(lengths, capacity)


def test_pack_bfd_one_million_lognormal():
    """Acceptance: 1M lognormal lengths. ~1.5 s for pack_bfd on the development machine (1 core)."""
    capacity = 4096
    lengths = np.clip(np.random.default_rng(6).lognormal(6, 1, 1_000_000), 1, capacity).astype(
        np.int64
    )
    start = time.perf_counter()
    bins = pack_bfd(lengths, capacity)
    elapsed = time.perf_counter() - start
    assert_valid_packing(bins, lengths, capacity)
    lower_bound = math.ceil(lengths.sum() / capacity)
    assert len(bins) <= 11 / 9 * lower_bound + 1
    assert elapsed < 30, f"{elapsed:.1f}s: an O(n log n) pack takes seconds, this looks quadratic"


# -- packed batches -------------------------------------------------------------------------------


def test_batch_format_and_every_document_once():
    docs = make_docs(300, seed=1, max_len=50, empty=7)
    dataset = PackedDataset(docs, capacity=64, rows_per_batch=4, seed=3)
    batches = list(dataset)
    for batch in batches:
        check_batch(batch, 64)
    assert Counter(d for b in batches for d in documents(b)) == Counter(tuple(d) for d in docs if d)
    assert len(batches) == len(dataset) == math.ceil(dataset.stats["bins"] / 4)
    stats = dataset.stats
    assert stats["documents"] == 300 and stats["empty_documents"] == 7
    real = sum(int(b["num_real_tokens"]) for b in batches)
    assert real == stats["real_tokens"] == sum(map(len, docs))
    assert dataset.packing_efficiency == pytest.approx(real / (stats["bins"] * 64))
    assert dataset.packing_efficiency > 0.9


def test_hf_causal_lm_sees_independent_documents():
    """A packed batch through an HF Llama (sdpa, position_ids, no attention_mask) gives each
    document the logits and summed loss it gets alone: the label and position conventions hold.

    HF derives the document mask from position_ids only without a KV cache, hence use_cache=False.
    """
    pytest.importorskip("transformers")
    from tests.tiny_models import tiny_causal_lm

    model = tiny_causal_lm("llama", hidden_size=32, intermediate_size=48, vocab_size=1000,
                           attn_implementation="sdpa").eval()
    docs = make_docs(12, seed=5, max_len=20)
    batch = next(iter(PackedDataset(docs, capacity=48, rows_per_batch=8, shuffle=False)))
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            labels=batch["labels"],
            use_cache=False,
        )
        flat_ids, flat_logits = batch["input_ids"].flatten(), out.logits.flatten(0, 1)
        cu = batch["cu_seq_lens"].tolist()
        alone_loss_sum, seen = 0.0, 0
        for lo, hi in zip(cu, cu[1:]):
            if flat_ids[lo] == 0:  # padding tail
                continue
            ids = flat_ids[lo:hi][None]
            alone = model(input_ids=ids, labels=ids)
            torch.testing.assert_close(flat_logits[lo:hi], alone.logits[0], atol=1e-5, rtol=1e-4)
            if hi - lo > 1:  # a one-token document has no label, and a nan mean loss
                alone_loss_sum = alone_loss_sum + alone.loss * (hi - lo - 1)
            seen += 1
    assert seen == len(documents(batch)) > 2
    torch.testing.assert_close(
        out.loss * batch["num_label_tokens"], alone_loss_sum, atol=1e-4, rtol=1e-5
    )


def test_deterministic_for_seed_and_shuffled_per_epoch():
    docs = make_docs(200, seed=2)
    first = list(PackedDataset(docs, capacity=64, rows_per_batch=2, seed=11))
    assert same_batches(first, list(PackedDataset(docs, capacity=64, rows_per_batch=2, seed=11)))
    other_seed = list(PackedDataset(docs, capacity=64, rows_per_batch=2, seed=12))
    assert [rows(b) for b in other_seed] != [rows(b) for b in first]

    dataset = PackedDataset(docs, capacity=64, rows_per_batch=2, seed=11)
    epoch0 = list(dataset)
    epoch1 = list(dataset)  # a finished pass advances the epoch
    assert same_batches(epoch0, first)
    assert [rows(b) for b in epoch1] != [rows(b) for b in epoch0]
    assert sorted(sum(map(rows, epoch1), [])) == sorted(sum(map(rows, epoch0), [])), (
        "same bins, new order"
    )
    dataset.set_epoch(1)
    assert same_batches(list(dataset), epoch1)
    dataset.set_epoch(0)
    assert same_batches(list(dataset), epoch0)

    unshuffled = PackedDataset(docs, capacity=64, rows_per_batch=2, shuffle=False)
    assert same_batches(list(unshuffled), list(unshuffled))


@pytest.mark.parametrize("drop_last", [True, False])
def test_rank_sharding(drop_last):
    docs = make_docs(301, seed=4)
    world, rows_per_batch = 3, 2
    shards = [
        list(
            PackedDataset(
                docs, 64, rows_per_batch, seed=7, rank=r, world_size=world, drop_last=drop_last
            )
        )
        for r in range(world)
    ]
    everything = list(PackedDataset(docs, 64, 1, seed=7))
    all_rows = Counter(sum(map(rows, everything), []))
    shard_rows = [Counter(sum(map(rows, shard), [])) for shard in shards]
    for a, b in itertools.combinations(shard_rows, 2):
        assert not (a & b), "ranks share no bin"
    union = sum(shard_rows, Counter())
    assert union <= all_rows
    bins = sum(all_rows.values())
    for r, shard in enumerate(shards):
        assert len(shard) == len(
            PackedDataset(docs, 64, rows_per_batch, rank=r, world_size=world, drop_last=drop_last)
        )
    if drop_last:
        assert len({len(shard) for shard in shards}) == 1
        assert all(b["input_ids"].shape[0] == rows_per_batch for shard in shards for b in shard)
        assert bins - sum(union.values()) < world * rows_per_batch
    else:
        assert union == all_rows, "every bin on exactly one rank"
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_yields_exactly_the_remaining_batches(streaming):
    docs = make_docs(250, seed=8, empty=5)
    hf = datasets.Dataset.from_dict({"input_ids": docs})
    source = (
        hf.to_iterable_dataset(num_shards=5).shuffle(seed=3, buffer_size=16) if streaming else hf
    )

    def build():
        return PackedDataset(source, 64, 2, seed=5, rank=1, world_size=2, drop_last=True, window=60)

    reference = build()
    reference.set_epoch(2)
    expected = list(reference)
    assert len(expected) > 6
    for consumed in (0, 5, len(expected)):
        first = build()
        first.set_epoch(2)
        iterator = iter(first)
        head = [next(iterator) for _ in range(consumed)]
        state = first.state_dict()
        assert state["epoch"] == 2 and state["batches_yielded"] == consumed
        resumed = build()
        resumed.load_state_dict(state)
        assert same_batches(head + list(resumed), expected)
        assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["batches_yielded"] == 0


def test_load_state_dict_rejects_other_configuration():
    dataset = PackedDataset(make_docs(10, seed=0), 64, 2)
    state = dataset.state_dict()
    with pytest.raises(ValueError, match="rows_per_batch"):
        PackedDataset(make_docs(10, seed=0), 64, 3).load_state_dict(state)


def test_hf_map_style_and_streaming_sources_match_list_source():
    docs = make_docs(150, seed=9, empty=4)
    hf = datasets.Dataset.from_dict({"input_ids": docs, "other": list(range(150))})
    options = dict(capacity=64, rows_per_batch=3, shuffle=False)
    from_list = list(PackedDataset(docs, **options))
    assert same_batches(list(PackedDataset(hf, **options)), from_list)
    assert same_batches(list(PackedDataset(hf.to_iterable_dataset(), **options)), from_list)
    mapping_docs = [{"input_ids": d} for d in docs]
    assert same_batches(list(packed_batches(mapping_docs, **options)), from_list)

    streamed = PackedDataset(hf.to_iterable_dataset(), capacity=64, rows_per_batch=3, seed=1)
    batches = list(streamed)
    assert Counter(d for b in batches for d in documents(b)) == Counter(tuple(d) for d in docs if d)
    assert streamed.stats["empty_documents"] == 4
    with pytest.raises(TypeError, match="no length"):
        len(streamed)


def test_streaming_windows_place_every_document_once():
    docs = make_docs(103, seed=10, empty=3)
    dataset = PackedDataset(
        datasets.Dataset.from_dict({"input_ids": docs}).to_iterable_dataset(), 48, 2, window=10
    )
    batches = list(dataset)
    for batch in batches:
        check_batch(batch, 48)
    assert Counter(d for b in batches for d in documents(b)) == Counter(
        tuple(d[:48]) for d in docs if d
    )
    assert dataset.stats["documents"] == 103 and dataset.stats["empty_documents"] == 3


def test_long_documents_truncate_and_split():
    capacity = 16
    long_doc = list(range(1, 41))  # 40 tokens: 16 + 16 + 8 when split
    docs = [long_doc, [50, 51, 52], [60] * 5]
    truncated = PackedDataset(docs, capacity, 4, long_documents="truncate")
    batch = next(iter(truncated))
    check_batch(batch, capacity)
    assert Counter(documents(batch)) == Counter([tuple(long_doc[:16]), (50, 51, 52), (60,) * 5])
    assert truncated.stats["truncated_tokens"] == 24 and truncated.stats["long_documents"] == 1

    split = PackedDataset(docs, capacity, 4, long_documents="split")
    batch = next(iter(split))
    check_batch(batch, capacity)
    pieces = [tuple(long_doc[:16]), tuple(long_doc[16:32]), tuple(long_doc[32:])]
    assert Counter(documents(batch)) == Counter(pieces + [(50, 51, 52), (60,) * 5])
    assert split.stats["truncated_tokens"] == 0 and split.stats["pieces"] == 5
    assert int(batch["num_real_tokens"]) == 48


def test_dataloader_workers_keep_the_order():
    dataset = PackedDataset(make_docs(200, seed=12), 64, 2, seed=4)
    expected = list(dataset)
    dataset.set_epoch(0)
    loaded = list(DataLoader(dataset, batch_size=None, num_workers=2))
    assert same_batches(loaded, expected)


def test_invalid_options():
    docs = make_docs(5, seed=0)
    with pytest.raises(ValueError, match="long_documents"):
        PackedDataset(docs, 16, long_documents="drop")
    with pytest.raises(ValueError, match="rank"):
        PackedDataset(docs, 16, rank=2, world_size=2)
    with pytest.raises(ValueError, match="capacity"):
        PackedDataset(docs, 0)
    with pytest.raises(TypeError, match="re-iterable"):
        PackedDataset(iter(docs), 16)
    with pytest.raises(ValueError, match="pass one split"):
        PackedDataset(
            datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": docs})}), 16
        )


# -- collator -------------------------------------------------------------------------------------


def test_collator_flattens_into_one_row():
    features = [
        {"input_ids": [5, 6, 7]},
        {"input_ids": []},
        {"input_ids": [8, 9]},
        {"input_ids": [4]},
    ]
    batch = PackingCollator()(features)
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"}
    assert batch["use_cache"] is False
    assert "use_cache" not in PackingCollator(use_cache=None)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]


def test_collator_keeps_feature_labels_except_first():
    features = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11], "labels": [9, 10, 11], "attention_mask": [1, 1, 1]},
    ]
    batch = PackingCollator()(features)
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100, 10, 11]]
    with pytest.raises(ValueError, match="labels"):
        PackingCollator()([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="no tokens"):
        PackingCollator()([{"input_ids": []}])


@pytest.mark.parametrize("long_documents", ["truncate", "split"])
def test_collator_with_capacity_packs_rows(long_documents):
    docs = make_docs(40, seed=13, max_len=30)
    features = [{"input_ids": d} for d in docs]
    batch = PackingCollator(capacity=24, long_documents=long_documents)(features)
    check_batch(dict(batch, **_derived(batch)), 24)
    got = Counter(documents(batch))
    if long_documents == "truncate":
        assert got == Counter(tuple(d[:24]) for d in docs)
    else:
        assert got == Counter(tuple(d[i : i + 24]) for d in docs for i in range(0, len(d), 24))
    lengths = [len(d) for d in got.elements()]
    assert batch["input_ids"].shape[0] == len(pack_bfd(lengths, 24))


def _derived(batch):
    """The fields PackedDataset adds, recomputed so check_batch can inspect a collator batch."""
    pos, labels = batch["position_ids"], batch["labels"]
    cu = torch.cat([torch.nonzero(pos.flatten() == 0).flatten(), torch.tensor([pos.numel()])]).int()
    return {
        "cu_seq_lens": cu,
        "max_length": int(torch.diff(cu).max()),
        "num_real_tokens": (batch["input_ids"] != 0).sum(),
        "num_label_tokens": (labels != -100).sum(),
    }


def test_collator_batch_keeps_documents_apart_in_a_model_that_defaults_to_a_cache():
    """A Llama config defaults to use_cache=True, under which transformers ignores the
    documents of packed position_ids; the collator's batch turns the cache off."""
    from tests.tiny_models import tiny_causal_lm

    torch.manual_seed(0)
    model = tiny_causal_lm("llama", attn_implementation="sdpa")
    assert model.config.use_cache
    docs = [torch.randint(0, 96, (n,)).tolist() for n in (7, 5)]
    batch = PackingCollator()([{"input_ids": d} for d in docs])
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch).logits[0, len(docs[0]):]
        alone = model(input_ids=torch.tensor([docs[1]])).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
