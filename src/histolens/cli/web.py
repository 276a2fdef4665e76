"""``histolens serve``: the web service and page. Register ``serve_command`` on the main group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from histolens.cli.options import (
    checkpoint_option,
    count_option,
    device_option,
    engine_option,
    float_option,
    microns_option,
    onnx_runtime_option,
    path_option,
)

__all__ = ["serve_command"]

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


@click.command("serve")
@checkpoint_option(required=True)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on; 0.0.0.0 exposes the service to the network.",
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--token",
    envvar="HISTOLENS_TOKEN",
    default=None,
    show_envvar=True,
    help="Require 'Authorization: Bearer TOKEN' on /v1/* (the page and /healthz stay open).",
)
@float_option("--max-upload-mb", 20.0, "Largest image upload; larger ones get 413.", 0.001)
@count_option(
    "--max-queue", 64, help="Requests that may wait for the model; more get 503 with Retry-After."
)
@count_option(
    "--max-batch",
    16,
    help="Images per model call when concurrent requests are micro-batched (1: off).",
)
@float_option(
    "--batch-wait-ms", 2.0, "How long a micro-batch waits for more requests after its first."
)
@count_option("--max-batch-files", 16, help="Files per /v1/predict/batch request.")
@device_option()
@onnx_runtime_option()
@engine_option()
@path_option(
    "--slides",
    "slides",
    exists=True,
    file_okay=False,
    help="A folder of whole-slide images to show in the slide viewer at /slides (only read).",
)
@path_option(
    "--slide-cache",
    file_okay=False,
    help="Where slide analyses are kept across restarts [default: ~/.cache/histolens/slides].",
)
@microns_option(
    "--slide-tile-mpp",
    "Microns per pixel of the tiles a slide analysis scores [default: the checkpoint's].",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
def serve_command(
    checkpoint: Path,
    host: str,
    port: int,
    token: str | None,
    max_upload_mb: float,
    log_level: str,
    **service: Any,
) -> None:
    """Serve a model: REST API under /v1, a web page at /, API docs at /docs; with --slides, a
    slide viewer at /slides.

    Research and education use only; not for diagnosis.
    """
    from histolens.checkpoint.io import read_metadata
    from histolens.inference.loading import resolve_runtime
    from histolens.inference.runtimes import check_runtime_usable
    from histolens.web.settings import ServiceSettings

    # The other options are ServiceSettings' fields of the same names.
    settings = ServiceSettings(
        token=token or None, max_upload_bytes=int(max_upload_mb * 1024 * 1024), **service
    )
    # Fail here with one line if the checkpoint or its runtime is unusable, not in the server's
    # startup log.
    meta = read_metadata(checkpoint)
    runtime = resolve_runtime(checkpoint, settings.onnx_runtime)
    if runtime is not None:
        check_runtime_usable(runtime, settings.device, from_env=settings.onnx_runtime is None)
    import uvicorn

    from histolens.web.app import create_app

    if host not in LOOPBACK_HOSTS and not token:
        click.secho(
            f"warning: serving on {host} without --token; anyone who can reach this "
            "machine can use the API.",
            fg="yellow",
            err=True,
        )
    app = create_app(checkpoint, settings)
    shown_host = f"[{host}]" if ":" in host else host
    on_runtime = f" on {runtime}" if runtime else ""
    click.echo(
        f"histolens: serving {meta.model_id or checkpoint.name} "
        f"({meta.backbone}{on_runtime}) at http://{shown_host}:{port}/ (API docs at /docs)"
        + ("; API token required" if token else "")
        + (f"; slides of {settings.slides} at /slides" if settings.slides else "")
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
