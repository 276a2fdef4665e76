"""Fixtures for the desktop viewer: a tiny real checkpoint and tissue images."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from gui_helpers import SCREEN

from histolens.testing import make_checkpoint, make_tissue_image


@pytest.fixture(autouse=True)
def _collect_tk_objects_on_the_main_thread() -> Iterator[None]:
    """Tk objects (variables, images) a test leaves in reference cycles are collected here, on
    the main thread. Collected later by whichever thread next triggers the garbage collector (a
    later test file's worker thread, in the same pytest-xdist worker), Tkinter raises 'main
    thread is not in main loop', and Tcl can abort the whole process ('async handler deleted by
    the wrong thread'), which xdist reports as a crashed worker."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A random-weight test_resnet checkpoint with test metrics in its metadata."""
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    return make_checkpoint(
        path,
        metrics={
            "split": "test",
            "roc_auc": 0.912,
            "patient_recognition_rate": 0.875,
            "n_images": 40,
        },
    )


@pytest.fixture
def image_path(tmp_path) -> Path:
    path = tmp_path / "SOB_M_DC-14-2523-400-001.png"
    make_tissue_image((140, 96), seed=3).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Five readable tissue images (one in a sub-folder), one broken PNG and a text file."""
    root = tmp_path / "slides"
    (root / "patient_b").mkdir(parents=True)
    for i in range(4):
        make_tissue_image((96, 64), seed=i, dark=i % 2 == 1).save(root / f"tile_{i}.png")
    make_tissue_image((96, 64), seed=9, dark=True).save(root / "patient_b" / "tile_9.png")
    (root / "broken.png").write_bytes(b"this is not a png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def xvfb_display() -> Iterator[str]:
    """A private Xvfb server on a free display number (Xvfb picks it: -displayfd)."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (Debian: apt install xvfb)")
    try:
        import tkinter  # noqa: F401
    except ImportError:
        pytest.skip("this Python was built without tkinter")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [
            "Xvfb",
            "-displayfd",
            str(write_fd),
            "-screen",
            "0",
            f"{SCREEN[0]}x{SCREEN[1]}x24",
            "-nolisten",
            "tcp",
        ],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as fh:
        number = fh.readline().strip()
    if not number:
        proc.kill()
        pytest.skip("Xvfb did not start")
    display = f":{number}"
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = display
    try:
        yield display
    finally:
        if old is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = old
        proc.terminate()
        proc.wait(timeout=10)
