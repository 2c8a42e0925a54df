"""The sweep plan: the run's cross product as a list of jobs.

A job is the work that shares one loaded model: consecutive variants (in --variants order,
crossed with --engine) whose weights part loads the same weights, each with every workload
point. The serial runner runs the jobs in order; the local and Ray executors run them in
worker processes, largest first (bench.run.executors)."""
from __future__ import annotations

from dataclasses import dataclass

from variants import parse_variant


@dataclass(frozen=True)
class Job:
    index: int  # position in the plan (the serial order)
    weights: str  # the weights part loaded once for the job's variants
    variants: tuple[int, ...]  # indices into the run's variant specs
    specs: tuple[str, ...]  # those specs
    points: int  # workload points each variant measures

    @property
    def size(self) -> int:
        """Measurement groups in the job (variants x points): what "largest first" orders by."""
        return len(self.variants) * self.points

    def label(self) -> str:
        return f"{self.weights}: {', '.join(self.specs)}"


def build_plan(cfg) -> list[Job]:
    """The jobs of a run config, in the order the serial runner measures them."""
    jobs: list[Job] = []
    group: list[int] = []
    specs = cfg.variant_specs
    last_key = None

    def close():
        if group:
            weights = parse_variant(specs[group[0]]).weights.name
            jobs.append(Job(len(jobs), weights, tuple(group), tuple(specs[i] for i in group), len(cfg.points)))

    for i, spec in enumerate(specs):
        weights = parse_variant(spec).weights
        key = weights.key(weights.options(cfg))
        if group and key != last_key:
            close()
            group = []
        group.append(i)
        last_key = key
    close()
    return jobs


def largest_first(jobs: list[Job]) -> list[Job]:
    """The order workers take jobs in: most measurement groups first, plan order among equals."""
    return sorted(jobs, key=lambda j: (-j.size, j.index))
