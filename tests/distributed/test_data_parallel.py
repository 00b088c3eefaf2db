"""DDP and FSDP2 with the chronicals backend, two CPU processes over gloo: the rewritten graphs
(rewritten whole, then split by DDP's optimizer at gradient-bucket boundaries; or cut at FSDP2's
per-layer hooks; or, with hookless sharding (benchmarks/simple_fsdp.py), one graph) train
exactly like one process with the same global batch, with and without activation checkpointing. Under DDP every site of every layer is found however many pieces the
graph is cut into (chronicals_fx/ddp.py); one process with DDP's graph splitter shows a piece
holds nothing the passes could still rewrite. LoRA+ parameter groups of a fully sharded PEFT
model."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3
_SIZE = {25.0: {}, 1.0: dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(steps: int):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 96, (2 * WORLD, 16), generator=g) for _ in range(steps)]


def _model(size: dict, checkpointing: bool):
    from chronicals_fx.workload import enable_activation_checkpointing
    from tests.tiny_models import tiny_causal_lm

    model = tiny_causal_lm("llama", **size)
    # Training: no KV cache. With one, transformers skips its packed-sequence check and, on
    # the torch installed here (2.13), builds no causal mask under compile, so attention would
    # not be exercised; and every layer's graph guards on its layer_idx (the cache update), a
    # recompile per layer under FSDP2. Without one, the mask is built from the position ids.
    model.config.use_cache = False
    return enable_activation_checkpointing(model) if checkpointing else model


def _train(model, batches, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for ids in batches:
        part = ids.chunk(world)[rank]
        loss = model(input_ids=part, labels=part).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def _worker(rank: int, port: int, engine: str, bucket_mb: float, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch._dynamo.backends.distributed import DDPOptimizer

        import chronicals

        pieces = []   # how many pieces DDP's optimizer cut each graph into
        split = DDPOptimizer.compile_fn

        def counting(self, *args, **kwargs):
            compiled = split(self, *args, **kwargs)
            pieces.append(len(self.buckets))
            return compiled

        DDPOptimizer.compile_fn = counting
        results = {}
        # The checkpointed run shares the processes (spawning costs CI time) and compiles with
        # "eager" (the rewritten graphs op by op, each region run by torch.utils.checkpoint):
        # AOTAutograd through checkpointed regions is tested in one process
        # (tests/passes/test_checkpointing.py); here it would double the compile time.
        for checkpointing in _CHECKPOINTING[engine, bucket_mb]:
            torch._dynamo.reset()
            pieces.clear()
            model = _model(_SIZE[bucket_mb], checkpointing)
            wrapped = _wrapped(model, engine, bucket_mb)
            chronicals.optimize(wrapped, strict=True,
                                compiler="eager" if checkpointing else "aot_eager")
            losses = _train(wrapped, _batches(STEPS), rank, WORLD)
            dist.all_reduce(losses)
            params = [p.full_tensor() if hasattr(p, "full_tensor") else p
                      for p in model.parameters()]
            report = chronicals.report_of(wrapped)
            results[checkpointing] = (losses / WORLD, [p.detach() for p in params],
                                      report.counts, report.graphs, report.declines,
                                      list(pieces), _dynamo_traces_the_layers(
                                          engine, bucket_mb, checkpointing))
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _wrapped(model, engine: str, bucket_mb: float):
    if engine == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # a CPU mesh: without one FSDP2 shards onto the accelerator when there is one
    mesh = init_device_mesh("cpu", (WORLD,))
    if engine == "simple_fsdp":
        from benchmarks.simple_fsdp import shard_parameters

        return shard_parameters(model, mesh)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _dynamo_traces_the_layers(engine: str, bucket_mb: float, checkpointing: bool) -> bool:
    """Whether Dynamo itself, under a backend that only records, puts a decoder layer's MLP
    (its SiLU) in any graph of this setup. torch 2.11 does not for FSDP2-sharded layers under
    activation checkpointing: it breaks on FSDP2's torch._dynamo.disable'd hooks inside the
    checkpoint's higher-order op and runs those layers eager, whatever the backend."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = _model(_SIZE[bucket_mb], checkpointing)
    ids = _batches(1)[0].chunk(WORLD)[dist.get_rank()]
    torch.compile(_wrapped(model, engine, bucket_mb), backend=record)(
        input_ids=ids, labels=ids).loss.backward()
    torch._dynamo.reset()
    # (checkpointed regions are subgraphs of a higher-order op: submodules of the graph)
    return any("silu" in str(node.target) for gm in graphs for sub in gm.modules()
               if isinstance(sub, torch.fx.GraphModule) for node in sub.graph.nodes)


def _reference(size: dict):
    """One process, the global batch: its mean loss is the mean of the ranks' mean losses
    (equal halves), so its gradients are the ranks' averaged ones."""
    reference = _model(size, checkpointing=False)
    losses = []
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for ids in _batches(STEPS):
        loss = sum(reference(input_ids=p, labels=p).loss for p in ids.chunk(WORLD)) / WORLD
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), list(reference.parameters())


# 25 MB: one bucket, one graph. 1 MB (the smallest DDP's optimizer accepts) on a 13 MB model:
# Dynamo's DDP optimizer cuts the graph at about a dozen bucket boundaries, which would fall
# inside matched patterns and put the causal mask in another piece than most layers, were the
# graph not rewritten whole first. Checkpointed too where the engine cuts graphs (one DDP graph
# with checkpointed layers is the single-process case).
_CHECKPOINTING = {("ddp", 25.0): (False,), ("ddp", 1.0): (False, True),
                  ("fsdp2", 25.0): (False, True), ("simple_fsdp", 25.0): (False, True)}


def _all_sites(layers: int) -> dict[str, int]:
    return {"rmsnorm": 2 * layers + 1, "swiglu": layers, "rope": layers, "attention": layers,
            "linear_cross_entropy": 1, "lora": 0, "projections": layers}


@pytest.mark.parametrize("engine,bucket_mb", [("ddp", 25.0), ("ddp", 1.0), ("fsdp2", 25.0),
                                              ("simple_fsdp", 25.0)])
def test_data_parallel_matches_single_process(engine, bucket_mb, tmp_path):
    ref_losses, ref_params = _reference(_SIZE[bucket_mb])
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(_free_port(), engine, bucket_mb, out), nprocs=WORLD,
                       start_method="spawn")
    results = torch.load(out, weights_only=False)
    for checkpointing, (losses, params, *_) in results.items():
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, c=checkpointing: f"checkpointing={c}: {m}")
        for p, q in zip(params, ref_params, strict=True):
            torch.testing.assert_close(p, q.detach(), rtol=1e-4, atol=1e-5)

    layers = _SIZE[bucket_mb].get("num_hidden_layers", 2)
    for checkpointing, (_, _, counts, graphs, declines, pieces, traced) in results.items():
        where = f"checkpointing={checkpointing}"
        if not traced:
            # torch 2.11, FSDP2 with checkpointing (see _dynamo_traces_the_layers): the layers
            # run eager with any backend; what Dynamo compiles around them (the final norm, the
            # loss) is matched in full. torch 2.13 traces them (the branches below).
            assert engine == "fsdp2" and checkpointing, (where, "Dynamo left the layers eager")
            assert counts == {"rmsnorm": 1, "swiglu": 0, "rope": 0, "attention": 0,
                              "linear_cross_entropy": 1, "lora": 0, "projections": 0}, (where, counts)
            assert not declines, (where, declines)
        elif engine == "simple_fsdp":
            # No hooks (benchmarks/simple_fsdp.py): Dynamo traces the parameters' all-gathers
            # into one graph with every layer, the causal mask built inside it: every site,
            # checkpointed or not (a layer's gathers run where its weights are read, inside
            # its checkpointed region).
            assert graphs == 1 and counts == _all_sites(layers), (where, graphs, counts)
            assert not declines, (where, declines)
        elif engine == "ddp":
            # One Dynamo graph, rewritten whole before DDP's optimizer cut it: every site of
            # every layer is found (the causal mask, built before the first layer, is proven
            # for all of them), nothing is declined, and the report counts the graph once.
            # With checkpointing the passes enter each layer's region as in one process.
            assert graphs == 1 and counts == _all_sites(layers), (where, graphs, counts)
            assert not declines, (where, declines)
            assert pieces and (max(pieces) > 2 if bucket_mb == 1.0 else pieces == [1]), \
                (where, pieces)
        else:
            # FSDP2's hooks are torch._dynamo.disable'd, so Dynamo breaks at every sharded
            # layer and compiles the layer's forward as a frame of its own, shared by both
            # layers (one RMSNorm pair, SwiGLU, RoPE for the two), besides the frames around
            # them (the mask, rotary tables, final norm, loss). The causal mask is the layer
            # frame's input, a runtime tensor no graph of it can prove: attention declines
            # once, and SDPA keeps the mask (README "Several GPUs" says what to do).
            assert counts == {"rmsnorm": 3, "swiglu": 1, "rope": 1, "attention": 0,
                              "linear_cross_entropy": 1, "lora": 0, "projections": 1}, (where, counts)
            assert [d.op for d in declines] == ["attention"], (where, declines)
            assert "runtime" in declines[0].reason, declines


def test_ddp_rewrites_the_whole_graph_once_and_pieces_hold_nothing_more(monkeypatch):
    """One process, DDP over a gloo group of one (Dynamo's DDP optimizer still cuts the graph),
    the backend by name with options: the options reach the whole-graph rewrite (SwiGLU off),
    the report has one graph, the pieces are compiled without the passes, and running the
    passes again on each piece finds and changes nothing. Loss and gradients are eager's."""
    import copy
    import functools

    from chronicals_fx import backend
    from chronicals_fx.config import Config
    from chronicals_fx.ddp import chronicals_bound
    from chronicals_fx.passes import run_pipeline

    assert chronicals_bound("aot_eager") is None
    assert chronicals_bound(functools.partial(backend.chronicals_backend, None)) is None
    options = {"compiler": "eager", "strict": True,
               "passes": ("rmsnorm", "rope", "attention", "linear_cross_entropy")}
    reruns = []
    seen = backend.rewritten

    def rerun(gm):   # the backend asks this of every graph; a piece says True
        if seen(gm):
            before = str(gm.graph)
            reruns.append((run_pipeline(gm, Config(**options)), str(gm.graph) == before))
            return True
        return False

    monkeypatch.setattr(backend, "rewritten", rerun)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1)
    try:
        layers = _SIZE[1.0]["num_hidden_layers"]
        model = _model(_SIZE[1.0], checkpointing=False)
        reference = copy.deepcopy(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
        compiled = torch.compile(ddp, backend="chronicals", options=options)
        backend.reset()     # the list keeps the last 64 reports: earlier tests may have filled it
        ids = _batches(1)[0]
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        reference_loss = reference(input_ids=ids, labels=ids).loss
        reference_loss.backward()
    finally:
        dist.destroy_process_group()

    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    new = list(backend.RECENT_REPORTS)
    assert [r.graphs for r in new] == [1], new
    assert new[0].counts == {**_all_sites(layers), "swiglu": 0, "projections": 0}, new[0].counts
    assert not new[0].declines, new[0].declines
    assert len(reruns) > 2, len(reruns)   # pieces
    for report, unchanged in reruns:
        assert not report.matches and not report.declines and unchanged, report


def test_loraplus_groups_of_a_fully_sharded_peft_model():
    """LoRA+ finds A and B among FSDP2's DTensor parameters (one process, a gloo group of
    one), and a step moves exactly the factors it should: B starts at 0, so A's first
    gradient is 0 and only B changes."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from chronicals_fx.runtime import create_loraplus_optimizer
    from tests.tiny_models import batch, tiny_causal_lm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1)
    try:
        model = get_peft_model(tiny_causal_lm("llama"),
                               LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        mesh = init_device_mesh("cpu", (1,))   # not the accelerator's, when there is one
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-2, ratio=16.0)
        groups = {g["name"]: g for g in opt.param_groups}
        assert {n: (g["lr"], len(g["params"])) for n, g in groups.items()} == {
            "lora_A": (1e-2, 14), "lora_B": (0.16, 14)}   # 7 adapted linears in 2 layers
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert {id(p) for g in groups.values() for p in g["params"]} == trainable
        assert all(type(p).__name__ == "DTensor" for g in groups.values() for p in g["params"])

        before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
        model(**batch()).loss.backward()
        opt.step()
        for name, p in model.named_parameters():
            moved = not torch.equal(p.full_tensor(), before[name])
            assert moved == ("lora_B" in name), name
    finally:
        dist.destroy_process_group()
