"""Write files into a Hugging Face hub cache exactly as ``huggingface_hub`` lays it out after a download.

    HF_HOME/hub/models--ORG--NAME/
        blobs/<sha256 for large (LFS) files, git blob sha1 for small ones>
        snapshots/<commit>/<path>  -> ../../blobs/<hash>   (relative symlinks)
        refs/main                  <commit>

(https://huggingface.co/docs/huggingface_hub/guides/manage-cache). Loaders that read the cache through
``huggingface_hub`` (transformers ``from_pretrained``, timm ``pretrained=True``, open_clip ``pretrained=TAG``) then
find a model under its real repo id with ``HF_HUB_OFFLINE=1``, which is what the rehearsal and the tests need.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

LFS_THRESHOLD = 10 * 1024 * 1024  # the hub stores files above ~10 MB (and all weights) in LFS, named by sha256
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".npz")


def _blob_name(path: Path) -> str:
    size = path.stat().st_size
    if size >= LFS_THRESHOLD or path.suffix in _LFS_SUFFIXES:
        h = hashlib.sha256()
        prefix = b""
    else:  # git's blob id: sha1 of "blob <size>\0" + content
        h = hashlib.sha1()
        prefix = f"blob {size}\0".encode()
    h.update(prefix)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def repo_folder(repo_id: str, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"


def write_repo(repo_id: str, files: dict[str, str | Path], cache_dir: str | Path, move: bool = False) -> Path:
    """Put ``files`` (``{path in the repo: local file}``) into ``cache_dir`` as revision ``main`` of ``repo_id``.

    Args:
        cache_dir: the hub cache (``HF_HOME/hub``, i.e. ``huggingface_hub.constants.HF_HUB_CACHE``).
        move: move the files instead of copying them (a 14 GB model need not exist twice).
    Returns: the snapshot folder.
    """
    folder = repo_folder(repo_id, cache_dir)
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    blobs = {}
    for rel, src in sorted(files.items()):
        src = Path(src)
        blob = _blob_name(src)
        target = folder / "blobs" / blob
        if not target.exists():
            tmp = target.with_name(f".{blob}.incomplete")
            shutil.move(src, tmp) if move else shutil.copyfile(src, tmp)
            tmp.replace(target)
        blobs[rel] = blob
    commit = hashlib.sha1("".join(f"{k}\0{v}\n" for k, v in sorted(blobs.items())).encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    for rel, blob in blobs.items():
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(folder / "blobs" / blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def write_folder(repo_id: str, source: str | Path, cache_dir: str | Path, move: bool = False) -> Path:
    """Every file under ``source`` (a ``save_pretrained`` folder, say) as revision ``main`` of ``repo_id``."""
    source = Path(source)
    files = {p.relative_to(source).as_posix(): p for p in source.rglob("*") if p.is_file()}
    return write_repo(repo_id, files, cache_dir, move=move)
