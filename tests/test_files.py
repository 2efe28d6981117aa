"""lopfast.files: the one atomic writer and the cross-process lock."""
import json
import multiprocessing as mp
import os

import pytest

from lopfast import files


def test_write_json_text_bytes_roundtrip(tmp_path):
    files.write_json(tmp_path / "a.json", {"x": 1.5})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1.5}
    files.write_text(tmp_path / "b.txt", "héllo\n")
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    files.write_bytes(tmp_path / "c.bin", b"\x00\x01")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.txt", "c.bin"]  # no temporary left behind


def test_failed_write_keeps_the_old_file_and_names_the_path(tmp_path):
    p = tmp_path / "keep.txt"
    p.write_text("old")

    def boom(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(OSError, match="keep.txt"):
        files.write_atomic(p, boom, text=True, what="report")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_missing_folder_named_unless_make_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="to write the checkpoint in"):
        files.write_text(tmp_path / "no" / "x.txt", "x", what="checkpoint")
    files.write_text(tmp_path / "no" / "x.txt", "x", make_dirs=True)
    assert (tmp_path / "no" / "x.txt").read_text() == "x"


def test_directory_target_refused(tmp_path):
    with pytest.raises(IsADirectoryError):
        files.write_text(tmp_path, "x")


def test_mode_kept_and_symlink_written_through(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("a")
    os.chmod(real, 0o640)
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    files.write_text(link, "b")
    assert link.is_symlink() and real.read_text() == "b"
    assert (os.stat(real).st_mode & 0o777) == 0o640


def _bump(path, lock, n):
    for _ in range(n):
        with files.file_lock(lock):
            v = int(open(path).read()) if os.path.exists(path) else 0
            files.write_text(path, str(v + 1))


def test_file_lock_serialises_processes(tmp_path):
    path, lock = str(tmp_path / "count"), str(tmp_path / "count.lock")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_bump, args=(path, lock, 25)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert open(path).read() == "75"
