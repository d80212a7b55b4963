"""scripts/bench_dino_options.py: a tiny CPU run times every variant in every round and writes their ratios."""

import json

import pytest

from scripts import bench_dino_options
from tests.fixtures import run_module, write_fmnist


def test_tiny_run_writes_one_row_per_variant_with_a_ratio_per_round(tmp_path, capsys):
    data_root = write_fmnist(tmp_path / "data", train=32, test=8)
    out = tmp_path / "options.json"
    tiny = ["--override", f"data.root={data_root}", "--override", "data.batch_size=8", "--override",
            "augment.local_crops=1", "--override", "backbone.kwargs.stem=stride2", "--override",
            "backbone.kwargs.width=8", "--override", "method.kwargs.out_dim=32"]
    assert run_module("scripts.bench_dino_options", "--steps", "1", "--rounds", "2", *tiny, "--json", str(out)) == 0
    assert "| koleo |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [row["variant"] for row in rows] == ["off", "sinkhorn", "koleo"]
    for clock in ("wall", "cpu"):
        assert rows[0][clock]["ratios"] == [1.0, 1.0] and rows[0][clock]["median_ratio_to_off"] == 1.0
        assert all(len(row[clock]["ratios"]) == 2 and row[clock]["median_s_per_step"] > 0 for row in rows)
    assert rows[1]["overrides"] == ["method.kwargs.centering=sinkhorn"]


def test_a_variant_without_overrides_is_refused():
    with pytest.raises(SystemExit, match="expected NAME=KEY=VALUE"):
        bench_dino_options.main(["--variant", "sinkhorn"])
