"""Reference runs carry a MANIFEST generated from their env.json."""
import re
import shutil

import pytest

from bench.analysis.reference import REQUIRED_FIELDS, manifest_fields, read_manifest, reference_dirs, write_manifest
from bench.errors import UsageError
from tests.conftest import ROOT


def test_every_reference_run_has_a_manifest_generated_from_its_env_json():
    dirs = reference_dirs(ROOT / "results" / "reference")
    assert dirs
    for d in dirs:
        assert not re.search(r"-[0-9a-f]{7,40}$", d.name), f"{d.name}: the commit belongs in MANIFEST, not the name"
        assert all((d / f).is_file() for f in ("runs.csv", "summary.csv", "env.json")), d
        m = read_manifest(d)
        assert all(m.get(k) for k in REQUIRED_FIELDS), (d, m)
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", m["date"]) and re.fullmatch(r"[0-9a-f]{7,40}", m["commit"])
        fresh = manifest_fields(d, m["commit"], m["shows"])
        assert m == fresh, f"{d}: MANIFEST is not what scripts/write_manifest.py writes"


def test_write_manifest_takes_date_and_command_from_env_json(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ROOT / "results" / "reference" / "h200" / "tiny-vila-int4", run)
    (run / "MANIFEST").unlink()
    write_manifest(run, "abc1234", "what it shows")
    m = read_manifest(run)
    assert m["date"] == "2026-12-04" and m["commit"] == "abc1234" and m["shows"] == "what it shows"
    assert m["command"].startswith("python vila_prefix_benchmark.py --variants awq4,rtn4")
    assert "env_git_sha" in m  # env.json records another sha than the one given
    (run / "env.json").unlink()
    with pytest.raises(UsageError):
        write_manifest(run, "abc1234", "what it shows")
