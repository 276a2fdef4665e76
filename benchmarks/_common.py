"""Helpers shared by the benchmark scripts: where the real data are, and table printing."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

REAL_DATA = Path(
    os.environ.get(
        "HISTOLENS_REAL_DATA",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "breakhis-dev",
    )
)


def setup(threads: int = 2) -> None:
    """Offline, and the same thread count for every measurement."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)


def require_real_data(sub: str = "") -> Path:
    path = REAL_DATA / sub
    if not path.exists():
        raise SystemExit(f"Real BreakHis images not found at {path}; set HISTOLENS_REAL_DATA.")
    return path


def repeated_study_parser(doc: str | None, task: bool = True) -> argparse.ArgumentParser:
    """Command line of a study repeated over seeds: ``--repeats``, and ``--task`` when it has one."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if task:
        ap.add_argument("--task", choices=["binary", "subtype"], default="binary")
    ap.add_argument("--repeats", type=int, default=3, help="seeds 0..repeats-1")
    return ap


def mean_sd(values) -> str:
    """``mean +/- sd`` cell over repeats: NaNs ignored, sample sd, and sd 0 for one value."""
    v = np.asarray(values, float)
    sd = np.nanstd(v, ddof=1) if len(v) > 1 else 0.0
    return f"{np.nanmean(v):.3f} +/- {sd:.3f}"


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [headers] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))


def cv_rows(name: str, result) -> list[object]:
    s = result.summary()
    return (
        [name]
        + [
            f"{s[k][0]:.3f} +/- {s[k][1]:.3f}"
            for k in ("roc_auc", "patient_recognition_rate", "patient_auc")
        ]
        + [f"{result.seconds:.0f}"]
    )


CV_HEADERS = ["setting", "image AUC", "patient recognition rate", "patient AUC", "seconds"]
