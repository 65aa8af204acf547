"""Encoding attributes: an unknown key is refused with the closest valid key."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from maskbank.bank.encoding import Encoding


def test_unknown_encoding_keys_are_refused_with_the_closest_valid_key():
    with pytest.raises(ValueError, match=r"unknown encoding key 'clevl' \(did you mean 'clevel'"):
        Encoding.from_dict({"chunk": 64, "clevl": 3})
    with pytest.raises(ValueError, match=r"unknown encoding key 'zzz'; valid keys"):
        Encoding.from_dict({"zzz": 1})


def test_stored_encodings_read_back_and_legacy_keys_are_dropped(monkeypatch):
    enc = Encoding(chunk=32, max_shard=256, clevel=4)
    assert Encoding.from_dict(enc.to_dict()) == enc
    assert Encoding.from_dict({"chunk": 32}) == Encoding(chunk=32)  # missing keys: defaults
    monkeypatch.setattr(Encoding, "LEGACY_KEYS", ("bitshuffle_level",))
    assert Encoding.from_dict({**asdict(enc), "bitshuffle_level": 2}) == enc
