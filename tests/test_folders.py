"""training.folders: which output folders may be replaced, and the swap's durability."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from training.folders import check_replaceable, install, replace_folder


def marked(folder: Path) -> bool:
    return (folder / "mark").is_file()


@pytest.mark.parametrize(("make", "refused"), [
    (lambda out: None, None),  # missing
    (lambda out: out.mkdir(), None),  # empty
    (lambda out: (out.mkdir(), (out / "mark").write_text("")), None),  # an earlier output
    (lambda out: (out.mkdir(), (out / "notes.txt").write_text("")),
     "it is not empty and not an earlier thing"),
    (lambda out: out.write_text(""), "exists and is not a folder"),
    (lambda out: out.symlink_to(out.parent), "exists and is not a folder"),
])
def test_only_a_missing_empty_or_earlier_folder_may_be_replaced(tmp_path: Path, make,
                                                                refused: str | None) -> None:
    out = tmp_path / "out"
    make(out)
    if refused is None:
        check_replaceable(out, marked, "an earlier thing")
    else:
        with pytest.raises(FileExistsError, match=refused):
            check_replaceable(out, marked, "an earlier thing")


def folder_fsync_failing_with(code: int, monkeypatch) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EIO])
def test_a_swap_that_cannot_be_made_durable_says_so_unless_the_mount_cannot_sync_folders(
        tmp_path: Path, monkeypatch, code: int) -> None:
    out = tmp_path / "out"
    replace_folder(out, lambda folder: (folder / "mark").write_text("old"))
    folder_fsync_failing_with(code, monkeypatch)
    staged = tmp_path / ".out.convert-1-x"
    staged.mkdir()
    (staged / "mark").write_text("new")
    if code == errno.EIO:
        with pytest.raises(OSError, match="Input/output error"):
            install(staged, out)
    else:
        install(staged, out)
    assert (out / "mark").read_text() == "new"  # in place either way; EIO says it may not last


def test_a_refusal_is_one_line_saying_what_the_folder_holds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "assets").mkdir(parents=True)
    for name in ("index.html", "a\nb.txt", "c", "d", "e", "f"):
        (out / name).write_text("")
    with pytest.raises(FileExistsError) as caught:
        check_replaceable(out, marked, "an earlier thing")
    assert str(caught.value) == (f"refusing to replace {out}: it is not empty and not an earlier "
                                 "thing; it holds 'a\\nb.txt', assets/, c, d, e and 2 more; "
                                 "choose another --out")
