"""Packed vs padded training on a real length distribution, each variant in its own process.

    python -m benchmarks.packing [--model qwen2.5-0.5b] [--seq 4096] [--batch 2] [--steps 9]
        [--warmup 3] [--variants padded_compile packed_compile packed_chronicals] [--json path]
    python -m benchmarks.packing --device cpu --model tiny-llama --seq 256 --steps 2   # smoke run

Documents: every top-level ``def`` / ``class`` block (decorators included; the module code
before the first one is a document too) of the standard library's top-level ``.py`` files,
read as bytes like :mod:`chronicals_fx.workload` (token ids 0-255; the model keeps its real
vocabulary). Blocks longer than T are cut into T-token pieces, and both layouts train on the
same pieces:

    padded   B pieces per batch, each right-padded to T: ``attention_mask`` and labels -100 on
             padding, the way a plain HF script batches (``padding="max_length"``)
    packed   ``chronicals_fx.runtime.PackedDataset`` at the same T and B: BFD-packed rows,
             ``position_ids`` restarting per document, labels -100 at each document's first
             token and on the padding tail, no ``attention_mask``

Every forward passes ``use_cache=False``. That is required for packed rows: transformers
(5.x, ``masking_utils._preprocess_mask_arguments``) derives documents from ``position_ids`` only
when there is no ``attention_mask`` *and no cache*; a config with ``use_cache=True`` (every
Llama/Qwen2 config) makes the model build a ``DynamicCache`` even in training, and the rows are
then attended as one causal sequence, across documents (the checks measure that leak too).

Variants (``<layout>_<runner>``, runner eager | compile | chronicals): ``compile`` is
``model.compile()`` (Inductor; HF's sdpa path, which under torch.compile always materializes a
[B,1,T,T] boolean mask, from ``attention_mask`` or from the packed ``position_ids``),
``chronicals`` is ``chronicals.optimize(model)`` with all passes. Same model shape, bf16
parameters, random init, fused AdamW, grad clipping, fixed steps (``workload.train``).

Throughput counts REAL tokens: document tokens, not padding (the padded rows' padding and the
packed rows' unused tails are excluded; label tokens are one fewer per document). Two figures:
``tok/s`` is the mean real tokens of the timed batches over the median step time; ``at corpus
fill`` replaces the timed batches' tokens by the layout's fill over the whole corpus
(real tokens / (rows * T)), which removes the sampling noise of a few padded batches (a padded
step costs the same whatever it holds).

A ``checks`` process (in fp32, on the same device) then takes a packed row of the training
shuffle holding >= 3 documents, and for each of its documents compares the summed loss from
the packed forward, through chronicals (all passes; ``--check-compiler``) and through eager HF
sdpa, with the document run alone (eager, unpacked); it checks that a document's loss has
exactly zero gradient with respect to the input embeddings of every other document of its row;
it shows what transformers' ``create_causal_mask`` returns for packed ``position_ids``; and
(CUDA only) it times the attention op alone on the first training batch's packed rows: HF's
sdpa with the materialized mask (compiled) against the chronicals document kernel (prebuilt
bounds, and as the pass emits it), bf16 forward + backward, with the memory each adds.

The default run (B=2, T=4096, 9 steps) spends most of its time compiling: about 40-60 s per
training process and less for the checks (``--no-checks`` / ``--no-attention-op`` trim it).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("padded", "packed")
RUNNERS = ("eager", "compile", "chronicals")
VARIANTS = tuple(f"{layout}_{runner}" for layout in LAYOUTS for runner in RUNNERS)
DEFAULT_VARIANTS = ("padded_compile", "packed_compile", "packed_chronicals")
PAD = 0                      # byte 0 never occurs in the sources
IGNORE = -100
MODEL_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")

# A block starts at column 0 with def / async def / class, decorators directly above included.
_BLOCK = re.compile(rb"^(?:@[^\n]*\n)*(?:async def |def |class )", re.M)


# ---------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------
def stdlib_documents() -> list[bytes]:
    """Top-level def/class blocks of the stdlib's top-level .py files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        cuts = sorted({0, *(m.start() for m in _BLOCK.finditer(data)), len(data)})
        docs += [data[a:b] for a, b in zip(cuts, cuts[1:]) if b - a >= 2]
    if not docs:
        raise RuntimeError(f"no Python sources found under {root}")
    return docs


def document_pieces(capacity: int, docs: list[bytes] | None = None) -> list[np.ndarray]:
    """Byte-token documents cut into pieces of at most ``capacity`` (pieces of < 2 dropped:
    a one-token document has nothing to predict)."""
    out = []
    for doc in stdlib_documents() if docs is None else docs:
        tokens = np.frombuffer(doc, dtype=np.uint8).astype(np.int64)
        out += [tokens[i:i + capacity] for i in range(0, len(tokens), capacity)
                if len(tokens) - i >= 2]
    return out


def length_summary(lengths) -> dict:
    a = np.asarray(lengths)
    return {"count": int(a.size), "tokens": int(a.sum()), "mean": float(a.mean()),
            "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "max": int(a.max()), "min": int(a.min())}


def _fmt_summary(s: dict) -> str:
    return (f"count {s['count']:,}  tokens {s['tokens']:,}  mean {s['mean']:.0f}  "
            f"median {s['median']:.0f}  p90 {s['p90']:.0f}  max {s['max']:,}")


# ---------------------------------------------------------------------------------------------
# Batches (CPU tensors; the real-token counts travel beside the model inputs)
# ---------------------------------------------------------------------------------------------
def padded_batches(pieces: list[np.ndarray], rows: int, capacity: int,
                   seed: int = 0) -> Iterator[dict]:
    """Endless batches of ``rows`` pieces right-padded to ``capacity``, shuffled per epoch."""
    import torch

    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(pieces))
        for lo in range(0, len(order) - rows + 1, rows):
            ids = torch.full((rows, capacity), PAD, dtype=torch.long)
            mask = torch.zeros((rows, capacity), dtype=torch.long)
            for r, i in enumerate(order[lo:lo + rows]):
                n = len(pieces[i])
                ids[r, :n] = torch.from_numpy(pieces[i])
                mask[r, :n] = 1
            labels = ids.masked_fill(mask == 0, IGNORE)
            yield {"input_ids": ids, "attention_mask": mask, "labels": labels,
                   "num_real_tokens": int(mask.sum())}
        epoch += 1


def packed_dataset(pieces: list[np.ndarray], rows: int, capacity: int, seed: int = 0,
                   shuffle: bool = True):
    from chronicals_fx.runtime.packing import PackedDataset

    return PackedDataset(pieces, capacity, rows, pad_token_id=PAD, seed=seed, shuffle=shuffle,
                         drop_last=True)


def packed_batches(pieces: list[np.ndarray], rows: int, capacity: int,
                   seed: int = 0) -> Iterator[dict]:
    """Endless packed batches (one ``PackedDataset`` epoch after another)."""
    dataset = packed_dataset(pieces, rows, capacity, seed)
    while True:
        for batch in dataset:
            yield {**batch, "num_real_tokens": int(batch["num_real_tokens"])}


def padded_fill(pieces: list[np.ndarray], capacity: int) -> float:
    return sum(len(p) for p in pieces) / (len(pieces) * capacity)


def _model_inputs(batches: Iterator[dict], device: str, real: list[int]) -> Iterator[dict]:
    """The model's keys of each batch on ``device`` (+ use_cache=False); real tokens noted."""
    for batch in batches:
        real.append(batch["num_real_tokens"])
        yield {**{k: batch[k].to(device, non_blocking=True) for k in MODEL_KEYS if k in batch},
               "use_cache": False}


# ---------------------------------------------------------------------------------------------
# One variant: train, in a process of its own
# ---------------------------------------------------------------------------------------------
def _dtype(args):
    import torch

    return torch.bfloat16 if args.device == "cuda" else torch.float32


def run_variant(args) -> dict:
    import chronicals
    from chronicals_fx.workload import build_model, train

    layout, runner = args.variant.split("_", 1)
    pieces = document_pieces(args.seq)
    model = build_model(args.model, dtype=_dtype(args), device=args.device)
    if runner == "compile":
        model.compile()
    elif runner == "chronicals":
        chronicals.optimize(model)
    make = packed_batches if layout == "packed" else padded_batches
    real: list[int] = []
    batches = _model_inputs(make(pieces, args.batch, args.seq, args.seed), args.device, real)
    stats = train(model, batches, args.steps, lr=args.lr, warmup_steps=args.warmup)
    timed_real = real[args.warmup:args.steps]
    stats.tokens_per_step = int(round(float(np.mean(timed_real))))
    fill = (packed_dataset(pieces, args.batch, args.seq).packing_efficiency
            if layout == "packed" else padded_fill(pieces, args.seq))
    out = {"variant": args.variant, **stats.to_dict(), "problems": stats.proof_of_training(),
           "real_tokens_timed": timed_real,
           "fill_timed": float(np.mean(timed_real)) / (args.batch * args.seq),
           "corpus_fill": fill,
           "tokens_per_s_at_fill": fill * args.batch * args.seq / stats.median_step_ms * 1000}
    if runner == "chronicals":
        report = chronicals.report_of(model)
        out["counts"], out["declined"] = report.counts, report.declined_counts
        out["attention_detail"] = sorted({m.detail for m in report.matches if m.op == "attention"})
        out["decline_reasons"] = sorted({f"{d.op}: {d.reason}" for d in report.declines})
    return out


# ---------------------------------------------------------------------------------------------
# Checks: per-document loss identity, zero cross-document gradient, attention op alone
# ---------------------------------------------------------------------------------------------
def _spans(position_ids, labels) -> list[tuple[int, int]]:
    """(start, end) of every document of one row (padding tail excluded: no labels)."""
    starts = (position_ids == 0).nonzero().flatten().tolist() + [len(position_ids)]
    return [(s, e) for s, e in zip(starts, starts[1:])
            if e - s >= 2 and bool((labels[s + 1:e] != IGNORE).all())]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def checked_row(pieces: list[np.ndarray], capacity: int, seed: int = 0,
                min_docs: int = 3) -> dict:
    """The first packed row (in the training shuffle) holding at least ``min_docs`` documents,
    else the one holding the most: ``input_ids``, ``labels``, ``position_ids`` of shape [1, T]."""
    best, best_docs = None, 0
    for batch in packed_dataset(pieces, 1, capacity, seed):
        docs = len(_spans(batch["position_ids"][0], batch["labels"][0]))
        if docs > best_docs:
            best, best_docs = batch, docs
        if docs >= min_docs:
            break
    return best


def document_checks(model_spec: str, capacity: int, device: str,
                    compiler: str = "aot_eager", max_docs: int = 16, seed: int = 0,
                    pieces: list[np.ndarray] | None = None) -> dict:
    """Per-document summed loss of a packed row (:func:`checked_row`) against each document
    alone (fp32).

    Packed through chronicals (all passes, ``compiler``): one forward per document with the
    labels of that document only (so the fused lm_head + loss gives its summed loss), from
    input embeddings that require grad: the gradient must vanish outside the document. Packed
    through eager HF sdpa (``use_cache=False``): per-token loss summed per document, once with
    the config's ``use_cache`` default too (the leak). Alone: eager, ``input_ids`` of the
    document, positions from 0.
    """
    import copy

    import torch
    import torch.nn.functional as F

    import chronicals
    from chronicals_fx.workload import build_model

    if pieces is None:
        pieces = document_pieces(capacity)
    row = checked_row(pieces, capacity, seed)
    ids, labels, pos = (row[k].to(device) for k in ("input_ids", "labels", "position_ids"))
    spans = _spans(pos[0].cpu(), labels[0].cpu())[:max_docs]

    model = build_model(model_spec, dtype=torch.float32, device=device).train()
    optimized = chronicals.optimize(copy.deepcopy(model), compiler=compiler)
    for p in optimized.parameters():
        p.requires_grad_(False)

    with torch.no_grad():
        alone = []
        for s, e in spans:
            doc = ids[:, s:e]
            loss = model(input_ids=doc, labels=doc, use_cache=False).loss
            alone.append(float(loss) * (e - s - 1))
        embeds = model.get_input_embeddings()(ids)

        def eager_sums(**kw):
            logits = model(inputs_embeds=embeds, position_ids=pos, **kw).logits[0].float()
            token = F.cross_entropy(logits[:-1], labels[0, 1:].clamp_min(0), reduction="none")
            return [float(token[s:e - 1].sum()) for s, e in spans]

        eager = eager_sums(use_cache=False)
        leaky = eager_sums()   # the config's use_cache (True): a DynamicCache, no document mask

    x = embeds.detach().clone().requires_grad_()
    packed, cross_grad, own_grad = [], 0.0, []
    start = time.perf_counter()
    for s, e in spans:
        doc_labels = torch.full_like(labels, IGNORE)
        doc_labels[:, s + 1:e] = labels[:, s + 1:e]
        x.grad = None
        loss = optimized(inputs_embeds=x, position_ids=pos, labels=doc_labels, use_cache=False).loss
        (loss * (e - s - 1)).backward()
        packed.append(float(loss.detach()) * (e - s - 1))
        inside = torch.zeros(x.shape[1], dtype=torch.bool, device=device)
        inside[s:e] = True
        if not bool(inside.all()):
            cross_grad = max(cross_grad, float(x.grad[0, ~inside].abs().max()))
        own_grad.append(float(x.grad[0, inside].abs().sum()))
    seconds = time.perf_counter() - start
    report = chronicals.report_of(optimized)
    return {
        "documents": len(spans), "lengths": [e - s for s, e in spans],
        "loss_sums_alone": alone, "loss_sums_chronicals": packed, "loss_sums_eager": eager,
        "max_rel_diff_chronicals": max(_rel(a, b) for a, b in zip(packed, alone)),
        "max_rel_diff_eager_packed": max(_rel(a, b) for a, b in zip(eager, alone)),
        "max_rel_diff_default_use_cache": max(_rel(a, b) for a, b in zip(leaky, alone)),
        "max_cross_document_grad": cross_grad, "min_own_grad": min(own_grad),
        "compiler": compiler, "chronicals_seconds": seconds,
        "counts": report.counts, "declined": report.declined_counts,
        "attention_detail": sorted({m.detail for m in report.matches if m.op == "attention"}),
    }


def hf_mask_info(model_spec: str, capacity: int, rows: int, device: str, seed: int = 0) -> str:
    """What transformers' create_causal_mask returns for ``rows`` copies of the checked packed
    row (sdpa, no ``attention_mask``), without and with a cache (eager: not traced)."""
    import torch
    import transformers
    from transformers.masking_utils import create_causal_mask

    from chronicals_fx.workload import MODEL_SPECS

    fields = dict(MODEL_SPECS[model_spec])
    config = getattr(transformers, fields.pop("family"))(**fields)
    config._attn_implementation = "sdpa"
    batch = checked_row(document_pieces(capacity), capacity, seed)
    embeds = torch.zeros(rows, capacity, 1, device=device)
    parts = []
    # the cache argument was renamed between transformers releases (past_key_values → cache)
    params = inspect.signature(create_causal_mask).parameters
    cache_name = "cache" if "cache" in params else "past_key_values"
    extra = ({"cache_position": torch.arange(capacity, device=device)}
             if "cache_position" in params else {})
    for label, cache in (("use_cache=False", None),
                         ("use_cache=True", transformers.DynamicCache(config=config))):
        mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None,
                                  position_ids=batch["position_ids"].expand(rows, -1).to(device),
                                  **{cache_name: cache}, **extra)
        parts.append(f"{label}: " + ("None (is_causal, across documents)" if mask is None else
                     f"{mask.dtype} {list(mask.shape)} materialized, "
                     f"{mask.numel() * mask.element_size() / 2**20:.1f} MiB"))
    return "; ".join(parts)


def attention_op(model_spec: str, capacity: int, rows: int, seed: int = 0) -> list[dict]:
    """Attention alone on the packed rows (model's heads, bf16, fwd+bwd, CUDA)."""
    import dataclasses
    import functools

    import torch

    from benchmarks.harness import OpCase, measure_case
    from benchmarks.op_cases import attention as cases
    from chronicals_fx.workload import MODEL_SPECS

    spec = MODEL_SPECS[model_spec]
    Hq, Hk = spec["num_attention_heads"], spec["num_key_value_heads"]
    D = spec.get("head_dim", spec["hidden_size"] // Hq)
    position_ids = next(iter(packed_dataset(document_pieces(capacity), rows, capacity, seed))
                        )["position_ids"].cuda()
    seg = (position_ids.flatten() == 0).nonzero().flatten().tolist() + [position_ids.numel()]
    sum_sq = sum((e - s) ** 2 for s, e in zip(seg, seg[1:]))

    def inputs():
        return (*cases._qkv(rows, capacity, Hq, Hk, D, "cuda", torch.bfloat16), position_ids)

    variants = {"eager": cases.eager_packed,
                "hf_sdpa_dense_mask": torch.compile(cases.hf_sdpa_packed),
                "triton": cases._triton_documents,
                "chronicals": cases._chronicals(cases.hf_sdpa_packed)}
    case = OpCase("attention", f"packed B={rows} T={capacity} Hq={Hq} Hk={Hk} D={D}",
                  6 * rows * capacity * D * (Hq + Hk) * 2, inputs, variants,
                  flops=int(3.5 * 4 * Hq * D * sum_sq / 2),
                  reference=capacity * capacity * rows * Hq <= 2**31)
    measure = functools.partial(measure_case, case, float("nan"))
    return [dataclasses.asdict(r) for r in measure()]


def run_checks(args) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {"variant": "checks",
           "documents": document_checks(args.model, args.seq, args.device,
                                        args.check_compiler, args.check_docs, args.seed)}
    # printed now: a later stage failing must not take these numbers with it
    print("CHECKS_DOCUMENTS " + json.dumps(out["documents"]), file=sys.stderr, flush=True)
    torch._dynamo.reset()
    try:
        out["hf_mask"] = hf_mask_info(args.model, args.seq, args.batch, args.device, args.seed)
    except Exception as exc:  # transformers' private masking API moves between releases
        out["hf_mask"] = f"not shown ({type(exc).__name__}: {exc})"
    if args.device == "cuda" and not args.no_attention_op:
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        out["attention_op"] = attention_op(args.model, args.seq, args.batch, args.seed)
    return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--seq", type=int, default=4096, help="T: row length of both layouts")
    p.add_argument("--batch", type=int, default=2, help="B: rows per batch of both layouts")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (compilation)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="*", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument("--no-checks", action="store_true", help="skip the per-document checks")
    p.add_argument("--check-compiler", default="aot_eager", choices=("inductor", "aot_eager"),
                   help="what compiles the rest of the chronicals graph in the fp32 checks "
                        "(the passes and kernels are the same; aot_eager saves ~30 s of Inductor)")
    p.add_argument("--check-docs", type=int, default=16, help="documents checked (of one row)")
    p.add_argument("--no-attention-op", action="store_true", help="skip the attention-op timing")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: a smoke run (reference kernels, fp32), no timing claims")
    p.add_argument("--timeout", type=int, default=600, help="seconds per worker process")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)    # run one variant, write JSON here
    p.add_argument("--variant", help=argparse.SUPPRESS)
    return p


def _worker_cmd(args, variant: str) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.packing", "--variant", variant]
    for key in ("model", "seq", "batch", "steps", "warmup", "lr", "seed", "check_compiler",
                "check_docs", "device"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return cmd + (["--no-attention-op"] if args.no_attention_op else [])


def _spawn(args, variant: str) -> dict:
    from chronicals_fx.bench import log_dir, spawn_worker

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    worker = spawn_worker(_worker_cmd(args, variant),
                          os.path.join(log_dir(args.json), f"packing_{variant}.log"),
                          timeout=args.timeout, env=env, cwd=ROOT)
    if worker.error:
        print(f"{variant}: failed after {worker.seconds:.0f} s ({worker.log}): {worker.error}",
              flush=True)
        return {"variant": variant, "error": worker.error, "seconds": worker.seconds}
    return {**worker.result, "seconds": worker.seconds}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        import torch

        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = run_checks(args) if args.variant == "checks" else run_variant(args)
        with open(args.worker, "w") as f:
            json.dump(result, f)
        return 0

    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks need a CUDA device (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    if not 0 <= args.warmup < args.steps:
        print(f"--warmup must be in [0, --steps): {args.warmup} vs {args.steps}", file=sys.stderr)
        return 2

    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke run, no claims)"
    header = (f"# {card}  torch {torch.__version__}  transformers {transformers.__version__}  "
              f"python {sys.version.split()[0]}  model {args.model}  B={args.batch} T={args.seq}  "
              f"steps {args.steps} (warm-up {args.warmup})")
    print(header, flush=True)
    docs = stdlib_documents()
    pieces = document_pieces(args.seq, docs)
    doc_summary = length_summary([len(d) for d in docs])
    piece_summary = length_summary([len(p) for p in pieces])
    packed = packed_dataset(pieces, args.batch, args.seq, args.seed)
    fills = {"padded": padded_fill(pieces, args.seq), "packed": packed.packing_efficiency}
    print(f"documents (stdlib top-level def/class blocks, bytes): {_fmt_summary(doc_summary)}")
    print(f"pieces (cut at T={args.seq}): {_fmt_summary(piece_summary)}")
    print(f"corpus fill at T={args.seq}: padded {fills['padded']:.1%} of each row, packed "
          f"{fills['packed']:.1%} ({packed.stats['bins']:,} rows; {len(pieces) // args.batch:,} "
          f"padded batches)", flush=True)

    results = []
    for variant in args.variants:
        r = _spawn(args, variant)
        results.append(r)
        if "error" not in r:
            print(f"{variant}: {r['tokens_per_s']:,.0f} real tok/s "
                  f"({r['tokens_per_s_at_fill']:,.0f} at corpus fill), "
                  f"{r['median_step_ms']:.1f} ms/step, {r['peak_gib']:.1f} GiB, "
                  f"loss {r['losses'][0]:.3f}->{r['losses'][-1]:.3f}, {r['seconds']:.0f} s"
                  + (f", counts {r['counts']}" if "counts" in r else ""), flush=True)
            for detail in r.get("attention_detail", []):
                print(f"  attention: {detail}")
            for reason in r.get("decline_reasons", []):
                print(f"  declined {reason}")
    checks = None if args.no_checks else _spawn(args, "checks")
    if checks and "error" not in checks:
        print(checks_text(checks), flush=True)

    print()
    print(summary_table(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"header": header, "args": vars(args), "documents": doc_summary,
                       "pieces": piece_summary, "corpus_fill": fills, "results": results,
                       "checks": checks}, f, indent=1)
    return 0


def checks_text(checks: dict) -> str:
    from tabulate import tabulate

    d = checks["documents"]
    lines = [
        f"per-document summed loss, one packed row, fp32 ({d['documents']} documents, "
        f"lengths {d['lengths']}):",
        f"  max rel diff vs each document alone: chronicals ({d['compiler']}) "
        f"{d['max_rel_diff_chronicals']:.2e}, eager HF sdpa packed "
        f"{d['max_rel_diff_eager_packed']:.2e}; eager with the config's use_cache (no document "
        f"mask) {d['max_rel_diff_default_use_cache']:.2e}",
        f"  cross-document gradient (max |d loss_doc / d embeds_other|): "
        f"{d['max_cross_document_grad']:.1e}; own-document gradient min |sum| "
        f"{d['min_own_grad']:.2e}",
        f"  chronicals attention: {'; '.join(d['attention_detail']) or 'no match'}",
        f"HF mask for packed position_ids (sdpa, no attention_mask): {checks['hf_mask']}",
    ]
    ops = checks.get("attention_op")
    if ops:
        base = {r["variant"]: r["ms"] for r in ops}.get("hf_sdpa_dense_mask", float("nan"))
        lines.append(f"attention op alone, {ops[0]['shape']}, bf16 fwd+bwd:")
        lines.append(tabulate(
            [(r["variant"], f"{r['ms']:.3f}", f"{r['tflops']:.0f}", f"{r['extra_mib']:.0f}",
              f"{r['max_rel_err']:.1e}", f"{base / r['ms']:.2f}x", r["note"]) for r in ops],
            headers=("variant", "ms", "TFLOP/s", "extra MiB", "max rel err", "vs hf sdpa mask",
                     "note")))
    return "\n".join(lines)


def summary_table(results: list[dict]) -> str:
    from tabulate import tabulate

    ok = {r["variant"]: r for r in results if "error" not in r}
    padded = next((r for v, r in ok.items() if v.startswith("padded")), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["variant"], "failed", "", "", "", "", "", "", "", r["error"][:60]))
            continue
        ratio = (f"{r['tokens_per_s'] / padded['tokens_per_s']:.2f}x / "
                 f"{r['tokens_per_s_at_fill'] / padded['tokens_per_s_at_fill']:.2f}x"
                 if padded else "")
        rows.append((r["variant"], f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s_at_fill']:,.0f}",
                     f"{r['fill_timed']:.0%} / {r['corpus_fill']:.0%}",
                     f"{r['median_step_ms']:.1f}",
                     f"{r['peak_gib']:.1f}", f"{r['losses'][0]:.3f}→{r['losses'][-1]:.3f}",
                     f"{r['min_grad_norm']:.3f}", ratio, "; ".join(r["problems"]) or "trained"))
    base = f" vs {padded['variant'].split('_', 1)[0]}" if padded else ""
    return tabulate(rows, headers=("variant", "real tok/s", "at corpus fill", "fill timed/corpus",
                                   "step ms", "peak GiB", "loss first→last", "min grad norm",
                                   f"x{base} timed/fill", "proof"))


if __name__ == "__main__":
    raise SystemExit(main())
