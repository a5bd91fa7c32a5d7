"""The bundle round trip from an in-memory model: every file listed with its real checksum, the
weights stored in the asked dtype, logits equal to the model's, the catalogue aligned with the SID
table; a changed, missing or unknown file refused by name; bad inputs refused before writing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors import safe_open

from moe_rec.data.vocab import Vocabulary
from moe_rec.export import BundleError, export_model, load_bundle
from moe_rec.export import bundle as bundle_mod
from tests.serve.conftest import SERVICES, make_bundle, tiny_catalogue, tiny_model, tiny_table

EXPECTED_FILES = {
    "catalogue.parquet", "vocab.json", "model/config.json", "model/generation_config.json",
    "model/model.safetensors", "sids/sid_table.json", "sids/sid_table.parquet", "sids/sid_trie.safetensors",
}  # fmt: skip


def _logits(model: torch.nn.Module, ids: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    users = torch.arange(ids.shape[0]) % model.config.num_user_buckets
    with torch.no_grad():
        return model(ids, domains, user_ids=users).logits.float()


def _inputs(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(8, vocab_size, (3, 12), generator=g)
    return ids, torch.randint(0, len(SERVICES), (3, 12), generator=g)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip(tmp_path: Path, dtype: str) -> None:
    table = tiny_table()
    vocab = table.vocabulary()
    model = tiny_model(vocab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export_model(model, table, vocab, tiny_catalogue(table), tmp_path / "b", dtype=dtype,
                       source={"checkpoint": "mem"})  # fmt: skip
    untouched = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert untouched  # export works on a copy
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == EXPECTED_FILES
    for name, entry in manifest["files"].items():  # checksums recomputed here, independently
        data = (out / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, name
    assert manifest["dtype"] == dtype and manifest["source"] == {"checkpoint": "mem"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["items"]["per_service"] == dict.fromkeys(SERVICES, 50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary directory left
    with safe_open(str(out / "model/model.safetensors"), framework="pt") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert stored == {"F32" if dtype == "float32" else "BF16"}

    b = load_bundle(out)
    assert next(b.model.parameters()).dtype == bundle_mod.DTYPES[dtype]
    ids, domains = _inputs(vocab.size)
    ref, got = _logits(model, ids, domains), _logits(b.model, ids, domains)
    if dtype == "float32":  # the same weights and the same computation: equal bit for bit (measured)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    else:  # bf16 weights: close to the fp32 model, but not equal (the dtype really changed)
        assert 0 < (got - ref).abs().max() < 0.05 * ref.abs().max()
    v = manifest["verification"]
    assert (
        v["passed"]
        and v["probes"] == bundle_mod.PROBES
        and v["max_abs_diff"] <= v["tolerance"]["max_abs_diff"]
    )
    assert (v["max_abs_diff"] == 0.0) == (dtype == "float32")
    # the catalogue is the table's items in table order, with their own fields (the extra item dropped)
    assert b.catalogue.column("item_id").to_pylist() == table.item_ids.tolist()
    source = {(r["service"], r["item_id"]): r for r in tiny_catalogue(table).to_pylist()}
    assert b.catalogue.to_pylist() == [
        source[(s, i)] for s, i in zip(b.catalogue.column("service").to_pylist(), table.item_ids)
    ]
    assert torch.equal(b.table.codes, table.codes) and b.vocab == vocab
    assert [torch.equal(p, q) for p, q in zip(b.trie.prefixes, table.trie().prefixes)] == [True] * 3


def _set_manifest(bundle: Path, **fields: object) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, **fields}))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, name, problem",
    [
        (lambda b: _flip_byte(b / "model/model.safetensors"), "model/model.safetensors", "checksum"),
        (lambda b: _flip_byte(b / "sids/sid_table.parquet"), "sids/sid_table.parquet", "checksum"),
        (lambda b: _flip_byte(b / "catalogue.parquet"), "catalogue.parquet", "checksum"),
        (lambda b: (b / "vocab.json").unlink(), "vocab.json", "missing"),
        (lambda b: (b / "sids/sid_trie.safetensors").unlink(), "sids/sid_trie.safetensors", "missing"),
        (lambda b: (b / "model/extra.bin").write_bytes(b"x"), "model/extra.bin", "unknown file"),
        (lambda b: (b / "manifest.json").unlink(), "manifest.json", "missing"),
        (lambda b: (b / "manifest.json").write_text("{"), "manifest.json", "unreadable"),
        (lambda b: _set_manifest(b, model_kind="item"), "manifest.json", "model_kind"),
    ],
    ids=[
        "weights",
        "sid-table",
        "catalogue",
        "no-vocab",
        "no-trie",
        "extra",
        "no-manifest",
        "bad-manifest",
        "wrong-kind",
    ],  # fmt: skip
)
def test_damaged_bundle_is_refused_naming_the_file(
    tiny_bundle: Path, tmp_path: Path, damage, name: str, problem: str
) -> None:
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    load_bundle(copy)  # intact
    damage(copy)
    with pytest.raises(BundleError, match=problem) as err:
        load_bundle(copy)
    assert err.value.path == copy / name


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    table = tiny_table()
    vocab = table.vocabulary()
    model = tiny_model(vocab)
    catalogue = tiny_catalogue(table)
    short = catalogue.filter(catalogue.column("item_id").to_numpy(zero_copy_only=False) != "grocery-7")
    with pytest.raises(BundleError, match=r"1 items of the SID table are not in the catalogue.*grocery-7"):
        export_model(model, table, vocab, short, tmp_path / "b")
    with pytest.raises(BundleError, match="twice"):
        export_model(
            model, table, vocab, pa.concat_tables([catalogue, catalogue.slice(0, 1)]), tmp_path / "b"
        )
    other = Vocabulary(services=("a", "b", "c"), levels=2, codebook_size=8, dedup_size=4)
    with pytest.raises(BundleError, match="does not match the SID table"):
        export_model(model, table, other, catalogue, tmp_path / "b")
    with pytest.raises(BundleError, match="dtype 'float16'"):
        export_model(model, table, vocab, catalogue, tmp_path / "b", dtype="float16")
    assert list(tmp_path.iterdir()) == []
    make_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="already exists"):
        make_bundle(tmp_path / "b")
    first = json.loads((tmp_path / "b/manifest.json").read_text())["created"]
    export_model(model, table, vocab, catalogue, tmp_path / "b", overwrite=True)
    assert load_bundle(tmp_path / "b").manifest["created"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_export_that_does_not_reproduce_the_model_is_refused(tmp_path: Path, monkeypatch) -> None:
    """bf16 rounding with a zero tolerance must fail verification and leave nothing behind."""
    monkeypatch.setitem(
        bundle_mod.TOLERANCE, "bfloat16", {**bundle_mod.TOLERANCE["bfloat16"], "max_abs_diff": 0.0}
    )
    table = tiny_table()
    vocab = table.vocabulary()
    with pytest.raises(
        BundleError, match=r"logits differ from the fp32 model's: max_abs_diff .* \(bound 0\)"
    ):
        export_model(tiny_model(vocab), table, vocab, tiny_catalogue(table), tmp_path / "b", dtype="bfloat16")
    assert list(tmp_path.iterdir()) == []
