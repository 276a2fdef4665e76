"""Files of Hugging Face hub repositories: from the local cache when it holds them, else
downloaded, and one sentence naming the remedy when neither works (gated, offline, not found)."""

from __future__ import annotations

from pathlib import Path

import torch

from histolens.errors import PretrainedWeightsError

__all__ = ["hub_cached", "hub_error", "hub_file", "hub_safetensors", "require_token"]


def hub_safetensors(hub_id: str, gated: bool) -> dict[str, torch.Tensor]:
    """The weights of a transformers-layout repository: model.safetensors, or its shards."""
    import json

    from safetensors.torch import load_file

    try:
        files = [hub_file(hub_id, "model.safetensors", gated)]
    except PretrainedWeightsError as single:
        try:
            index = hub_file(hub_id, "model.safetensors.index.json", gated)
        except PretrainedWeightsError:
            raise single from None
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        files = [hub_file(hub_id, shard, gated) for shard in shards]
    return {k: v for f in files for k, v in load_file(f).items()}


def hub_cached(hub_id: str, filenames: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    return all(
        isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str)
        for f in filenames
    )


def require_token(hub_id: str) -> None:
    """A gated model needs a token before the first download: say so before any network call."""
    from huggingface_hub import get_token

    if get_token() is None:
        raise PretrainedWeightsError(_gated_sentence(hub_id, token=False))


def _gated_sentence(hub_id: str, token: bool) -> str:
    repo = hub_id.split("@")[0]
    if token:
        return (
            f"{repo} is gated and your Hugging Face token has no access yet: accept its licence "
            f"at https://huggingface.co/{repo} with the account of that token."
        )
    return (
        f"{repo} is gated: accept its licence at https://huggingface.co/{repo} and run "
        "'hf auth login' (or set HF_TOKEN)."
    )


def hub_file(hub_id: str, filename: str, gated: bool) -> str:
    """A file of a hub repository: from the local cache, else downloaded (token from
    ``huggingface_hub``: HF_TOKEN or the login cache)."""
    from huggingface_hub import hf_hub_download

    repo, _, revision = hub_id.partition("@")
    if gated and not hub_cached(hub_id, (filename,)):
        require_token(hub_id)
    try:
        return hf_hub_download(repo, filename, revision=revision or None)
    except Exception as exc:
        if isinstance(exc, MemoryError):
            raise
        raise hub_error(hub_id, exc) from None


def hub_error(hub_id: str, exc: Exception) -> PretrainedWeightsError:
    """One sentence naming the remedy for a failed hub download."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import (  # also where huggingface_hub 0.20-0.23 keeps them
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    repo = hub_id.split("@")[0]
    chain = [exc, exc.__cause__, exc.__context__]
    if any(isinstance(e, GatedRepoError) for e in chain):
        return PretrainedWeightsError(_gated_sentence(hub_id, token=get_token() is not None))
    if any(isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for e in chain) or any(
        type(e).__name__ in ("ConnectError", "ConnectTimeout", "ConnectionError") for e in chain
    ):
        why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "no network"
        return PretrainedWeightsError(
            f"{repo} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({why}): run once with a network, or copy the cache (HF_HUB_CACHE)."
        )
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return PretrainedWeightsError(
            f"{repo} was not found on the Hugging Face hub: check the name (a private "
            "repository also needs 'hf auth login' or HF_TOKEN)."
        )
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", "?")
        return PretrainedWeightsError(
            f"The Hugging Face hub refused {repo} (HTTP {status}); try again later."
        )
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return PretrainedWeightsError(
        f"The weights of {repo} could not be loaded ({type(exc).__name__}: {first})."
    )
