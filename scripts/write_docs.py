"""Regenerate what the documentation derives from the code and the reference runs:
the variants table in README.md (from the variant registry) and docs/findings.md (from
results/reference/*/*/MANIFEST and summary.csv). Run from the repository root:

    python scripts/write_docs.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.analysis.generated_blocks import replace_block, variants_table  # noqa: E402
from bench.analysis.reference import REFERENCE_ROOT, render_findings  # noqa: E402


def main() -> int:
    readme = Path("README.md")
    readme.write_text(replace_block(readme.read_text(), "variants", variants_table()))
    findings = Path("docs/findings.md")
    findings.parent.mkdir(exist_ok=True)
    findings.write_text(render_findings(REFERENCE_ROOT))
    print(f"wrote {readme}, {findings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
