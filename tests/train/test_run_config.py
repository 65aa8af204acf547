import dataclasses
import json
import re

import pytest
import yaml

from maskbank.train.pretext import PretextError, create_pretext
from maskbank.train.run_config import (
    CONFIG_DIR,
    ConfigError,
    DataConfig,
    TrainConfig,
    UnknownKeyError,
    apply_overrides,
    dump_config,
    load_config,
)


def test_presets_load_and_override():
    for name in ("tiny", "small", "base"):
        cfg = load_config(name)
        assert cfg["model"]["preset"] == name
        assert (CONFIG_DIR / f"{name}.yaml").exists()
    cfg = load_config("tiny", ["max_steps=7", "optim.lr=0.01", "data.dataset_weights.lung=2"])
    assert cfg["train"]["max_steps"] == 7
    assert cfg["optim"]["lr"] == 0.01
    assert cfg["data"]["dataset_weights"] == {"lung": 2}
    assert cfg["data"]["crop"] == 32  # from tiny.yaml, over the default 128


def test_unknown_keys_fail_loudly():
    cfg = load_config("tiny")
    with pytest.raises(KeyError, match="train.max_stepz"):
        apply_overrides(cfg, ["train.max_stepz=3"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["max_steps"])
    with pytest.raises(FileNotFoundError):
        load_config("no-such-preset")


def test_typed_config_is_frozen_and_typed():
    cfg = TrainConfig.load("base", ["optim.lr=1", "train.debug_nan.steps=[3, 4]"])
    assert isinstance(cfg.data, DataConfig) and cfg.data.crop == 128
    assert cfg.optim.name == "lamb" and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.train.debug_nan.steps == (3, 4) and cfg.train.debug_nan.applies_to(1) == {3, 4}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 3


def test_dict_form_round_trips_and_matches_the_presets():
    for name in ("tiny", "small", "base"):
        cfg = TrainConfig.load(name, ["data.scans=[a, b]", "data.modality_weights.ct=0.5"])
        plain = cfg.to_dict()
        assert json.loads(json.dumps(plain)) == plain  # JSON-able, as checkpoints keep it
        assert TrainConfig.from_dict(plain) == cfg
        assert plain["data"]["scans"] == ["a", "b"] and cfg.data.scans == ("a", "b")
        assert TrainConfig.from_dict(yaml.safe_load(dump_config(cfg))) == cfg
        # Every key a preset sets arrives unchanged.
        preset = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
        for section, values in preset.items():
            for key, value in values.items():
                assert plain[section][key] == value, (name, section, key)
    # A partial dict (an older checkpoint's) takes the defaults for what it lacks.
    old = TrainConfig.from_dict({"model": {"preset": "small"}, "data": {"k": 5}})
    assert old.model.preset == "small" and old.data.k == 5 and old.pretext == "incontext"
    assert TrainConfig.load(None) == TrainConfig()  # the defaults, no preset


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.crop=abc", "data.crop must be an integer"),
        ("data.crop=32.5", "data.crop must be an integer"),
        ("train.bf16=1", "train.bf16 must be true or false"),
        ("optim.name=sgd", "optim.name must be one of ['adamw', 'lamb']"),
        ("optim.betas=[0.9]", "optim.betas must hold 2 values"),
        ("train.ckpt_every=0", "train.ckpt_every must be >= 1"),
        ("data.k=30", "data.k=30: at most 23"),
        ("data.dataset_weights.lung=-1", "data.dataset_weights.lung=-1.0 must be >= 0"),
        ("reconstruction.block=64", "reconstruction.block=64 must lie in 1..32"),
        ("train.debug_nan.target=both", "train.debug_nan.target must be one of"),
        ("data.scans=[a", "is not valid YAML"),
    ],
)
def test_values_are_validated_once_at_load(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.load("tiny", [override])


def test_unknown_keys_name_the_closest_valid_key():
    with pytest.raises(UnknownKeyError, match=r"'train.max_stepz'.*did you mean 'train.max_steps'"):
        TrainConfig.load("tiny", ["train.max_stepz=3"])
    with pytest.raises(UnknownKeyError, match=r"'trian'.*did you mean 'train'"):
        TrainConfig.load("tiny", ["trian.max_steps=3"])
    with pytest.raises(UnknownKeyError, match=r"'max_step'.*did you mean 'max_steps'"):
        TrainConfig.load("tiny", ["max_step=3"])
    with pytest.raises(UnknownKeyError, match=r"'data.crops'.*did you mean 'data.crop'"):
        TrainConfig.from_dict({"data": {"crops": 3}})


def test_a_config_file_must_be_a_yaml_mapping(tmp_path):
    listed = tmp_path / "listed.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a mapping"):
        TrainConfig.load(listed)
    mine = tmp_path / "mine.yaml"
    mine.write_text("data:\n  crop: 64\n", encoding="utf-8")
    assert TrainConfig.load(mine).data.crop == 64


def test_registry_names_are_checked_by_their_registry_once():
    """pretext and model.preset load as any string; creating the pretext checks both
    against their registries and names the known ones."""
    odd = TrainConfig.load("tiny", ["pretext=jigsaw"])
    with pytest.raises(PretextError, match=r"unknown pretext 'jigsaw'.*incontext"):
        create_pretext(odd.pretext, odd)
    huge = TrainConfig.load("tiny", ["model.preset=huge"])
    with pytest.raises(PretextError, match=r"unknown model preset 'huge'.*tiny.*'model.preset'"):
        create_pretext(huge.pretext, huge)
    assert create_pretext("reconstruction", TrainConfig.load("small")).name == "reconstruction"


def test_run_config_imports_no_registry():
    """The config no longer imports the pretext or network registries (no import circle)."""
    import subprocess
    import sys

    code = (
        "import sys; import maskbank.train.run_config; "
        "print(any(m.startswith(('maskbank.train.pretext', 'maskbank.train.incontext_net', "
        "'maskbank.train.net_spec')) "
        "for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sampler_knobs_are_data_keys():
    data = TrainConfig.load(
        "tiny", ["data.pairs_per_scan_visit=4", "data.max_anchor_tries=3", "data.k=5"]
    ).data
    assert (data.pairs_per_scan_visit, data.max_anchor_tries) == (4, 3)
    assert (data.read_size, data.n_tasks) == (32 + 2 * 8, 6)
    for bad in ("data.pairs_per_scan_visit=0", "data.max_anchor_tries=0"):
        with pytest.raises(ConfigError, match="must be >= 1"):
            TrainConfig.load("tiny", [bad])
