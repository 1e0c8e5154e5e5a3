"""Getting models from the Hugging Face hub, and the disk they take.

- ``download``: a snapshot into the HF cache with byte progress (multi-GB for 7B models). huggingface_hub keeps
  partial files as ``*.incomplete`` blobs and resumes them, so an interrupted download continues where it stopped.
- Gated models (Llama, Mistral, Gemma) fail with ``HubError`` that says how to accept the licence and where the token
  goes. ``login`` stores a token with huggingface_hub's own login (its token file); the studio never logs it and
  never writes it into run configs or the run history.
- ``cached_models`` / ``delete_cached``: what the HF cache and the studio's converted-models folder hold, and
  deleting one of them.
- ``offline``: whether the hub can be reached, decided once per process (``HF_HUB_OFFLINE``, or one probe with a
  short timeout). Offline, lookups answer from the cache at once: huggingface_hub's offline mode is switched on, so
  no handler sits in a retry loop against a hub it cannot reach.
"""
from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from studio.errors import StudioError

log = logging.getLogger(__name__)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
# progress(done_bytes, total_bytes, message)
ByteProgress = Callable[[int, int, str], None] | None


class HubError(StudioError, RuntimeError):
    """A download or login that failed; the message says what to do (and never contains a token)."""


# ---- online or not, decided once ---------------------------------------------------------------------------------

PROBE_TIMEOUT_S = 3.0
_offline: bool | None = None
_offline_lock = threading.Lock()


def _probe(timeout: float) -> bool:
    """True when the hub answers within ``timeout`` seconds (any HTTP status: it is reachable)."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=timeout, follow_redirects=False)
        return True
    except Exception:  # no route, DNS, proxy, timeout: unreachable
        return False


def offline() -> bool:
    """Whether the hub is out of reach, decided once per process: ``HF_HUB_OFFLINE`` set, else one probe with a
    short timeout. Once offline, huggingface_hub's offline mode is on too, so every later lookup (tokenizers,
    configs, snapshots) reads the cache and fails at once instead of retrying."""
    global _offline
    with _offline_lock:
        if _offline is None:
            from huggingface_hub import constants

            _offline = bool(constants.HF_HUB_OFFLINE) or not _probe(PROBE_TIMEOUT_S)
            if _offline and not constants.HF_HUB_OFFLINE:
                constants.HF_HUB_OFFLINE = True
                log.info("the hub (%s) cannot be reached: models and tokenizers come from the local cache only",
                         constants.ENDPOINT)
        return _offline


def reset_offline() -> None:
    """Forget the decision (tests; a machine that came online can restart the studio instead)."""
    global _offline
    with _offline_lock:
        _offline = None


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _repo_folder(repo_id: str, root: Path) -> Path:
    return root / ("models--" + repo_id.replace("/", "--"))


def _folder_bytes(folder: Path) -> int:
    total = 0
    if folder.is_dir():
        for f in folder.rglob("*"):
            try:
                if f.is_file() and not f.is_symlink():
                    total += f.stat().st_size
            except OSError:
                pass
    return total


def gated_message(repo_id: str) -> str:
    from studio.config import presets

    msg = (f"{repo_id} is gated: its licence has to be accepted once. 1) Open https://huggingface.co/{repo_id} while "
           "logged in and accept the licence (approval can take a while). 2) Create a token with 'read' access at "
           "https://huggingface.co/settings/tokens and paste it into 'Hugging Face token' in the Model & preset tab "
           "(or run `hf auth login`). The token is kept by huggingface_hub's own login, never in the studio's files.")
    preset = presets.find_model(repo_id)
    if preset is not None and preset.get("unsloth_id") and preset.get("unsloth_id") != repo_id:
        msg += (f" On a CUDA GPU, Unsloth's pre-quantized copy {preset.get('unsloth_id')} needs no token (the model's "
                "licence still applies).")
    return msg


def download(repo_id: str, progress: ByteProgress = None, token: str | None = None,
             root: Path | None = None, poll_s: float = 0.5) -> str:
    """The local snapshot folder of ``repo_id``, downloading what is missing. ``progress`` gets the bytes on disk
    against the total every ``poll_s`` seconds (partial files count, so a resumed download starts where it was)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (DryRunError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    root = Path(root) if root else cache_dir()
    kw = dict(allow_patterns=ALLOW_PATTERNS, cache_dir=str(root))
    try:
        return snapshot_download(repo_id, local_files_only=True, **kw)
    except Exception:  # not (completely) in the cache yet
        pass
    if offline():
        raise HubError(f"{repo_id} is not in the local cache and the hub cannot be reached: connect to the internet "
                       "and restart the studio (the download resumes where it stopped), or point at a local folder / "
                       ".gguf file")
    try:
        try:
            plan = snapshot_download(repo_id, dry_run=True, token=token, **kw)
        except DryRunError as e:  # the listing failed: say why (gated, unknown, offline)
            cause = e.__cause__
            if isinstance(cause, (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError)):
                raise cause from None
            raise LocalEntryNotFoundError(str(e)) from None
        total = sum(f.file_size or 0 for f in plan)
        result: dict = {}

        def work():
            try:
                result["path"] = snapshot_download(repo_id, token=token, **kw)
            except BaseException as e:  # handed to the caller's thread
                result["error"] = e

        worker = threading.Thread(target=work, name=f"download-{repo_id}", daemon=True)
        worker.start()
        folder = _repo_folder(repo_id, root)
        while worker.is_alive():
            if progress:
                progress(min(_folder_bytes(folder), total), total, f"Downloading {repo_id}")
            worker.join(poll_s)
        if "error" in result:
            raise result["error"]
        if progress:
            progress(total, total, f"Downloaded {repo_id}")
        return result["path"]
    except GatedRepoError:
        raise HubError(gated_message(repo_id)) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise HubError(f"no model '{repo_id}' on the hub, or it is private: check the id (and your token for a "
                       "private model)") from None
    except LocalEntryNotFoundError:
        raise HubError(f"{repo_id} is not in the local cache and the hub cannot be reached: connect to the internet "
                       "(the download resumes where it stopped), or point at a local folder / .gguf file") from None


# ---- what a download fetches ----------------------------------------------------------------------------------------

def is_hub_id(name: str) -> bool:
    """A hub repo id ('owner/name'), not the bundled model or a local path."""
    from studio.config.run import BUNDLED_MODEL

    return (name != BUNDLED_MODEL and name.count("/") == 1 and not name.startswith(("/", ".", "~"))
            and not Path(name).expanduser().exists())


# ---- token -----------------------------------------------------------------------------------------------------

def has_token() -> bool:
    from huggingface_hub import get_token

    return bool(get_token())


def login(token: str) -> str:
    """Store a Hugging Face token with huggingface_hub's login (validated against the hub). Returns a status line;
    errors never repeat the token."""
    import huggingface_hub

    token = (token or "").strip()
    if not token:
        raise HubError("paste a Hugging Face access token (https://huggingface.co/settings/tokens, 'read' access)")
    if not token.startswith("hf_") or any(c.isspace() for c in token):
        raise HubError("that does not look like a Hugging Face access token (they start with 'hf_')")
    try:
        huggingface_hub.login(token=token, add_to_git_credential=False, skip_if_logged_in=False)
    except Exception as e:
        kind = type(e).__name__
        raise HubError(f"the hub did not accept the token ({kind}): check it was copied whole and has 'read' "
                       "access, and that this machine is online") from None
    return "Token stored by huggingface_hub's login; gated models you accepted will download now."


# ---- what the disk holds -----------------------------------------------------------------------------------------

@dataclass
class CachedModel:
    name: str  # repo id, or the folder name of a converted model
    kind: str  # "hub" | "converted" | "partial"
    size_bytes: int
    path: str

    @property
    def size_gb(self) -> float:
        return round(self.size_bytes / 1e9, 2)


def cached_models(root: Path | None = None, converted_dir: Path | None = None) -> list[CachedModel]:
    """Models in the HF cache (with partial downloads) and the studio's converted checkpoints, largest first."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from studio import paths

    root = Path(root) if root else cache_dir()
    out: list[CachedModel] = []
    if root.is_dir():
        try:
            info = scan_cache_dir(root)
        except CacheNotFound:
            info = None
        if info is not None:
            for repo in info.repos:
                if repo.repo_type == "model":
                    size = _folder_bytes(Path(repo.repo_path))  # blobs, including partial downloads
                    out.append(CachedModel(repo.repo_id, "hub", size, str(repo.repo_path)))
        # a download interrupted before its first file finished has no snapshot yet: scan_cache_dir skips it
        listed = {m.path for m in out}
        for folder in root.glob("models--*"):
            if str(folder) not in listed and folder.is_dir():
                out.append(CachedModel(folder.name[len("models--"):].replace("--", "/"), "partial",
                                       _folder_bytes(folder), str(folder)))
    conv = Path(converted_dir) if converted_dir else paths.models_dir()
    if conv.is_dir():
        for folder in sorted(conv.iterdir()):
            if folder.is_dir():
                out.append(CachedModel(folder.name, "converted", _folder_bytes(folder), str(folder)))
    return sorted(out, key=lambda m: -m.size_bytes)


def delete_cached(name: str, root: Path | None = None, converted_dir: Path | None = None) -> int:
    """Delete one cached model (as listed by ``cached_models``); returns the bytes freed."""
    for m in cached_models(root, converted_dir):
        if m.name == name:
            freed = m.size_bytes
            # a cached repo's folder holds only its own blobs, snapshots and refs: removing it is what
            # huggingface_hub's delete strategy does once every revision goes, partial downloads included
            shutil.rmtree(m.path, ignore_errors=True)
            log.info("deleted cached model %s (%.2f GB)", name, freed / 1e9)
            return freed
    raise HubError(f"'{name}' is not in the model cache")


def describe_cache(models: list[CachedModel], root: Path | None = None) -> str:
    total = sum(m.size_bytes for m in models) / 1e9
    return f"Model cache: `{Path(root) if root else cache_dir()}` — {len(models)} model(s), {total:.2f} GB"

