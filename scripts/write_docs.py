"""Regenerate what the documentation derives from the code and the reference runs:
the variants table in README.md (from the variant registry), docs/findings.md (from
results/reference/*/*/MANIFEST and summary.csv) and docs/int4.md's awq4-against-fp16 table (from
the same runs), all in the repository this script is in:

    python scripts/write_docs.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.analysis.generated_blocks import replace_block, variants_table  # noqa: E402
from bench.analysis.int4_against_fp16 import int4_table  # noqa: E402
from bench.analysis.reference import REFERENCE_ROOT, render_findings  # noqa: E402


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    readme = ROOT / "README.md"
    readme.write_text(replace_block(readme.read_text(), "variants", variants_table()))
    int4 = ROOT / "docs" / "int4.md"
    int4.write_text(replace_block(int4.read_text(), "int4-against-fp16", int4_table(ROOT / REFERENCE_ROOT)))
    findings = ROOT / "docs" / "findings.md"
    findings.parent.mkdir(exist_ok=True)
    findings.write_text(render_findings(ROOT / REFERENCE_ROOT))
    print(f"wrote {readme}, {int4}, {findings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
