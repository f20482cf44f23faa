"""The weights cache: what the first load of a GGUF file produced, kept for the next ones.

A GGUF file is slow to read: transformers parses it once for the config, once for the
tokenizer and once more for the weights, which it then dequantises (about 15 s for the
bundled 135 M model on two cores). The first load therefore keeps what it produced here,
and later loads read it in about a second.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

import torch

from vramancer.config.errors import first_line
from vramancer.config.paths import cache_root

log = logging.getLogger(__name__)

#
# What the first load of a GGUF file produced, kept for the next ones:
#
#   <VRM_CACHE_DIR or the user cache dir>/gguf/<file stem>-<key>/
#       config/config.json              the model config (read in milliseconds)
#       tokenizer/tokenizer.json, …      the fast tokenizer, chat template included
#       weights-<dtype>-<weights>/model.safetensors   the weights as they run (float, or q8/q4
#                       tensors flattened: model/loading.py), read tensor by tensor,
#                       generation_config.json
#
# Each piece is a folder written under a temporary name, listed in a manifest (bytes and
# CRC-32 of every file) and renamed into place, so a reader sees a whole piece or none. A
# piece whose files do not match its manifest (a crash after the rename but before the data
# reached the disk, a truncated copy, a flipped byte) or that fails to load is deleted and
# rebuilt from the GGUF. Nothing here is needed for correctness: any failure to write the
# cache is logged and the load goes on.

CACHE_FORMAT = 3  # bump when the layout or the meaning of a piece changes
CONFIG_PIECE, TOKENIZER_PIECE = "config", "tokenizer"
WEIGHTS_FILE = "model.safetensors"
MANIFEST = "manifest.json"
KEY_SPAN = 1 << 20  # bytes hashed at each end of the file


def gguf_key(path: Path) -> str:
    """Identify a GGUF file cheaply but safely: its size, its mtime (ns), a SHA-256 of its
    first and last MiB, and the versions that decide what we derive from it.

    The first MiB holds the header (architecture, hyperparameters, the tensor table, the start
    of the vocabulary) and the last MiB the end of the last tensor, so a different model or
    quantisation changes the key even at equal size; any rewrite of the file changes its
    mtime. Hashing all of it would cost about a second per 2 GB on every start, the very time
    the cache is there to save. A copy made without preserving mtime merely misses once."""
    import transformers

    stat = path.stat()
    digest = hashlib.sha256(
        f"vramancer-gguf/{CACHE_FORMAT} transformers/{transformers.__version__} "
        f"bytes/{stat.st_size} mtime_ns/{stat.st_mtime_ns}\n".encode()
    )
    with path.open("rb") as f:
        digest.update(f.read(KEY_SPAN))
        if stat.st_size > KEY_SPAN:
            f.seek(max(KEY_SPAN, stat.st_size - KEY_SPAN))
            digest.update(f.read(KEY_SPAN))
    return digest.hexdigest()[:32]


def gguf_cache_entry(gguf_path: Path | None) -> Path | None:
    """The cache folder for a GGUF file; None for other sources or an unreadable file."""
    if gguf_path is None:
        return None
    path = gguf_path
    try:
        entry = cache_root() / "gguf" / f"{path.stem}-{gguf_key(path)}"
    except OSError:
        return None  # transformers will say what is wrong with the file
    if entry not in _SWEPT:
        _SWEPT.add(entry)
        remove_stale_staging(entry)
    return entry


# Staging folders are named .<piece>-<pid>-<random>: a writer that was killed leaves its own
# behind, recognisable by a pid that no longer runs (or, for any name, by its age).
STALE_STAGING_S = 24 * 3600
_SWEPT: set[Path] = set()  # entries already swept by this process
_DAMAGED: set[Path] = set()  # pieces found damaged by this process, to be replaced
_WARNED: set[str] = set()  # cache warnings already given by this process


def remove_stale_staging(entry: Path) -> list[Path]:
    """Delete the staging folders of writers that died before renaming them into place."""
    import psutil

    removed = []
    try:
        children = [child for child in entry.iterdir() if child.name.startswith(".") and child.is_dir()]
    except OSError:
        return removed
    for child in children:
        pid_text = child.name.split("-")[-2] if child.name.count("-") >= 2 else ""
        try:
            age = time.time() - child.stat().st_mtime
        except OSError:
            continue
        dead = pid_text.isdigit() and int(pid_text) != os.getpid() and not psutil.pid_exists(int(pid_text))
        if dead or age > STALE_STAGING_S:
            shutil.rmtree(child, ignore_errors=True)
            if not child.exists():
                removed.append(child)
    if removed:
        log.info("removed %d unfinished cache folder(s) left in %s by writers that stopped", len(removed), entry)
    return removed


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning("%s", message)


def from_cache(entry: Path, piece: str, read: Callable[[Path], object]):
    """`read(folder)` of a cached piece, or None when it is absent or damaged (then deleted)."""
    folder = entry / piece
    try:
        present = folder.is_dir()
    except OSError as exc:  # a parent this user may not search, a name too long
        _warn_once(f"unreadable {entry}", f"the cache in {entry} cannot be read ({exc.strerror or exc}); "
                                          "loads go on without it, reading the GGUF each time.")
        return None
    if not present:
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, facts in manifest["files"].items():
            if _file_facts(folder / name) != facts:
                raise ValueError(f"{name} does not match its manifest")
        return read(folder)
    except Exception as exc:  # whatever is wrong with a cached piece, the GGUF can rebuild it
        log.warning("ignoring the cached %s in %s (%s); rebuilding it", piece, entry, first_line(exc))
        _DAMAGED.add(folder)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def store(entry: Path, piece: str, write: Callable[[Path], object]) -> bool:
    """Write one piece into a fresh hidden folder, list it in a manifest, rename it into place.
    False if it could not be stored."""
    staging = None
    try:
        entry.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{piece}-{os.getpid()}-", dir=entry))
        write(staging)
        files = {p.name: _file_facts(p) for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        final = entry / piece
        shutil.rmtree(final, ignore_errors=True)  # a damaged copy being replaced
        try:
            os.rename(staging, final)
        except OSError:
            # Another process may have stored the same piece first; a damaged copy that could
            # not be removed is no such thing.
            if not final.is_dir() or final in _DAMAGED:
                raise
        _DAMAGED.discard(final)
        return True
    except Exception as exc:  # the cache only saves time; never fail a load over it
        if (entry / piece) in _DAMAGED:
            _warn_once(f"stuck {entry / piece}",
                       f"the cache is stuck: the damaged {piece} in {entry} cannot be replaced ({first_line(exc)}); "
                       f"every load reads the GGUF again, which is slow, until that folder is deleted or can be written.")
        else:
            _warn_once(f"store {entry}", f"could not cache the {piece} in {entry} ({first_line(exc)}); "
                                         "loads go on without the cache, reading the GGUF each time.")
        return False
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _file_facts(path: Path) -> dict:
    """Size and CRC-32 of a file, read in chunks (through the page cache, not our memory)."""
    crc, size = 0, 0
    chunk = bytearray(8 << 20)
    view = memoryview(chunk)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(chunk):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"bytes": size, "crc32": crc}


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
ALIGN = 64  # bytes: a cache line, and what SIMD loads want


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file whose tensors start on 64-byte boundaries once memory-mapped.

    `safetensors.save_file` starts the data 8-byte aligned, so every tensor of a mapped file
    sat 40 bytes past a cache line here, and matmuls over such weights ran 3-7 % slower than
    over the same weights in freshly allocated memory. The format allows padding the header
    with spaces: it is padded so the data starts on a boundary, and tensors whose size is a
    multiple of the boundary come first, so each of them stays on one. Written tensor by
    tensor from the tensors' own memory: no second copy of the model."""
    import numpy as np

    order = sorted(tensors, key=lambda name: _nbytes(tensors[name]) % ALIGN != 0)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name} has dtype {tensor.dtype}, which this writer does not handle")
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + _nbytes(tensor)]}
        offset += _nbytes(tensor)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            tensor = tensors[name].detach().contiguous().reshape(-1)
            if tensor.numel():
                f.write(memoryview(np.ascontiguousarray(tensor.view(torch.uint8).numpy())))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# The GGUF reader of the file being loaded, kept from the config's parse for the weights'
# (one file at a time: at most one reader, about 160 MB for the bundled model, is held).
_KEPT_READERS: dict[str, object] = {}


def kept_reader(path: Path):
    """The reader `gguf_parsed_once(keep_reader=True)` kept for `path`, if any."""
    return _KEPT_READERS.get(os.fspath(path))


def let_go_of_gguf_reader() -> None:
    """Drop the reader a config's parse kept for the weights, when they will not be read (a
    plan alone, or a load refused before its weights): a later load of the same path, the
    file perhaps replaced meanwhile, then parses it afresh."""
    _KEPT_READERS.clear()


# The patches below are process-wide: one thread at a time applies and undoes them.
_PATCHING = threading.RLock()


@contextlib.contextmanager
def gguf_parsed_once(keep_reader: bool = False):
    """Within this block, transformers parses a GGUF file once and builds gguf's tensor-name
    map once.

    Left alone, it parses the file for the config, again for the tokenizer (to learn the model
    type) and again for the weights, and rebuilds the name map for every module of the model:
    about 9 of the 15 s a first load of the bundled model takes (py-spy). A parsed
    `gguf.GGUFReader` is a read-only view of the file, and the memos hand out copies of what
    callers could change, so only time changes; should a later transformers or gguf rename
    these, the block simply saves nothing. `keep_reader` keeps the reader past the block, for
    the weights that follow the config (`load_weights` lets it go)."""
    try:
        import gguf
        import transformers.modeling_gguf_pytorch_utils as hf_gguf
    except ImportError:
        yield
        return
    with _PATCHING:  # so that what is saved below is the real thing, not another thread's memo
        patches = _gguf_memos(gguf, hf_gguf)
        for owner, name, _, memo in patches:
            setattr(owner, name, memo)
        try:
            yield
        finally:
            for owner, name, original, _ in reversed(patches):
                setattr(owner, name, original)
            if not keep_reader:
                _KEPT_READERS.clear()


def _gguf_memos(gguf, hf_gguf) -> list[tuple]:
    """(owner, attribute, original, memo) for each function `gguf_parsed_once` replaces."""
    patches = []
    name_map = getattr(gguf, "get_tensor_name_map", None)
    if callable(name_map):
        patches.append((gguf, "get_tensor_name_map", name_map, functools.lru_cache(maxsize=None)(name_map)))
    reader_class = getattr(gguf, "GGUFReader", None)
    if isinstance(reader_class, type):
        def reader(path, *args, **kwargs):
            if args or kwargs:
                return reader_class(path, *args, **kwargs)
            key = os.fspath(path)
            if key not in _KEPT_READERS:
                _KEPT_READERS.clear()  # one file at a time
                _KEPT_READERS[key] = reader_class(path)
            return _KEPT_READERS[key]

        patches.append((gguf, "GGUFReader", reader_class, reader))
    checkpoint = getattr(hf_gguf, "load_gguf_checkpoint", None)
    if callable(checkpoint):
        metadata: dict = {}

        @functools.wraps(checkpoint)
        def load_gguf_checkpoint(path, return_tensors=False, *args, **kwargs):
            if return_tensors or args or kwargs:
                return checkpoint(path, return_tensors, *args, **kwargs)
            key = os.fspath(path)
            if key not in metadata:
                metadata[key] = checkpoint(path, False)
            return copy.deepcopy(metadata[key])

        patches.append((hf_gguf, "load_gguf_checkpoint", checkpoint, load_gguf_checkpoint))
    return patches
