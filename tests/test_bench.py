"""``moe_replay.bench.write_json``, which every benchmark writes its results with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_replay.bench import write_json


def test_write_json_replaces_the_file_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_json(path, {"cases": [1, 2]})
    assert json.loads(path.read_text()) == {"cases": [1, 2]}
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(path, {"cases": [object()]})  # fails halfway through the dump
    assert json.loads(path.read_text()) == {"cases": [1, 2]}  # the last complete results
    write_json(str(path), {"cases": []})
    assert json.loads(path.read_text()) == {"cases": []}
