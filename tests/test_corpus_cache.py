"""A corpus cache that was cut short, emptied by a crash or bit-flipped is reported in one line and rebuilt,
never read as garbage: the rebuilt blocks equal a fresh build's, and a whole cache is never rebuilt."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from distill.data import corpus as data
from tests.test_data import random_lines, write
from tests import tiny


@pytest.fixture(scope="module")
def tok(vocab_dir):
    return AutoTokenizer.from_pretrained(vocab_dir)


def build(tmp_path, tok):
    path = write(tmp_path / "corpus.txt", "\n".join(random_lines(200, seed=5)))
    ds = data.load_corpus_blocks(path, tok, 16, tmp_path / "cache")
    return path, ds["input_ids"][:], Path(ds.cache_files[0]["filename"]).parent


def damage(file: Path, how: str) -> None:
    if how == "truncated":
        os.truncate(file, file.stat().st_size // 2)
    elif how == "emptied":
        os.truncate(file, 0)
    else:  # one byte flipped: same size, other contents
        raw = bytearray(file.read_bytes())
        raw[len(raw) - 40] ^= 0x01
        file.write_bytes(bytes(raw))


def test_the_cache_records_each_files_size_and_sha256(tmp_path, tok):
    import hashlib

    _, _, blocks = build(tmp_path, tok)
    meta = json.loads((blocks / "meta.json").read_text())
    raw = (blocks / "blocks.arrow").read_bytes()
    assert meta["checksums"] == {"blocks.arrow": {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}}


@pytest.mark.parametrize("which", ["blocks", "tokens"])
@pytest.mark.parametrize("how", ["truncated", "emptied", "flipped"])
def test_a_damaged_cache_is_reported_in_one_line_and_rebuilt_to_the_same_blocks(tmp_path, tok, capsys, how, which):
    path, expected, blocks = build(tmp_path, tok)
    tokens = tmp_path / "cache" / json.loads((blocks / "meta.json").read_text())["tokens_dir"]
    if which == "tokens":  # what blocks are built from: checked when a block setting needs them again
        (tmp_path / "cache" / blocks.name).rename(tmp_path / "blocks-set-aside")
        damage(tokens / "tokens.arrow", how)
    else:
        damage(blocks / "blocks.arrow", how)
    capsys.readouterr()
    again = data.load_corpus_blocks(path, tok, 16, tmp_path / "cache")
    lines = capsys.readouterr().err.strip().splitlines()
    notes = [line for line in lines if line.startswith("note: corpus cache")]
    folder = tokens if which == "tokens" else blocks
    assert len(notes) == 1 and str(folder) in notes[0] and notes[0].endswith("rebuilding it"), lines
    assert again["input_ids"][:] == expected
    capsys.readouterr()
    data.load_corpus_blocks(path, tok, 16, tmp_path / "cache")  # whole now: read as is, nothing said
    assert "corpus cache" not in capsys.readouterr().err


def test_a_second_process_waits_for_the_one_rebuilding_and_never_removes_its_fresh_cache(tmp_path, tok, capsys):
    """The blocks' lock held elsewhere (another run rebuilding them): a load waits, touching nothing, until it is
    released; then it finds the cache whole (the other run's rebuild) and reads it without a note. Two runs
    that both found a cache damaged used to delete each other's rebuild."""
    import threading
    import time

    path, expected, blocks = build(tmp_path, tok)
    damage(blocks / "blocks.arrow", "truncated")
    done = {}
    with data._cache_lock(tmp_path / "cache", blocks.name):  # the other process: it rebuilds while it holds this
        worker = threading.Thread(target=lambda: done.update(rows=data.load_corpus_blocks(
            path, tok, 16, tmp_path / "cache")["input_ids"][:]))
        worker.start()
        time.sleep(1.5)
        assert worker.is_alive() and "rows" not in done  # waiting
        assert (blocks / "meta.json").is_file()  # the damaged cache not removed under the holder's feet
        (blocks / "blocks.arrow").unlink()  # the holder's rebuild, published before it lets go
        (blocks / "meta.json").unlink()
        rebuilt = tmp_path / "rebuilt"
        again = data.load_corpus_blocks(path, tok, 16, rebuilt)
        fresh = Path(again.cache_files[0]["filename"]).parent
        for f in fresh.iterdir():
            (blocks / f.name).write_bytes(f.read_bytes())
    worker.join(timeout=60)
    assert done["rows"] == expected
    err = capsys.readouterr().err
    assert "another process is building corpus cache" in err and "is damaged" not in err


def test_a_file_system_without_locks_builds_the_cache_with_a_note(tmp_path, tok, capsys, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    path, expected, _ = build(tmp_path, tok)
    monkeypatch.setattr(fcntl, "flock", no_locks)  # Lustre without -o flock, some FUSE / NFS setups
    capsys.readouterr()
    again = data.load_corpus_blocks(path, tok, 16, tmp_path / "unlocked")
    assert again["input_ids"][:] == expected
    notes = [line for line in capsys.readouterr().err.splitlines() if "gives no file locks" in line]
    assert notes and "No locks available" in notes[0]


def test_a_damaged_token_count_file_is_counted_again(tmp_path, tok, capsys):
    path, _, blocks = build(tmp_path, tok)
    ds = data.load_corpus_blocks(path, tok, 16, tmp_path / "cache")
    counts = data.token_counts(ds, tiny.VOCAB_SIZE)
    cached = blocks / f"token_counts-{tiny.VOCAB_SIZE}.npy"
    damage(cached, "truncated")
    capsys.readouterr()
    np.testing.assert_array_equal(data.token_counts(ds, tiny.VOCAB_SIZE), counts)
    assert "token count cache" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(cached), counts)  # rewritten whole
