"""The one cache: entries carry a checksum, are verified on every read, and a
damaged entry is dropped with a warning naming it and made again."""

from __future__ import annotations

import json
import logging

import pytest

from quantmill.cache import cache_key, cached_file, cached_json, code_version


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTMILL_CACHE", str(tmp_path))
    monkeypatch.delenv("QUANTMILL_S3_BUCKET", raising=False)
    return tmp_path


def producer(calls: list[int], payload: bytes = b"statistics"):
    def produce(tmp):
        calls.append(1)
        tmp.write_bytes(payload)

    return produce


def test_an_entry_is_made_once_then_read_back(cache):
    calls: list[int] = []
    path, hit = cached_file("statistics", "k1", "stats.bin", producer(calls))
    again, hit2 = cached_file("statistics", "k1", "stats.bin", producer(calls))
    assert (hit, hit2, len(calls)) == (False, True, 1)
    assert again == path and path.read_bytes() == b"statistics"
    assert path.with_name("stats.bin.sha256").read_text().startswith("sha256:")


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"\x8f\x00random"),  # overwritten
        lambda p: p.write_bytes(p.read_bytes()[:3]),  # truncated
        lambda p: p.with_name(p.name + ".sha256").unlink(),  # checksum lost
    ],
    ids=["overwritten", "truncated", "no-checksum"],
)
def test_a_damaged_entry_is_dropped_named_and_made_again(cache, caplog, damage):
    calls: list[int] = []
    path, _ = cached_file("calibration", "k2", "ids.bin", producer(calls))
    damage(path)
    with caplog.at_level(logging.WARNING, logger="quantmill.cache"):
        again, hit = cached_file("calibration", "k2", "ids.bin", producer(calls))
    assert not hit and len(calls) == 2
    assert again.read_bytes() == b"statistics"
    assert str(path) in caplog.text and "making it again" in caplog.text


def test_a_failed_producer_leaves_no_entry(cache):
    def fails(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_file("statistics", "k3", "stats.bin", fails)
    folder = cache / "statistics" / "k3"
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".sha256")] == []
    calls: list[int] = []
    _, hit = cached_file("statistics", "k3", "stats.bin", producer(calls))
    assert not hit and calls == [1]


def test_an_edited_json_value_is_not_trusted(cache):
    value, hit = cached_json("eval", "k4", lambda: {"perplexity": 17.5})
    entry = cache / "eval" / "k4" / "value.json"
    entry.write_text(json.dumps({"perplexity": 12.34}))
    again, hit2 = cached_json("eval", "k4", lambda: {"perplexity": 17.5})
    assert (hit, hit2) == (False, False)
    assert value == again == {"perplexity": 17.5}


def test_keys_include_the_code_version(monkeypatch):
    key = cache_key(model="m", spec={"a": 1})
    assert key == cache_key(spec={"a": 1}, model="m")  # order does not matter
    monkeypatch.setattr("quantmill.cache.code_version", lambda: code_version() + "x")
    assert cache_key(model="m", spec={"a": 1}) != key
