"""Export from a real single-rank DeepSpeed ZeRO-3 training checkpoint (so the consolidation path
runs): the bundle's model reproduces the engine's own logits, verification ran on the run's real
history rows, a bf16 export passes its tolerance, and ``moe-rec export`` works and fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_rec.cli import main
from moe_rec.export import BundleError, export_checkpoint, load_bundle
from moe_rec.serve import Recommender
from moe_rec.serve.config import ServeConfig
from moe_rec.sid.table import SIDTable
from tests.train.conftest import tiny_config, write_catalogue, write_sequences

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A run directory as the pipeline leaves it: sequences, SID table, catalogue, ZeRO-3 checkpoint."""
    from moe_rec.train import train

    run = tmp_path_factory.mktemp("zero3") / "run"
    write_sequences(run)
    write_catalogue(run)
    summary = train(tiny_config(run, "train.deepspeed=configs/deepspeed/zero3.json"))
    return run, summary


def test_export_reproduces_the_deepspeed_engine(trained: tuple[Path, dict], tmp_path: Path) -> None:
    run, summary = trained
    out = export_checkpoint(run / "checkpoints", tmp_path / "fp32")
    manifest = json.loads((out / "manifest.json").read_text())
    best = (run / "checkpoints" / "best").read_text().strip()
    assert manifest["source"]["tag"] == best and manifest["source"]["step"] == 8
    v = manifest["verification"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-5 and v["probe_source"].startswith("sequences/valid/")
    model = load_bundle(out).model
    with torch.no_grad():  # the engine's own logits on its probe batch, recorded during training
        logits = model(**summary["probe"]["batch"]).logits[:2]
    # fp32 both; the engine ran the same weights inside DeepSpeed (another summation order allowed)
    torch.testing.assert_close(logits, summary["probe"]["logits"], rtol=1e-5, atol=1e-5)

    bf16 = export_checkpoint(run / "checkpoints", tmp_path / "bf16", tag="latest", dtype="bfloat16")
    v = json.loads((bf16 / "manifest.json").read_text())["verification"]
    assert v["passed"] and 0 < v["max_abs_diff"] <= v["tolerance"]["max_abs_diff"]
    with Recommender.from_bundle(bf16, ServeConfig(device="cpu")) as rec:
        got = rec.recommend([("grocery", "1"), ("market", "4"), ("grocery", "2")], "grocery", k=5)
        assert len({r.item_id for r in got}) == 5 and {"1", "2"}.isdisjoint(r.item_id for r in got)
        assert got[0].fields["title"] == f"grocery {got[0].item_id}"


def test_missing_parts_are_bundle_errors(trained: tuple[Path, dict], tmp_path: Path) -> None:
    run, _ = trained
    with pytest.raises(BundleError, match="checkpoint directory not found"):
        export_checkpoint(tmp_path / "nope", tmp_path / "b")
    with pytest.raises(BundleError, match="no 'best' pointer"):
        export_checkpoint(tmp_path, tmp_path / "b")  # a directory without checkpoints
    with pytest.raises(BundleError, match="sid_table.json") as err:
        export_checkpoint(run / "checkpoints", tmp_path / "b", run_dir=tmp_path)
    assert "SID table metadata not found" in str(err.value)
    with pytest.raises(BundleError, match="moe-rec data prepare"):
        (tmp_path / "sids").mkdir()
        SIDTable.load(run / "sids").save(tmp_path / "sids")
        export_checkpoint(run / "checkpoints", tmp_path / "b", run_dir=tmp_path)
    assert not (tmp_path / "b").exists()


def test_cli_export(trained: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, _ = trained
    args = [
        "export",
        "--checkpoint",
        str(run / "checkpoints"),
        "--out",
        str(tmp_path / "b"),
        "--tag",
        "latest",
    ]
    assert main(args) == 0
    said = capsys.readouterr()
    assert "logits vs the fp32 checkpoint on 16 prompts: max |diff| 0 " in " ".join(
        (said.out + said.err).split()
    )
    assert load_bundle(tmp_path / "b").manifest["source"]["tag"] == "step_00000008"
    assert main(args) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--dtype", "bfloat16"]) == 0
    assert load_bundle(tmp_path / "b").manifest["dtype"] == "bfloat16"
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "checkpoint directory not found" in " ".join(err.split())
    # a run_dir override moves where the SID table is looked for: there is none there
    assert main(["export", "--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "c"),
                 f"run_dir={tmp_path}"]) == 2  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("error:") == 1 and f"{tmp_path}/sids/sid_table.json: SID table metadata not found" in err
