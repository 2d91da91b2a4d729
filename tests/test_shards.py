"""Token shard files (llm.c format) and the DataLoader."""
import json
import os

import numpy as np
import pytest

from llmpy.data import DataLoader, read_shard, write_shard
from llmpy.data import shards as shardmod
from llmpy.errors import LlmpyError


def _header(magic=20240520, version=1, ntok=0):
    h = np.zeros(256, dtype="<i4")
    h[:3] = (magic, version, ntok)
    return h.tobytes()


# ------------------------------------------------------------------ files

def test_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=1000)
    path = tmp_path / "a.bin"
    write_shard(path, tokens)
    back = read_shard(path)
    assert back.dtype == np.uint16 and back.shape == (1000,)
    np.testing.assert_array_equal(back, tokens)
    assert os.path.getsize(path) == 1024 + 2 * 1000
    with pytest.raises(ValueError):           # read-only view of the file
        back[0] = 1


def test_llmc_layout(tmp_path):
    # byte for byte what llm.c's write_datafile produces
    path = tmp_path / "a.bin"
    write_shard(path, [50256, 15496, 995])
    raw = path.read_bytes()
    assert raw[:12] == np.array([20240520, 1, 3], dtype="<i4").tobytes()
    assert raw[12:1024] == bytes(1012)
    assert raw[1024:] == np.array([50256, 15496, 995], dtype="<u2").tobytes()


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "e.bin", [])
    assert read_shard(tmp_path / "e.bin").shape == (0,)


def test_write_refuses_big_ids(tmp_path):
    path = tmp_path / "big.bin"
    with pytest.raises(LlmpyError, match="65536"):
        write_shard(path, [1, 2, 65536])
    with pytest.raises(LlmpyError):
        write_shard(path, [-1])
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "s.bin"
    write_shard(path, [1, 2, 3])
    assert os.listdir(tmp_path) == ["s.bin"]       # no temp file left behind

    # A crash between writing and renaming keeps the old file and no temp file.
    def boom(*args):
        raise OSError("disk on fire")
    monkeypatch.setattr(shardmod.os, "replace", boom)
    with pytest.raises(OSError):
        write_shard(path, [9, 9, 9, 9])
    assert os.listdir(tmp_path) == ["s.bin"]
    np.testing.assert_array_equal(read_shard(path), [1, 2, 3])

    # ... and a failed first write leaves nothing at the final path.
    with pytest.raises(OSError):
        write_shard(tmp_path / "new.bin", [1])
    assert os.listdir(tmp_path) == ["s.bin"]


def _assert_one_line_error(path, *fragments):
    with pytest.raises(LlmpyError) as e:
        read_shard(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert path.name in msg
    assert "llmpy prepare" in msg          # says how to fix it
    for f in fragments:
        assert f in msg
    return msg


def test_missing_file(tmp_path):
    _assert_one_line_error(tmp_path / "nope.bin", "does not exist")


def test_truncated_header(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(_header(ntok=10)[:500])
    _assert_one_line_error(path, "header")


def test_truncated_body(tmp_path):
    path = tmp_path / "cut.bin"
    write_shard(path, np.arange(100))
    path.write_bytes(path.read_bytes()[:-10])
    _assert_one_line_error(path, "100 tokens")


def test_too_long(tmp_path):
    path = tmp_path / "long.bin"
    write_shard(path, np.arange(100))
    with open(path, "ab") as f:
        f.write(b"\0\0")
    _assert_one_line_error(path, "100 tokens")


def test_foreign_file(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(1).bytes(5000))
    _assert_one_line_error(path, "not a token shard")


def test_wrong_magic(tmp_path):
    # e.g. an llm.c model file (magic 20240326) passed as data
    path = tmp_path / "model.bin"
    path.write_bytes(_header(magic=20240326, ntok=4) + bytes(8))
    _assert_one_line_error(path, "20240326")


def test_wrong_version(tmp_path):
    path = tmp_path / "v2.bin"
    path.write_bytes(_header(version=2, ntok=4) + bytes(8))
    _assert_one_line_error(path, "version 2")


def test_negative_count(tmp_path):
    path = tmp_path / "neg.bin"
    path.write_bytes(_header(ntok=-4) + bytes(8))
    _assert_one_line_error(path)


# ---------------------------------------------------------------- loader

T = 8


def _make_shards(tmp_path, sizes, offset=0):
    """Shards whose token k of shard s is (s * 1000 + k) % 65536: positions are readable."""
    paths = []
    for s, n in enumerate(sizes):
        p = tmp_path / f"tok_{s:06d}.bin"
        write_shard(p, (offset + s * 1000 + np.arange(n)) % 65536)
        paths.append(p)
    return paths


def _window_id(x):
    """(B, T) inputs -> the (shard, window) each row came from, given _make_shards' tokens."""
    first = x[:, 0].astype(np.int64)
    return [(int(f) // 1000, int(f) % 1000 // T) for f in first]


def _batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


@pytest.fixture
def data(tmp_path):
    # windows per shard: (81-1)//8 = 10, (200-1)//8 = 24, (57-1)//8 = 7  -> 41 in all
    _make_shards(tmp_path, [81, 200, 57])
    return str(tmp_path / "tok_*.bin")


def test_shapes_and_shift(data):
    dl = DataLoader(data, B=4, T=T)
    assert dl.num_tokens == 81 + 200 + 57
    assert dl.num_windows == 41
    for x, y in _batches(dl, 20):
        assert x.shape == y.shape == (4, T)
        assert x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
        np.testing.assert_array_equal(y[:, -1], x[:, -1] + 1)   # consecutive tokens
        assert (x[:, 0] % 1000 % T == 0).all()                   # windows start at i*T


def test_no_shuffle_is_file_order(data):
    dl = DataLoader(data, B=5, T=T, shuffle=False)
    x, y = dl.next_batch()
    np.testing.assert_array_equal(x[0], np.arange(T))
    np.testing.assert_array_equal(y[0], np.arange(1, T + 1))
    np.testing.assert_array_equal(x[1], np.arange(T, 2 * T))
    ids = _window_id(x) + [w for x, _ in _batches(dl, 7) for w in _window_id(x)]
    # 8 batches of 5 take windows 0..39 of 41 in file order; (2, 6) is dropped
    expected = [(s, w) for s, n in enumerate([10, 24, 7]) for w in range(n)][:40]
    assert ids == expected
    x, _ = dl.next_batch()
    assert dl.epoch == 1 and _window_id(x)[0] == (0, 0)


def test_each_window_once_per_epoch(data):
    dl = DataLoader(data, B=4, T=T, seed=3)
    every = {(s, w) for s, n in enumerate([10, 24, 7]) for w in range(n)}
    per_epoch = 41 // 4          # 10 batches, 1 window dropped
    for epoch in range(3):
        seen = [w for x, _ in _batches(dl, per_epoch) for w in _window_id(x)]
        assert len(seen) == len(set(seen)) == 40
        assert set(seen) <= every
        assert dl.epoch == epoch
    dl.next_batch()
    assert dl.epoch == 3


def test_epochs_reshuffle(data):
    dl = DataLoader(data, B=4, T=T, seed=0)
    e0 = [w for x, _ in _batches(dl, 10) for w in _window_id(x)]
    e1 = [w for x, _ in _batches(dl, 10) for w in _window_id(x)]
    assert e0 != e1


def test_deterministic_for_seed(data):
    a = _batches(DataLoader(data, B=4, T=T, seed=7), 25)
    b = _batches(DataLoader(data, B=4, T=T, seed=7), 25)
    c = _batches(DataLoader(data, B=4, T=T, seed=8), 25)
    assert all(np.array_equal(xa, xb) and np.array_equal(ya, yb)
               for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_reset(data):
    dl = DataLoader(data, B=4, T=T, seed=1)
    first = _batches(dl, 13)
    dl.reset()
    again = _batches(dl, 13)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_disjoint_and_cover_global_batch(data, world_size):
    B = 3
    single = DataLoader(data, B=B * world_size, T=T, seed=5)
    ranks = [DataLoader(data, B=B, T=T, rank=r, world_size=world_size, seed=5)
             for r in range(world_size)]
    for _ in range(15):          # crosses epoch boundaries
        gx, gy = single.next_batch()
        parts = [dl.next_batch() for dl in ranks]
        ids = [w for x, _ in parts for w in _window_id(x)]
        assert len(ids) == len(set(ids))                       # disjoint
        np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), gx)
        np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), gy)


@pytest.mark.parametrize("skip", [0, 3, 9, 10, 11, 23])
def test_resume(data, skip):
    ref = DataLoader(data, B=4, T=T, seed=2)
    _batches(ref, skip)
    state = json.loads(json.dumps(ref.state_dict()))          # survives JSON
    expected = _batches(ref, 15)

    fresh = DataLoader(data, B=4, T=T, seed=2)
    fresh.next_batch()                                          # state to be overwritten
    fresh.load_state_dict(state)
    got = _batches(fresh, 15)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
               for a, b in zip(expected, got))


def test_list_of_paths(tmp_path):
    paths = _make_shards(tmp_path, [81, 200])
    dl = DataLoader([str(p) for p in paths], B=2, T=T, shuffle=False)
    assert dl.num_windows == 34
    dl2 = DataLoader(paths[1], B=2, T=T)                       # one path, no glob
    assert dl2.num_windows == 24


def test_no_files(tmp_path):
    pattern = str(tmp_path / "missing_*.bin")
    with pytest.raises(LlmpyError, match="missing_"):
        DataLoader(pattern, B=1, T=T)
    with pytest.raises(LlmpyError):
        DataLoader([], B=1, T=T)


def test_too_small(data):
    # 41 windows of T+1 = 9 tokens; B=21 with 2 ranks needs 42
    with pytest.raises(LlmpyError) as e:
        DataLoader(data, B=21, T=T, world_size=2)
    msg = str(e.value)
    assert "B=21" in msg and "T=8" in msg and "\n" not in msg
    DataLoader(data, B=41, T=T)                                 # exactly one batch is fine


def test_corrupt_shard_in_set(data, tmp_path):
    (tmp_path / "tok_000009.bin").write_bytes(b"garbage")
    with pytest.raises(LlmpyError, match="tok_000009.bin"):
        DataLoader(data, B=1, T=T)


@pytest.mark.parametrize("kw", [dict(B=0), dict(T=-1), dict(rank=2, world_size=2),
                                dict(world_size=0)])
def test_bad_arguments(data, kw):
    args = dict(B=2, T=T) | kw
    with pytest.raises(LlmpyError):
        DataLoader(data, **args)
