"""Teacher weights by name: Hugging Face Hub repos and files, URLs, local paths.

Online, files are downloaded into the HF cache (``huggingface_hub``); with ``HF_HUB_OFFLINE=1`` the
same names resolve from that cache with no network. With neither, one error names the id and how to
get the files. The environment is read at call time (``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` /
``HF_HOME``), so a test or a launcher may set it after ``huggingface_hub`` was imported.

Names:
  * repo ids ``org/name`` (``revision=`` pins a branch, tag or commit) for :func:`snapshot`;
  * files ``hf-hub:org/name/path/in/repo.npz`` (``hf-hub:org/name@rev/path`` pins a revision; ``hf://``
    works too), ``https://...`` URLs (kept under ``$HF_HOME/tipsdistill/urls``), or local paths, for
    :func:`resolve_file`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set (read now, not at import)."""
    return any(os.environ.get(v, "0").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache() -> str:
    """The HF hub cache folder: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def looks_like_repo_id(name: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(REPO_ID.match(name)) and not os.path.exists(name)


def _how_to_get(repo_id: str, revision: str | None, what: str, filename: str = "") -> str:
    rev = (f" {filename}" if filename else "") + (f" --revision {revision}" if revision else "")
    if offline():
        return (
            f"HF_HUB_OFFLINE=1 and {what} of {repo_id!r}{f' at revision {revision}' if revision else ''} is not in the "
            f"HF cache {hub_cache()}: run `huggingface-cli download {repo_id}{rev}` where there is network (same "
            "HF_HOME / HF_HUB_CACHE), copy that cache here, or unset HF_HUB_OFFLINE to download it now; or pass a "
            f"local path (`huggingface-cli download {repo_id}{rev} --local-dir DIR`)"
        )
    return (
        f"check the id {repo_id!r}{f' and revision {revision!r}' if revision else ''} on https://huggingface.co, "
        "your network, and a token (`huggingface-cli login`) for gated or private repos; or pass a local path"
    )


def snapshot(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> str:
    """The local folder of a hub repo (downloaded online, from the HF cache offline)."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=allow_patterns,
            cache_dir=hub_cache(),
            local_files_only=offline(),
        )
    except Exception as e:  # the hub client raises many types (offline, 404, gated, network)
        raise ValueError(
            f"cannot get the hub repo {repo_id!r}: {type(e).__name__}: {str(e).rstrip('.')}. {_how_to_get(repo_id, revision, 'the snapshot')}"
        ) from e
    logger.info("hub repo %s%s -> %s", repo_id, f"@{revision}" if revision else "", path)
    return path


def hub_file(repo_id: str, filename: str, revision: str | None = None) -> str:
    """One file of a hub repo (``hf_hub_download``), from the HF cache when offline."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=hub_cache(), local_files_only=offline()
        )
    except Exception as e:
        raise ValueError(
            f"cannot get {filename!r} from the hub repo {repo_id!r}: {type(e).__name__}: {str(e).rstrip('.')}. "
            f"{_how_to_get(repo_id, revision, repr(filename), filename)}"
        ) from e


def _parse_hub_file(spec: str) -> tuple[str, str, str | None]:
    """``hf-hub:org/name[@rev]/path`` or ``hf://...`` -> ``(repo_id, filename, revision)``."""
    rest = spec.split(":", 1)[1].lstrip("/") if spec.startswith("hf-hub:") else spec[len("hf://") :]
    parts = rest.split("/")
    if len(parts) < 3:
        raise ValueError(
            f"{spec!r}: a hub file is hf-hub:org/name/path/to/file (optionally org/name@revision/...)"
        )
    name, _, rev = parts[1].partition("@")
    return f"{parts[0]}/{name}", "/".join(parts[2:]), rev or None


def resolve_file(spec: str | os.PathLike[str], what: str = "file") -> str:
    """A local path for ``spec``: a local file, a hub file (``hf-hub:``/``hf://``) or an ``http(s)`` URL."""
    s = os.fspath(spec)
    if s.startswith(("hf-hub:", "hf://")):
        repo, filename, rev = _parse_hub_file(s)
        return hub_file(repo, filename, rev)
    if s.startswith(("http://", "https://")):
        return _url_file(s, what)
    return s


def _url_file(url: str, what: str) -> str:
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    dst = (
        Path(home)
        / "tipsdistill"
        / "urls"
        / hashlib.sha1(url.encode()).hexdigest()[:16]
        / url.rsplit("/", 1)[-1]
    )
    if dst.is_file():
        return str(dst)
    if offline():
        raise ValueError(
            f"{what} {url!r} is not downloaded yet and HF_HUB_OFFLINE=1: download it where there is network "
            f"(`curl -L -o {dst} {url}`), copy it to {dst}, or pass the local path instead"
        )
    import torch.hub

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(dst.suffix + f".{os.getpid()}.part")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=False)
    except Exception as e:
        raise ValueError(
            f"cannot download {what} {url!r}: {type(e).__name__}: {e}; check the URL and network"
        ) from e
    tmp.replace(dst)
    return str(dst)
