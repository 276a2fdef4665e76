"""Atomic writes: a finished write replaces the file, an interrupted one leaves the old file."""

from __future__ import annotations

import pytest

from histolens.atomic import atomic_open, atomic_path, atomic_write_bytes, atomic_write_text


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_finished_write_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "new" / "folder" / "report.csv"
    assert atomic_write_text(target, "a,b\n1,2\n") == target  # parents are made
    assert target.read_text() == "a,b\n1,2\n"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _leftovers(target.parent) == []


@pytest.mark.parametrize("interruption", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_the_old_file_intact(tmp_path, interruption):
    target = tmp_path / "predictions.csv"
    target.write_text("the old, complete file\n")
    with pytest.raises(type(interruption)), atomic_open(target, "w", encoding="utf-8") as fh:
        fh.write("half of a new ")
        fh.flush()
        raise interruption
    assert target.read_text() == "the old, complete file\n"
    assert _leftovers(tmp_path) == []


def test_an_interrupted_first_write_leaves_no_file_at_all(tmp_path):
    target = tmp_path / "checkpoint.bin"
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise OSError("killed")
    assert list(tmp_path.iterdir()) == []


def test_the_temp_file_lies_next_to_the_target_until_the_rename(tmp_path):
    """Same folder, hence same file system: the final rename is atomic, never a copy."""
    target = tmp_path / "model.safetensors"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".model.safetensors.")
        tmp.write_text("new")
        assert target.read_text() == "old"  # readers see the old file until the block ends
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == []
