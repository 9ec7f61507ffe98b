"""A model named as every `--model` is (`core.models.resolve_model`), as a folder of weight files.

`export diff | recover` read a model tensor by tensor from its files, so a name must become a
folder: a folder stays as it is; a .gguf file or a built-in name becomes its dense copy (float32
safetensors, made once by `core.gguf_cache`, the weights `train` and `export merge` start from);
a Hugging Face id becomes its snapshot folder in the local cache.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .gguf_cache import dense_gguf
from .models import ERROR_EXCERPT_CHARS, hub_offline, resolve_model


def weights_folder(spec: str, flag: str) -> str:
    """The folder holding the weights `spec` names, or an error naming `flag`."""
    path = Path(spec).expanduser()
    if path.is_dir() or (spec.startswith((".", "/", "~")) and not path.is_file()):
        return spec  # a folder, or a path naming nothing: the folder reader says which
    try:
        source = resolve_model(spec)
    except UserError as e:
        raise UserError(f"{flag} {e.message}", e.fix) from e
    if source.kind in ("gguf", "builtin"):
        dense = dense_gguf(Path(source.location))
        if dense.folder is None:
            raise UserError(
                f"{flag} {spec}: its dense copy could not be saved to the cache, and these weights are "
                "read from files",
                "make the cache writable (ALPACA_FORGE_CACHE names another folder; unset "
                "ALPACA_FORGE_NO_CACHE), or give a model folder",
            )
        return str(dense.folder)
    return _snapshot(spec, flag)


def _snapshot(hub_id: str, flag: str) -> str:
    """A cached Hugging Face model's snapshot folder (downloaded only where downloads are on)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(hub_id, local_files_only=hub_offline())
    except (OSError, ValueError) as e:  # not cached, no network, an unknown repo (hub errors are OSErrors)
        first = " ".join(str(e).split())[:ERROR_EXCERPT_CHARS]
        raise UserError(
            f"{flag} {hub_id}: its files are not in the local Hugging Face cache ({first})",
            f"on a machine with network run `huggingface-cli download {hub_id}`, or give a model folder",
        ) from e
