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


def test_include_paths_are_relative_to_the_including_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ``include:`` resolves from the directory of the file that names it, whatever the current
    directory; other paths in a config are kept as written (they resolve from the current directory)."""
    (tmp_path / "exp").mkdir()
    (tmp_path / "common" / "more").mkdir(parents=True)
    (tmp_path / "exp" / "run.yaml").write_text("include: [../common/data.yaml, ../common/seed.yaml]\n")
    (tmp_path / "common" / "data.yaml").write_text(
        "include: more/shards.yaml\ndata: {source: amazon2014, path: my/data, num_shards: 2}\n"
    )
    (tmp_path / "common" / "more" / "shards.yaml").write_text("data: {num_shards: 5, strict: true}\n")
    (tmp_path / "common" / "seed.yaml").write_text("data: {num_shards: 7}\n")
    monkeypatch.chdir(tmp_path / "common" / "more")  # includes do not depend on it
    cfg = load_config(ExperimentConfig, Path("../../exp/run.yaml"))
    assert (cfg.data.num_shards, cfg.data.strict, cfg.data.path) == (7, True, Path("my/data"))


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


def test_a_float_field_takes_exponent_notation_that_yaml_reads_as_text(tmp_path: Path) -> None:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; a float field takes it, from a file or an override."""
    assert parse_overrides(["train.lr=1e-3"]) == {"train": {"lr": "1e-3"}}
    cfg = load_config(ExperimentConfig, None, ["train.lr=1e-3", "train.min_lr=5E-5", "train.clip=+2e0"])
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.clip) == (1e-3, 5e-5, 2.0)
    (tmp_path / "exp.yaml").write_text("train: {lr: 3e-4, min_lr: 1e-5}\n")
    cfg = load_config(ExperimentConfig, tmp_path / "exp.yaml")
    assert (cfg.train.lr, cfg.train.min_lr) == (3e-4, 1e-5)
    for text in ("fast", "1e-3x", "1e", "nan"):
        with pytest.raises(ConfigError, match=rf"train\.lr: expected float, got '{text}'"):
            load_config(ExperimentConfig, None, [f"train.lr={text}"])
    with pytest.raises(ConfigError, match=r"sid\.levels: expected int, got '1e3'"):  # ints stay strict
        load_config(ExperimentConfig, None, ["sid.levels=1e3"])


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


def test_unknown_model_override_is_refused_like_any_other_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(ExperimentConfig, None, ["model.overrides.num_expert=6"])
    assert str(error.value) == (
        "command-line override: unknown key 'model.overrides.num_expert' "
        "(did you mean 'model.overrides.num_experts'?)"
    )
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  overrides: {hidden_size: 32, num_expert: 6}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'model\.overrides\.num_expert'"):
        load_config(ExperimentConfig, path)
    from moe_rec.train.config import ModelSection

    with pytest.raises(ConfigError, match=r"did you mean 'model\.overrides\.num_experts'"):
        ModelSection(overrides={"num_expert": 6})  # built in Python, not from a file


def test_every_model_config_field_is_an_override_but_those_the_model_section_sets() -> None:
    import inspect

    from moe_rec.model import MoERecConfig

    params = inspect.signature(MoERecConfig.__init__).parameters.values()
    fields = {p.name: p.default for p in params if p.name != "self" and p.kind is not p.VAR_KEYWORD}
    section_sets = {
        "vocab_size",
        "num_domains",
        "router_mode",
        "moe_backend",
        "code_token_ranges",
        "num_items",
        "item_text_dim",
        "text_token_range",
        "item_word_slots",
        "item_term_shape",
    }
    assert section_sets <= fields.keys()
    overrides = [
        f"model.overrides.{name}={default!r}" for name, default in fields.items() if name not in section_sets
    ]
    cfg = load_config(ExperimentConfig, None, [o.replace("=None", "=null") for o in overrides])
    assert set(cfg.model.overrides) == fields.keys() - section_sets
    for name in sorted(section_sets):
        with pytest.raises(
            ConfigError,
            match=rf"model\.overrides\.{name}.*(model\.{name}|vocabulary|SID table|text encoder|item words|item terms)",
        ):
            load_config(ExperimentConfig, None, [f"model.overrides.{name}={fields[name]!r}"])
