"""PathWatch: one non-blocking read says whether any watched path changed."""

from __future__ import annotations

import os
from pathlib import Path

from agent.runtime.inotify import PathWatch


def test_nothing_changed_then_a_new_entry_in_a_watched_directory(tmp_path: Path) -> None:
    watch = PathWatch([str(tmp_path)])
    try:
        assert not watch.changed()
        assert not watch.changed()
        (tmp_path / "libnvidia-ml.so.1").write_bytes(b"\x7fELF")
        assert watch.changed()
        assert watch.changed()  # stays changed: the caller makes a new watch
    finally:
        watch.close()


def test_a_file_edited_in_place_or_its_mode_changed(tmp_path: Path) -> None:
    config = tmp_path / "ld.so.conf"
    config.write_text("/usr/lib64\n")
    for change in (
        lambda: config.write_text("/usr/lib64\n/opt/driver/lib\n"),
        lambda: config.chmod(0o600),
    ):
        watch = PathWatch([str(config)])
        try:
            assert not watch.changed()
            change()
            assert watch.changed()
        finally:
            watch.close()


def test_a_path_that_does_not_exist_yet_is_watched_through_its_ancestor(tmp_path: Path) -> None:
    missing = tmp_path / "usr" / "local" / "nvidia" / "lib64"
    watch = PathWatch([str(missing)])
    try:
        assert not watch.changed()
        (tmp_path / "usr").mkdir()
        assert watch.changed()
    finally:
        watch.close()


def test_renamed_away_and_a_closed_watch_count_as_changed(tmp_path: Path) -> None:
    directory = tmp_path / "lib"
    directory.mkdir()
    watch = PathWatch([str(directory)])
    os.rename(directory, tmp_path / "lib.old")  # noqa: PTH104
    assert watch.changed()
    watch.close()
    still = PathWatch([str(tmp_path)])
    still.close()
    assert still.changed()
