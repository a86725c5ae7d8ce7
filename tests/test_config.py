import pytest
import yaml

from dilemma.config import Config, TypedText, load_config, parse_override
from dilemma.errors import DilemmaError


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3.0e-4\ndilemma:\n  misplace_prob: 0.1\n")
    cfg = load_config(path, ["dilemma.misplace_prob=0.3", "model.depth=null", "optim.warmup=0.2", "optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.dilemma.misplace_prob == 0.3 and cfg.model.depth is None and cfg.optim.warmup == 0.2
    assert load_config().to_dict() == Config().to_dict()


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
    # the reference file lists every key with its default: read as YAML (a key missing from the
    # file would otherwise fall back to its default and pass unnoticed)
    reference = yaml.safe_load((Path(__file__).parents[1] / "configs" / "mocov3_dilemma.yaml").read_text())
    assert reference == Config().to_dict()
    names = {p.stem: load_config(p).method.name for p in configs}
    recipes = ("dino", "simclr", "mae", "byol", "vicreg", "ibot", "ijepa")
    assert [names[f"{name}_dilemma"] for name in recipes] == list(recipes)
    assert names["paper_byol_vits16"] == "byol" and names["paper_vicreg_vits16"] == "vicreg"
    assert names["paper_ibot_vits16"] == "ibot" and names["paper_ijepa_vits16"] == "ijepa"
    assert names["droppos"] == names["paper_droppos_vits16"] == "droppos"


def test_moved_method_keys_point_to_their_section():
    with pytest.raises(DilemmaError, match=r"did you mean 'method.mocov3.temperature' or 'method.simclr.temperature'"):
        load_config(None, ["method.temperature=0.1"])


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.lrr=1", r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
        ("dilema.drop_rate=0.5", r"did you mean 'dilemma.drop_rate'"),
        ("optim.lr=fast", "needs a value of type float"),
        ("train.max_steps=1.5", "needs a value of type int"),
        ("dilemma.drop_rate=1.0", r"drop_rate must be in \[0, 1\)"),
        ("dilemma.misplace_prob=2", r"misplace_prob must be in \[0, 1\]"),
        ("model.img_size=30", "not divisible"),
        ("optim.lr", "key=value"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(DilemmaError, match=match):
        load_config(None, [override])


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(DilemmaError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("optim:\n  momentum: 0.9\n")
    with pytest.raises(DilemmaError, match="unknown config key 'optim.momentum'"):
        load_config(bad)
    with pytest.raises(DilemmaError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_parse_override_nests():
    assert parse_override("train.time_budget=2.5") == {"train": {"time_budget": TypedText("2.5", 2.5)}}
    assert parse_override("model.name=vit") == {"model": {"name": "vit"}}


def test_exponent_without_a_dot_is_a_float(tmp_path):
    """YAML 1.1 reads `5e-4` as a string; a user who writes it means a number."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 5e-4\n")
    assert load_config(path).optim.lr == 5e-4
    assert load_config(None, ["optim.min_lr=2e-6"]).optim.min_lr == 2e-6


def test_a_set_value_keeps_its_text_where_the_key_holds_a_string():
    """YAML reads 010 as 8, 3.10 as 3.1 and 'yes' as True; a string key gets what was typed."""
    cfg = load_config(None, ["data.source=010", "model.name=3.10", "optim.lr=010", "data.hflip=no"])
    assert (cfg.data.source, cfg.model.name) == ("010", "3.10")
    assert cfg.optim.lr == 8.0 and cfg.data.hflip is False  # numbers and booleans still read as YAML
