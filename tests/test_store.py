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


def test_a_crash_between_the_two_writes_never_pairs_new_tensors_with_old_settings(tmp_path, monkeypatch):
    import mechsieve.store.artefacts as artefacts
    from mechsieve.store import TornArtefact, artefact_exists

    save_artefact(tmp_path, "acts", {"x": np.zeros(3)}, {"run": "old"})
    real = artefacts.write_json

    def crash(path, data):
        raise KeyboardInterrupt("killed between the tensors and the settings")

    monkeypatch.setattr(artefacts, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_artefact(tmp_path, "acts", {"x": np.ones(3)}, {"run": "new"})
    monkeypatch.setattr(artefacts, "write_json", real)
    # The settings file still says "old" and the tensors are the new ones: never handed out as a pair.
    assert json.loads((tmp_path / "acts.json").read_text())["settings"] == {"run": "old"}
    with pytest.raises(TornArtefact, match="torn artefact: tensors and settings from different writes; rerun"):
        load_artefact(tmp_path, "acts")
    with pytest.raises(SettingsMismatch):  # a torn artefact is a user error the CLI shows in one line
        load_artefact(tmp_path, "acts", expected={"run": "old"})
    assert not artefact_exists(tmp_path, "acts")  # so a cache or a resuming command recomputes it
    save_artefact(tmp_path, "acts", {"x": np.ones(3)}, {"run": "new"})
    tensors, meta = load_artefact(tmp_path, "acts", expected={"run": "new"})
    np.testing.assert_array_equal(tensors["x"], np.ones(3))


def test_artefacts_written_before_write_ids_still_load(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.arange(3.0)}, str(tmp_path / "acts.safetensors"))
    (tmp_path / "acts.json").write_text(json.dumps({"settings": {"a": 1}}))
    tensors, meta = load_artefact(tmp_path, "acts", expected={"a": 1})
    np.testing.assert_array_equal(tensors["x"], np.arange(3.0))


def test_outputs_respect_the_umask(tmp_path):
    from mechsieve.store import atomic_dir, write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"a": 1})
        save_artefact(tmp_path / "art", "acts", {"x": np.ones(2)}, {})
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("x")
        os.umask(0o027)
        write_json(tmp_path / "b.json", {"b": 1})
        with atomic_dir(tmp_path / "folder2"):
            pass
    finally:
        os.umask(old)

    def mode(p):
        return oct(os.stat(p).st_mode & 0o777)

    assert mode(tmp_path / "a.json") == "0o644"
    assert mode(tmp_path / "art" / "acts.safetensors") == "0o644"
    assert mode(tmp_path / "art" / "acts.json") == "0o644"
    assert mode(tmp_path / "folder") == "0o755"
    assert mode(tmp_path / "folder" / "inside.txt") == "0o644"
    assert mode(tmp_path / "b.json") == "0o640" and mode(tmp_path / "folder2") == "0o750"
