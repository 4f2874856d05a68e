"""Artefacts and cache: hit, miss, refusal naming the setting, atomic writes."""

import json
import os

import numpy as np
import pytest

from mechsieve.store import (
    Cache,
    ChunkedWriter,
    SettingsMismatch,
    atomic_path,
    load_artefact,
    save_artefact,
)
from mechsieve.store.artefacts import diff_settings


def test_artefact_roundtrip_and_refusal(tmp_path):
    settings = {"capture": {"layers": [1, 2], "site": "resid"}, "data": "abc"}
    save_artefact(tmp_path, "acts", {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, settings)
    tensors, meta = load_artefact(tmp_path, "acts", expected=settings)
    np.testing.assert_array_equal(tensors["x"], np.arange(6).reshape(2, 3))
    assert meta["settings"] == settings
    other = {"capture": {"layers": [3], "site": "resid"}, "data": "abc"}
    with pytest.raises(SettingsMismatch, match=r"capture\.layers: \[1, 2\] there, \[3\] here") as err:
        load_artefact(tmp_path, "acts", expected=other)
    assert err.value.differences == ["capture.layers: [1, 2] there, [3] here"]


def test_diff_settings_reports_added_and_removed_keys():
    assert diff_settings({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"d": 2}}) == [
        "b.c: 2 there, not set here", "b.d: not set there, 2 here"]


def test_cache_hit_miss_and_refusal(tmp_path):
    cache = Cache(tmp_path)
    model = {"kind": "folder", "hash": "m1"}
    entry = cache.entry("activations", model, "data1", {"layers": [1]})
    assert not entry.exists()  # miss
    save_artefact(entry.folder, entry.name, {"x": np.ones(2)}, entry.key)
    again = cache.entry("activations", model, "data1", {"layers": [1]})
    assert again.folder == entry.folder and again.exists()  # hit
    tensors, _ = again.load()
    np.testing.assert_array_equal(tensors["x"], np.ones(2))
    assert cache.entry("activations", model, "data2", {"layers": [1]}).folder != entry.folder
    assert not cache.entry("activations", model, "data1", {"layers": [2]}).exists()
    # An entry whose recorded key was altered is refused, naming what differs.
    meta_path = entry.folder / "artefact.json"
    meta = json.loads(meta_path.read_text())
    meta["settings"]["settings"]["layers"] = [7]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SettingsMismatch, match=r"settings\.layers: \[7\] there, \[1\] here"):
        again.load()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        open(tmp, "w").write("half")
        raise RuntimeError("boom")
    assert not target.exists() and os.listdir(tmp_path) == []
    with atomic_path(target) as tmp:
        open(tmp, "w").write("whole")
    assert target.read_text() == "whole" and os.listdir(tmp_path) == ["out.bin"]


def test_chunked_writer_refuses_other_settings(tmp_path):
    w = ChunkedWriter(tmp_path, "acts", {"layers": [1]})
    w.write(0, {"indices": np.array([0, 1])})
    assert ChunkedWriter(tmp_path, "acts", {"layers": [1]}).done() == {0}
    with pytest.raises(SettingsMismatch, match=r"layers: \[1\] there, \[2\] here"):
        ChunkedWriter(tmp_path, "acts", {"layers": [2]})
    assert ChunkedWriter(tmp_path, "acts", {"layers": [2]}, overwrite=True).done() == set()
