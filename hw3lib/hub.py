"""Models by name, the way their libraries resolve them, with the Hugging Face cache first.

A name is either a local path (a folder saved with ``save_pretrained``, a timm folder, an open_clip folder) or a
name that a library resolves to a hub repository: a transformers hub id (``llava-hf/llava-1.5-7b-hf``), a timm
model name (whose ``pretrained_cfg.hf_hub_id`` names ``timm/...``), or an open_clip model name with a pretrained
tag (whose pretrained config names ``timm/vit_base_patch32_clip_224.openai``). This module never loads a model
itself; it answers three questions before the library is called, so that no load waits on a network that is not
there:

* Which repository and files does the name stand for? (:class:`HubFiles`; the library's own registry says.)
* Are they in the cache? (``huggingface_hub.try_to_load_from_cache``: the documented cache layout
  ``models--ORG--NAME/{blobs,snapshots/REV,refs/main}`` under ``HF_HOME/hub``.)
* Is the hub reachable? ``HF_HUB_OFFLINE=1`` says no; otherwise one TCP connection with a short timeout.

Cached: the library loads from the cache, told to stay offline when the hub is unreachable (otherwise each file
would first retry the network). Not cached and offline: :class:`ModelNotAvailable`, one line naming the id and
``hw3 download``. The check takes milliseconds; what a failing command still spends is its imports (about 2 s for
LLaVA, 4-5 s where open_clip or timm must be imported, on a 2-core machine).
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .data import DataError

DOWNLOAD_HINT = "run `hw3 download` on a machine with network (then HF_HUB_OFFLINE=1 works), or give a local folder"


class ModelNotAvailable(DataError):
    """A model named by id is not in the cache (or incomplete there) and cannot be fetched; or it is the wrong kind."""


@dataclass(frozen=True)
class HubFiles:
    """What one name stands for on the hub: a repository and the files a loader needs from it."""

    repo_id: str
    files: tuple[str, ...]  # each entry: one file, or alternatives separated by "|" (the first cached one counts)
    what: str  # for messages: "LLaVA", "timm encoder", "CLIP"
    name: str = ""  # the name the user gave (a timm / open_clip name), when it differs from repo_id


# ----------------------------------------------------------------------------------------------- network state
def _offline_env() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def is_offline() -> bool:
    """``HF_HUB_OFFLINE=1``, or the hub does not answer within 3 s (checked once per process)."""
    return _offline_env() or not _hub_reachable()


@contextlib.contextmanager
def cache_only(active: bool = True):
    """While active, huggingface_hub (and so transformers, timm and open_clip) reads the cache and never the network.

    This is what ``HF_HUB_OFFLINE=1`` does; setting it for the duration of one load spares a machine whose hub is
    unreachable the retries of every file request."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or active
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


# ------------------------------------------------------------------------------------------------ the cache
def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_file(repo_id: str, filename: str) -> Path | None:
    """The snapshot path of ``filename`` in the cache (the revision ``refs/main`` points to), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an invalid repo id (HFValidationError) is simply not cached
        return None
    return Path(path) if isinstance(path, str) and Path(path).is_file() else None


def cached_repos() -> list[str]:
    """Model repository ids present in the cache (``models--ORG--NAME`` folders)."""
    root = hub_cache_dir()
    if not root.is_dir():
        return []
    return sorted(p.name[len("models--"):].replace("--", "/") for p in root.glob("models--*") if p.is_dir())


def _first_cached(repo_id: str, alternatives: str) -> Path | None:
    for filename in alternatives.split("|"):
        path = cached_file(repo_id, filename)
        if path is not None:
            return path
    return None


def missing_files(spec: HubFiles) -> list[str]:
    """Files of ``spec`` absent from the cache; a sharded checkpoint's index is followed to every shard."""
    missing = []
    for alternatives in spec.files:
        path = _first_cached(spec.repo_id, alternatives)
        if path is None:
            missing.append(alternatives.split("|")[0])
        elif path.name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise ModelNotAvailable(f"{spec.repo_id}: the cached {path.name} is not a shard index ({path})"
                                        ) from None
            missing += [s for s in shards if cached_file(spec.repo_id, s) is None]
    return missing


def _suggestion(repo_id: str) -> str:
    close = difflib.get_close_matches(repo_id, cached_repos(), n=1, cutoff=0.8)
    return f" Did you mean {close[0]!r} (in the cache)?" if close else ""


def ensure_available(spec: HubFiles) -> bool:
    """Check that ``spec`` can be loaded; return True when the load must stay in the cache (:func:`cache_only`).

    Raises :class:`ModelNotAvailable` with one line naming the id and the missing file when it is not cached (or
    only partly) and the hub cannot be reached."""
    missing = missing_files(spec)
    offline = is_offline()
    if not missing:
        return offline
    if not offline:
        return False  # the library downloads what is missing
    label = f"{spec.name} ({spec.repo_id})" if spec.name and spec.name != spec.repo_id else spec.repo_id
    reason = "offline (HF_HUB_OFFLINE=1)" if _offline_env() else "the hub is unreachable"
    where = hub_cache_dir()
    if len(missing) == len(spec.files) and cached_file(spec.repo_id, "config.json") is None \
            and spec.repo_id not in cached_repos():
        raise ModelNotAvailable(f"{spec.what} {label}: not in the Hugging Face cache ({where}) and {reason}."
                                f"{_suggestion(spec.repo_id)} To fix: {DOWNLOAD_HINT}{_demo_folder(spec.what)}")
    raise ModelNotAvailable(f"{spec.what} {label}: the cached copy in {where} is incomplete ({', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''} missing) and {reason}. To fix: {DOWNLOAD_HINT}")


# ------------------------------------------------------------------------------------ names of each library
DEMO_FOLDERS = {"CLIP": "--clip-model data/demo/models/clip --clip-pretrained ''",
                "LLaVA": "--model data/demo/models/llava", "timm encoder": "--encoder data/demo/models/vit"}


def _demo_folder(what: str) -> str:
    """How to use the demo's stand-in instead, where the workbook has built it."""
    from .data import ROOT

    option = DEMO_FOLDERS.get(what)
    folder = option and ROOT / option.split()[1]
    return f" (the demo's stand-in: {option})" if folder and folder.is_dir() else ""


def is_hub_id(name: str) -> bool:
    """``owner/name`` with the hub's characters: what transformers would look up on the hub."""
    parts = name.split("/")
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return len(parts) == 2 and all(p and set(p) <= ok and not p.startswith(".") for p in parts)


def is_local(name: str) -> bool:
    """A name the user means as a path: it exists, or it is written like one (``./x``, ``/x``, ``~/x``, ``a/b/c``)."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def local_folder(name: str) -> Path | None:
    """The folder that ``name`` means when it is meant as a path (``local-dir:PATH``, as timm and open_clip write it,
    or :func:`is_local`), whether or not it exists; None for a hub id or a library's model name. The one place
    where the captioner's encoder, CLIP and LLaVA tell a folder from a name."""
    if name.startswith("local-dir:"):
        return Path(name.removeprefix("local-dir:")).expanduser()
    return Path(name).expanduser() if is_local(name) else None


def kind_of_name(name: str) -> str | None:
    """"timm" when the cache holds ``name`` as a timm model (``timm/NAME``), for wrong-kind messages. Importing
    timm to ask its registry would cost seconds on an error path."""
    return "timm" if f"timm/{name}" in cached_repos() else None


def transformers_files(repo_id: str, what: str, weights: bool = True) -> HubFiles:
    """A transformers model saved with ``save_pretrained``: its config and (``weights``) its possibly sharded
    weights."""
    files = ("config.json",) + (("model.safetensors.index.json|model.safetensors",) if weights else ())
    return HubFiles(repo_id, files, what)


def timm_files(name: str) -> HubFiles | None:
    """The hub repository of a timm model name with weights (``pretrained_cfg.hf_hub_id``), else None.

    Offline with no ``timm/NAME`` in the cache, the answer is known without importing timm (seconds): timm's
    weights live in ``timm/NAME`` repositories."""
    guess = HubFiles(f"timm/{name}", ("model.safetensors|pytorch_model.bin",), "timm encoder", name)
    if is_hub_id(guess.repo_id) and missing_files(guess) and is_offline():
        return guess  # ensure_available() now refuses it in one line
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name):
        raise ModelNotAvailable(f"{name}: not a timm model name and not a local folder (timm names look like "
                                f"vit_large_patch14_clip_224.openai_ft_in12k_in1k)")
    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    return HubFiles(hub_id, guess.files, "timm encoder", name)


def open_clip_files(name: str, pretrained: str) -> HubFiles | None:
    """The hub repository of an open_clip (model, pretrained tag) pair, else None (a file, or no hub entry)."""
    import open_clip

    if name not in open_clip.list_models():
        raise ModelNotAvailable(f"{name}: not an open_clip model name and not a local folder (CLIPScore uses "
                                f"ViT-B-32-quickgelu with pretrained 'openai')")
    if not pretrained or Path(pretrained).is_file():
        return None
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelNotAvailable(f"CLIP {name}: no pretrained tag or file {pretrained!r} (tags: {tags})")
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    if filename:
        alts = filename if not filename.endswith(".bin") else f"{filename[:-4]}.safetensors|{filename}"
    else:
        alts = "open_clip_model.safetensors|open_clip_pytorch_model.bin"
    return HubFiles(repo_id, (alts,), "CLIP", f"{name} / {pretrained}")


# ----------------------------------------------------------------------------------------------- hw3 download
@dataclass
class Download:
    """One repository that ``hw3 download`` fetches: which files, how big (from the hub, when reachable), where."""

    spec: HubFiles
    patterns: tuple[str, ...]  # allow_patterns of snapshot_download
    cached: bool
    size: int | None = None  # bytes to fetch; None when the hub cannot be asked

    @property
    def destination(self) -> Path:
        return hub_cache_dir() / f"models--{self.spec.repo_id.replace('/', '--')}"


def download_plan(llava: str | None, encoder: str | None, clip: str | None, clip_pretrained: str) -> list[Download]:
    """The repositories behind the hw3 profile's model names, with what is already cached (None: a local folder,
    nothing to fetch)."""
    import fnmatch

    specs = [] if llava is None else [(transformers_files(llava, "LLaVA"),
                                       ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"))]
    for spec in (timm_files(encoder) if encoder is not None else None,
                 open_clip_files(clip, clip_pretrained) if clip is not None else None):
        if spec is not None:
            specs.append((spec, tuple(f for alts in spec.files for f in alts.split("|")) + ("config.json",)))
    plan = []
    for spec, patterns in specs:
        item = Download(spec, patterns, cached=not missing_files(spec))
        if not item.cached and not is_offline():
            try:
                from huggingface_hub import HfApi

                siblings = HfApi().model_info(spec.repo_id, files_metadata=True).siblings or []
                names = {s.rfilename: s.size or 0 for s in siblings}
                if spec.what != "LLaVA":  # only the first alternative that the repo has, as the loaders pick
                    keep = {"config.json"} | {next((f for f in alts.split("|") if f in names), "")
                                              for alts in spec.files}
                    names = {k: v for k, v in names.items() if k in keep}
                    item.patterns = tuple(sorted(names))
                item.size = sum(v for k, v in names.items() if any(fnmatch.fnmatch(k, p) for p in patterns))
            except Exception:  # sizes are informative; the download itself reports real errors
                item.size = None
        plan.append(item)
    return plan


def fetch(item: Download) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(item.spec.repo_id, allow_patterns=list(item.patterns)))
