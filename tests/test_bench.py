"""``moe_replay.bench``'s result files: ``write_json`` (every benchmark's ``--json``), ``append_records``
(the JSON-lines files of ``benchmarks/results/``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_replay.bench import append_records, write_json


def test_write_json_replaces_the_file_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_json(path, {"cases": [1, 2]})
    assert json.loads(path.read_text()) == {"cases": [1, 2]}
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(path, {"cases": [object()]})  # fails halfway through the dump
    assert json.loads(path.read_text()) == {"cases": [1, 2]}  # the last complete results
    write_json(str(path), {"cases": []})
    assert json.loads(path.read_text()) == {"cases": []}


def test_append_records_keeps_the_old_lines_and_adds_one_per_record(tmp_path: Path) -> None:
    path = tmp_path / "bench.jsonl"
    append_records(path, [{"impl": "a"}])
    append_records(path, [{"impl": "b"}, {"impl": "c"}])
    assert [json.loads(line)["impl"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
    with pytest.raises(TypeError, match="not JSON serializable"):
        append_records(path, [{"impl": object()}])
    assert len(path.read_text().splitlines()) == 3  # a failed append leaves the file as it was


def test_the_results_files_hold_one_record_per_line_with_the_common_fields() -> None:
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    files = sorted(results.glob("*.jsonl"))
    assert files and not list(results.glob("*.json"))
    for path in files:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            assert {"commit", "gpu", "shape", "impl", "figures"} <= record.keys(), (path.name, record)
