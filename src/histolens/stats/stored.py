"""Reading back a versioned part that ``to_dict`` stored in a checkpoint's metadata."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from histolens.errors import CheckpointError

__all__ = ["read_stored"]

T = TypeVar("T")


def read_stored(
    d: Mapping[str, Any],
    newest: int,
    subject: str,
    read: Callable[[], T],
    *,
    plural: bool = False,
    errors: tuple[type[Exception], ...] = (KeyError, TypeError, ValueError),
) -> T:
    """``read()`` of the stored part ``d``, named ``subject`` in messages.

    Raises:
        CheckpointError: ``d`` has a format version above ``newest`` (a newer histolens wrote
            it), or reading it raised one of ``errors`` (it is damaged).
    """
    was, its = ("were", "are") if plural else ("was", "is")
    try:
        if int(d.get("format_version", 1)) > newest:
            raise CheckpointError(f"{subject} {was} written by a newer histolens; upgrade.")
        return read()
    except errors as exc:
        raise CheckpointError(f"{subject} {its} damaged ({exc}).") from None
