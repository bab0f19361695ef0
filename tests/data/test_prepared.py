"""PreparedData / open_prepared on a missing experiment and the report format."""

import pytest

from nexus.data.prepared import DomainData, PreparedData, SplitStats, format_report, open_prepared
from nexus.errors import DataError


def test_open_prepared_without_manifest_names_the_directory(tmp_path):
    with pytest.raises(DataError, match=f"no prepared data at {tmp_path}"):
        open_prepared(tmp_path)


def test_unknown_domain_or_split(tmp_path):
    data = PreparedData(tmp_path, "exp", 8, "fp", {"a": DomainData("a", False, "f", {})})
    with pytest.raises(DataError, match="domain 'b' is not in experiment 'exp'"):
        data.packed("b")
    with pytest.raises(DataError, match="split 'dev'"):
        data.packed("a", "dev")


def test_report_lists_every_split():
    splits = {
        "train": SplitStats(10, 400, 1000),
        "validation": SplitStats(1, 40, 100),
        "test": SplitStats(1, 50, 120),
    }
    data = PreparedData(None, "exp", 8, "fp", {"a": DomainData("a", True, "f", splits)})
    lines = format_report(data).splitlines()
    assert lines[1].split() == ["a", "train", "10", "400", "1,000", "2.50", "(held", "out)"]
    assert len(lines) == 4
