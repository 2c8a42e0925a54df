"""Engine knobs are one frozen EngineSpec per engine: each class has its default, a run's options
replace fields of it (variants.base.EnginePart.spec), and nothing is process-wide."""
import dataclasses

import pytest

from bench.engines.spec import PREFILL_ROUND, SUFFIX_BUCKETS, EngineSpec
from bench.errors import UsageError
from variants import registry


def test_each_engine_has_its_default_spec_and_takes_the_runs_options():
    parts = registry()
    specs = {name: parts[name].spec() for name in ("hf", "static", "graph", "graph-exact")}
    assert specs["hf"] == specs["static"] == EngineSpec()
    assert specs["graph"].numerics == "eager-casts" and specs["graph"].prefill_round == PREFILL_ROUND
    assert specs["graph"].fused_max_rows > 2**60 and not specs["graph"].concurrent_projections
    exact = specs["graph-exact"]
    assert (exact.numerics, exact.prefill_round, exact.fused_max_rows, exact.concurrent_projections) == \
        ("eager-exact", 1, EngineSpec().fused_max_rows, True)
    assert all(s.suffix_buckets == SUFFIX_BUCKETS and s.attention == "deterministic" for s in specs.values())
    run = parts["graph-exact"].spec(attention="auto", int4_prefetch=False)
    assert (run.attention, run.int4_prefetch, run.numerics) == ("auto", False, "eager-exact")
    assert parts["graph-exact"].spec() == exact  # the class default is not changed by a run's options
    with pytest.raises(dataclasses.FrozenInstanceError):
        exact.numerics = "fused"


def test_spec_refuses_unknown_values():
    with pytest.raises(UsageError, match="attention-kernels"):
        EngineSpec(attention="fastest")
    with pytest.raises(ValueError, match="numerics"):
        EngineSpec(numerics="fast")
    with pytest.raises(ValueError, match="ascending"):
        EngineSpec(suffix_buckets=(32, 16))
    assert EngineSpec(suffix_buckets=[8, 24]).suffix_buckets == (8, 24)
