"""Outputs appear whole or not at all, and a killed writer's temp files do not stay forever."""
import errno
import os
import socket

import pytest

from pixart.atomic import atomic_dir, atomic_write, file_mode, remove_dead_writers
from pixart.errors import PixArtError


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "DONE.json"
    target.write_text("old")
    killed = tmp_path / f".summary.json.tmp-{socket.gethostname()}-999999999-abc"  # SIGKILLed in its atomic_write
    killed.write_text("half")
    atomic_write(target, '{"steps": 6}')
    assert target.read_text() == '{"steps": 6}'
    assert [p.name for p in tmp_path.iterdir()] == ["DONE.json"]  # a rerun's writes leave no temp of a killed run
    assert target.stat().st_mode & 0o777 == file_mode()  # the umask's modes, not mkstemp's 0600


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "latest"
    target.write_text("step-000002")
    try:
        atomic_write(target, object())  # not bytes: fails while writing
    except TypeError:
        pass
    assert target.read_text() == "step-000002" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(PixArtError, match=r"^.*/DONE.json: cannot write there \(No space left on device\)$"):
        atomic_write(tmp_path / "DONE.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_only_this_hosts_dead_writers_temps_are_removed(tmp_path):
    host = socket.gethostname()
    dead_file = tmp_path / f".latest.tmp-{host}-999999999-abc"  # no process has that pid
    dead_folder = tmp_path / f".export.tmp-{host}-999999999-def"
    live = tmp_path / f".config.yaml.tmp-{host}-{os.getppid()}-ghi"  # a writer that still runs
    elsewhere = tmp_path / ".latest.tmp-another-host-999999999-jkl"  # its pid means nothing here
    longer_name = tmp_path / f".latest.tmp-{host}-999999999-{os.getpid()}-mno"  # host "HOST-999999999"'s temp
    own = tmp_path / "model.tmp-notes.txt"  # not a temp: no leading dot
    dead_folder.mkdir()
    for path in (dead_file, live, elsewhere, longer_name, own):
        path.write_text("half")
    remove_dead_writers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name, longer_name.name,
                                                                 own.name])


def test_a_plain_file_is_never_replaced_by_a_folder(tmp_path):
    """--out naming the user's file is a mistake, not an output of ours to replace, even with --overwrite."""
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(PixArtError, match=f"^--out {target} is not a folder$"):
        with atomic_dir(target, overwrite=True):
            raise AssertionError("written")
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"] and target.read_text() == "old"


def test_a_process_clears_a_folder_of_dead_writers_once_not_at_every_write(tmp_path, monkeypatch):
    """Listing a folder of 40,000 captions at every write made a data job quadratic; an explicit sweep (a job's
    start) still clears what a writer killed since left."""
    import pixart.atomic as atomic
    sweeps = []
    monkeypatch.setattr(atomic, "remove_dead_writers", lambda folder, sweep=atomic.remove_dead_writers: (
        sweeps.append(folder), sweep(folder)))
    for i in range(5):
        atomic_write(tmp_path / f"{i}.json", "{}")
    assert sweeps == [tmp_path]
    dead = tmp_path / f".5.json.tmp-{socket.gethostname()}-999999999-abc"
    dead.write_text("half")
    atomic_write(tmp_path / "5.json", "{}")
    assert dead.exists()
    remove_dead_writers(tmp_path)
    assert not dead.exists()
