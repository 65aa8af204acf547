import pytest

from train.run_config import CONFIG_DIR, apply_overrides, load_config


def test_presets_load_and_override():
    for name in ("tiny", "small", "base"):
        cfg = load_config(name)
        assert cfg["model"]["preset"] == name
        assert (CONFIG_DIR / f"{name}.yaml").exists()
    cfg = load_config("tiny", ["max_steps=7", "optim.lr=0.01", "data.dataset_weights.lung=2"])
    assert cfg["train"]["max_steps"] == 7
    assert cfg["optim"]["lr"] == 0.01
    assert cfg["data"]["dataset_weights"] == {"lung": 2}
    assert cfg["data"]["crop"] == 32  # from tiny.yaml, over DEFAULTS' 128


def test_unknown_keys_fail_loudly():
    cfg = load_config("tiny")
    with pytest.raises(KeyError, match="train.max_stepz"):
        apply_overrides(cfg, ["train.max_stepz=3"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["max_steps"])
    with pytest.raises(FileNotFoundError):
        load_config("no-such-preset")
