"""What a fit measured about a model, kept for the next fit (``engine.measured_cache``): keys, atomic entries, limits."""
from __future__ import annotations

import os

import pytest


@pytest.fixture()
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETAILOR_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_an_entry_is_kept_per_model_and_inputs_and_read_back_only_for_the_same(cache_home):
    from edgetailor.engine.measured_cache import MeasuredCache

    made = []

    def make(value):
        made.append(value)
        return {"value": value}

    a = MeasuredCache("model", "sha-a")
    assert a.json("prices", [[1, 2, 3]], lambda: make(1)) == {"value": 1}
    assert MeasuredCache("model", "sha-a").json("prices", [[1, 2, 3]], lambda: make(2)) == {"value": 1}
    assert MeasuredCache("model", "sha-a").json("prices", [[1, 2, 4]], lambda: make(3)) == {"value": 3}  # other text
    assert MeasuredCache("model", "sha-b").json("prices", [[1, 2, 3]], lambda: make(4)) == {"value": 4}  # other weights
    fresh = MeasuredCache("model", "sha-a", reuse=False)
    assert fresh.json("prices", [[1, 2, 3]], lambda: make(5)) == {"value": 5} and not fresh.reused
    assert MeasuredCache("model", "sha-a").json("prices", [[1, 2, 3]], lambda: make(6)) == {"value": 5}  # replaced
    assert made == [1, 3, 4, 5]


def test_a_folder_entry_appears_only_once_made_and_a_killed_writers_leftovers_are_swept(cache_home):
    from edgetailor.engine import measured_cache
    from edgetailor.engine.measured_cache import MeasuredCache

    cache = MeasuredCache("model", "sha")

    def fails(folder):
        (folder / "half.npy").write_bytes(b"x" * 10)
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError):
        cache.made_folder("baseline", [1], fails)
    assert list(cache.folder_path.iterdir()) == []          # neither the entry nor a partial one
    done = cache.made_folder("baseline", [1], lambda f: (f / "w.npy").write_bytes(b"y"))
    assert (done / "w.npy").read_bytes() == b"y"
    assert MeasuredCache("model", "sha").made_folder("baseline", [1], fails) == done     # read back, not made
    dead = cache.folder_path / "encoded-x" / f".blk.0.attn_q.weight.Q4_K.npy.{2 ** 22 + 12345}.partial"
    dead.parent.mkdir()
    dead.write_bytes(b"z")                                 # a killed run's half-written tensor (its pid gone)
    measured_cache.prune()
    assert not dead.exists() and (done / "w.npy").exists()


def test_beyond_the_limit_the_least_recently_used_models_go_but_not_the_one_in_use(cache_home):
    from edgetailor.engine import measured_cache
    from edgetailor.engine.measured_cache import MeasuredCache

    entries = []
    for i, name in enumerate(("old", "middle", "new")):
        c = MeasuredCache(name, f"sha-{i}")
        c.made_folder("baseline", [i], lambda f: (f / "w.npy").write_bytes(b"x" * 1000))
        os.utime(c.folder_path, (1000 + i, 1000 + i))
        entries.append(c.folder_path)
    removed = measured_cache.prune(keep=entries[0], limit=2000)
    assert removed == [entries[1]] and entries[0].exists() and entries[2].exists()
    assert measured_cache.prune(limit=0) == [entries[0], entries[2]]
