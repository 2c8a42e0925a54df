"""`vlm-bench docs`: regenerate results/README.md from the metric table."""
from __future__ import annotations


def main(argv: list[str]) -> int:
    """Regenerate results/README.md's column tables from bench.measure.schema."""
    from bench.analysis.docs import write_results_readme

    path = write_results_readme(argv[0] if argv else "results/README.md")
    print(f"wrote {path}")
    return 0
