"""scripts/bench_pretrain.py: a tiny CPU run writes one well-formed record per set-up; a failed compile is recorded."""

import json

import pytest
import torch

from scripts import bench_pretrain
from tests.fixtures import run_module

TINY = ["--device", "cpu", "--steps", "2", "--warmup", "1", "--profile-steps", "1", "--batch-size", "8"]


def test_tiny_cpu_run_writes_one_record_per_setup(tmp_path, capsys):
    out = tmp_path / "pretrain.json"
    setups = ["byol_ours", "byol_reference", "dino_ours"]
    # Cheaper models, one override per method: the ResNet's usual stem (an 8x8 map after it), 8 px ViT patches.
    smaller = ["--override", "byol:backbone.kwargs.stem=imagenet", "--override", "dino:backbone.kwargs.patch_size=8"]
    # `python -m scripts.bench_pretrain ...` in this process (its reference still starts a DataLoader worker)
    assert run_module("scripts.bench_pretrain", *TINY, "--workers", "1", "--setups", *setups, *smaller,
                      "--json", str(out)) == 0
    stdout = capsys.readouterr().out
    assert "images/s" in stdout and all(name in stdout for name in setups)

    report = json.loads(out.read_text())
    assert report["environment"]["torch"] == torch.__version__
    assert report["environment"]["reference_precision"] == "fp32"  # solo-learn's CPU default
    assert report["environment"]["overrides"] == smaller[1::2]
    records = report["results"]
    assert [r["name"] for r in records] == setups
    for r in records:
        assert r["error"] is None
        assert r["images_per_s"] > 0 and r["step_ms"] > 0
        assert (r["device"], r["torch"], r["batch_size"], r["steps"]) == ("cpu", torch.__version__, 8, 2)
        assert set(r["split_ms"]) == set(bench_pretrain.PHASES) and all(ms >= 0 for ms in r["split_ms"].values())
        assert set(r["share"]) == {"data", "forward_backward", "optimizer", "ema"}
        assert sum(r["share"].values()) == pytest.approx(1.0)
        assert r["precision"] == "fp32" and r["channels_last"] is False  # CPU: no autocast, NCHW
        assert "peak_gpu_memory_mib" not in r
    byol, reference, dino = records
    assert byol["views"] == [32, 32] and dino["views"] == [32, 32] + [16] * 6
    assert reference["vs_reference"] == 1.0
    assert byol["vs_reference"] == pytest.approx(byol["images_per_s"] / reference["images_per_s"], rel=1e-2)
    assert dino["vs_reference"] is None  # no DINO reference in this run
    assert "per-tensor" in reference["ema"] and "ssl.ema" in byol["ema"]


def test_a_failed_compile_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken_compile(model, *args, **kwargs):
        def forward(*inputs, **options):
            raise RuntimeError("no working C++ compiler\nfound")

        return forward

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "pretrain.json"
    bench_pretrain.main([*TINY, "--setups", "byol_compiled", "--json", str(out)])
    (record,) = json.loads(out.read_text())["results"]
    assert record["name"] == "byol_compiled" and record["compiled"] is True
    assert record["error"] == "RuntimeError: no working C++ compiler found"
    assert record["images_per_s"] is None and record["vs_reference"] is None


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        bench_pretrain.parse_args(["--device", "cpu", "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):
        bench_pretrain.parse_args(["--setups", "byol_fastest"])
    assert "invalid choice: 'byol_fastest'" in capsys.readouterr().err
