"""What the passes matched, where, and what they declined and why."""

from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate

from .config import OP_NAMES


@dataclass(frozen=True)
class Match:
    op: str       # report key, e.g. "rmsnorm"
    where: str    # module path when known, e.g. "model.layers.0.input_layernorm"
    detail: str   # what exactly was found (dtypes, variant)
    graph: int    # which captured graph (Dynamo splits a model at graph breaks)


@dataclass(frozen=True)
class Decline:
    op: str
    where: str
    reason: str   # why the kernel can't serve it; the original subgraph runs instead
    graph: int


@dataclass
class Report:
    """Matches and declines of one or more captured graphs.

    ``counts`` has exactly the keys of :data:`chronicals_fx.config.OP_NAMES`.
    """

    matches: list[Match] = field(default_factory=list)
    declines: list[Decline] = field(default_factory=list)
    graphs: int = 0
    # Dynamo's graph breaks while the graphs were captured (``explain`` records them): reason →
    # times. The code between graphs runs eager whatever the backend, so an op in it is never
    # offered to the passes (no match, no decline): this says where such ops went.
    graph_breaks: dict[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(OP_NAMES, 0)
        for m in self.matches:
            counts[m.op] += 1
        return counts

    @property
    def declined_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(OP_NAMES, 0)
        for d in self.declines:
            counts[d.op] += 1
        return counts

    def extend(self, other: "Report") -> None:
        offset = self.graphs
        self.matches += [Match(m.op, m.where, m.detail, m.graph + offset) for m in other.matches]
        self.declines += [Decline(d.op, d.where, d.reason, d.graph + offset) for d in other.declines]
        self.graphs += other.graphs
        for reason, times in other.graph_breaks.items():
            self.graph_breaks[reason] = self.graph_breaks.get(reason, 0) + times

    def __str__(self) -> str:
        summary = tabulate(
            [(op, self.counts[op], self.declined_counts[op]) for op in OP_NAMES],
            headers=("op", "matched", "declined"),
        )
        parts = [f"chronicals report: {self.graphs} graph(s)", summary]
        if self.matches:
            parts.append(tabulate([(m.op, m.where, m.detail) for m in self.matches],
                                  headers=("matched", "where", "detail")))
        if self.declines:
            parts.append(tabulate([(d.op, d.where, d.reason) for d in self.declines],
                                  headers=("declined", "where", "reason")))
        if self.graph_breaks:
            parts.append(tabulate(
                [(times, reason.strip().splitlines()[0]) for reason, times in
                 self.graph_breaks.items()],
                headers=("graph breaks", "Dynamo's reason (the code between graphs runs eager, "
                                         "with any backend)")))
        return "\n\n".join(parts)
