"""Config loading: every shipped YAML loads, composition, overrides and clear errors."""

from pathlib import Path

import pytest

from moe_rec.config import ConfigError, load_config, parse_overrides, to_dict
from moe_rec.experiment import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_config_loads(path: Path) -> None:
    cfg = load_config(ExperimentConfig, path)
    assert isinstance(cfg, ExperimentConfig)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").glob("[!e]*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}"
)
def test_every_component_config_loads(path: Path) -> None:
    load_config(ExperimentConfig, path)


def test_include_merges_and_later_wins(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("data:\n  num_shards: 3\n  synthetic: {num_users: 10, seed: 4}\n")
    (tmp_path / "exp.yaml").write_text("include: [base.yaml]\ndata:\n  synthetic: {num_users: 20}\n")
    cfg = load_config(ExperimentConfig, tmp_path / "exp.yaml", ["data.synthetic.seed=9", "sid.levels=4"])
    assert (cfg.data.num_shards, cfg.data.synthetic.num_users, cfg.data.synthetic.seed) == (3, 20, 9)
    assert cfg.sid.levels == 4 and cfg.sid.codebook_size == ExperimentConfig().sid.codebook_size


def test_unknown_key_names_key_file_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("data:\n  num_shard: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml.*data\.num_shard.*did you mean 'data\.num_shards'"):
        load_config(ExperimentConfig, path)


def test_bad_override_is_named_as_override() -> None:
    with pytest.raises(ConfigError, match=r"override.*sid\.levles"):
        load_config(ExperimentConfig, None, ["sid.levles=2"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("sid.levels=three", r"sid\.levels: expected int"),
        ("data.source=amazon", r"data\.source: must be one of"),
        ("data.strict=[1]", r"data\.strict: expected bool"),
        ("sid.levels=0", r"levels >= 1"),
    ],
)
def test_wrong_values_are_explained(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(ExperimentConfig, None, [override])


def test_include_cycle_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(ExperimentConfig, tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(ExperimentConfig, tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values() -> None:
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "e=1.5e-3"]) == {
        "a": {"b": 1, "c": "x"},
        "d": [1, 2],
        "e": 1.5e-3,
    }


def test_round_trip_through_dict(tmp_path: Path) -> None:
    cfg = load_config(ExperimentConfig, EXPERIMENTS[0], ["sid.levels=5"])
    from moe_rec.config import from_dict

    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg
