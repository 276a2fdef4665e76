"""The process's one OpenVINO ``Core``: every OpenVINO compile goes through it.

OpenVINO's CPU plugin (seen with 2026.4) gives the thread that loads it a signal stack of its own
and, when the plugin is unloaded, gives the thread back the stack it found there. With two Cores
dropped in the order they were made (or one dropped in another thread), the thread is left with a
signal stack that is already unmapped, and the next signal it handles (SIGCHLD under PyTorch's
DataLoader handler, Ctrl-C, a server's SIGTERM) kills the process with SIGSEGV before any handler,
faulthandler's included, can run. One Core kept for the life of the process loads the plugin once
and never unloads it early (tests/test_openvino.py shows the failure in a child process).
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_core: Any = None


def openvino_core() -> Any:
    """The shared ``openvino.Core``, made on first use (the caller has checked that OpenVINO is
    installed). ``Core.compile_model`` may be called from several threads at once."""
    global _core
    with _lock:
        if _core is None:
            import openvino

            _core = openvino.Core()
        return _core
