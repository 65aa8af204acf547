"""PrepareConfig's keys: unknown ones refused with the closest valid key, legacy ones read."""

from __future__ import annotations

import pytest

from maskbank.pipeline.config import PrepareConfig, known_keys


def test_unknown_prepare_keys_are_refused_with_the_closest_valid_key():
    with pytest.raises(ValueError, match=r"unknown prepare config key 'spacin'.*'spacing'"):
        PrepareConfig.from_dict({"spacin": 2.0})
    with pytest.raises(ValueError, match=r"'zzz'; valid keys: \[.*'spacing'"):
        PrepareConfig.from_dict({"zzz": 1})
    with pytest.raises(ValueError, match="did you mean 'body_margin_mm'"):
        PrepareConfig().replace(body_margin=5.0)


def test_legacy_prepare_keys_of_old_banks_are_tolerated():
    stored = {**PrepareConfig(spacing=2.0).to_dict(), "anisotropy_threshold": 3.0}
    cfg = PrepareConfig.from_dict(stored)
    assert cfg == PrepareConfig(spacing=2.0) and "anisotropy_threshold" not in cfg.to_dict()
    assert cfg.fingerprint() == PrepareConfig(spacing=2.0).fingerprint()


def test_known_keys_keeps_valid_keys_and_drops_legacy_ones():
    assert known_keys({"a": 1, "old": 2}, ["a", "b"], "thing", legacy=["old"]) == {"a": 1}
    with pytest.raises(ValueError, match="unknown thing key 'c'"):
        known_keys({"c": 1}, ["a", "b"], "thing")
