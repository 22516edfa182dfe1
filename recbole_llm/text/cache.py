"""The on-disk cache of LLM side data, one matrix per entry, stored by RAW token (DESIGN.md §4).

Layout, under ``llm_cache_dir`` (default ``<data_path>/llm_cache/``, e.g. ``datasets/ml-1m-half/llm_cache/``), one
sub-folder per encoder (``all-MiniLM-L6-v2/``, or ``<folder name>-<hash of its path>/``)::

    items.npy          float32 [n, d]: row r is the item whose raw token is line r of items.tokens.txt
    items.tokens.txt   the raw tokens, one a line
    items.json         metadata: "key" (what the rows depend on: encoder, pooling, template, dataset file hashes,
                       hash of the texts, ...), then rows, dim, build time
    users.*            the same for the users' training-history texts
    items_pca<dim>.*   float32 [n, dim]: the item vectors' principal components, same tokens as items
    users_similar.*    int32 [n, k]: row positions, in the same token list, of each user's most similar users

Every file is written to a temporary file and renamed over the old one, and the JSON goes last (and is removed
first), so a crash leaves no JSON and the entry is rebuilt. An entry is used only when its JSON key equals the key
wanted now; otherwise it is rebuilt, never reused stale.

What is read is verified: the JSON records the size and SHA-256 of the matrix and token files, checked on every
load. An entry damaged after it was written (a truncated ``.npy``, a token list a line short, a JSON that does not
parse) is rebuilt with one warning naming the file; when it cannot be rebuilt (the encoder's weights are gone), the
error names the damaged file and the cause. Builders of one entry take turns on ``<name>.lock`` (``filelock``), so
two processes that miss it at once (the ranks of a DDP run, two benchmark workers) build it once: the second one
finds it built and loads it.
"""
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import recbole
from filelock import FileLock

from recbole_llm.utils import RecBoleLLMError, atomic_target

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the metadata records each file's size and SHA-256


def cache_folder(config, encoder):
    """The folder of ``encoder``'s entries for the configured dataset."""
    return cache_root(config) / encoder.folder_name()


def cache_root(config):
    """``llm_cache_dir``, else ``<data_path>/llm_cache``; for the ml-100k bundled in RecBole's wheel (whose
    data_path RecBole points into site-packages), ``datasets/<dataset>/llm_cache`` under the working folder."""
    if config["llm_cache_dir"]:
        return Path(config["llm_cache_dir"])
    data_path = Path(config["data_path"]).resolve()
    if Path(recbole.__file__).resolve().parent in data_path.parents:
        return Path("datasets") / config["dataset"] / "llm_cache"
    return data_path / "llm_cache"


def file_sha256(path):
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def texts_sha256(texts):
    """SHA-256 of ``{token: text}`` in token order: any change of a text or of the token set changes it."""
    digest = hashlib.sha256()
    for token in sorted(texts):
        digest.update(f"{token}\t{texts[token]}\n".encode())
    return digest.hexdigest()


class DamagedEntry(Exception):
    """An entry whose files exist but fail their check; the message names the file and what is wrong."""


class CacheEntry:
    """One cached matrix: ``<folder>/<name>.npy``, ``.tokens.txt`` and ``.json``."""

    def __init__(self, folder, name):
        self.folder = Path(folder)
        self.name = name
        self.matrix_file = self.folder / f"{name}.npy"
        self.tokens_file = self.folder / f"{name}.tokens.txt"
        self.meta_file = self.folder / f"{name}.json"
        self.lock_file = self.folder / f"{name}.lock"

    def load(self, key):
        """``(matrix, tokens)`` when the entry exists, was built for ``key`` and passes its checks; None when it is
        missing or was built for other settings. Raises ``DamagedEntry`` when its files fail the checks."""
        if not self.meta_file.is_file():
            return None
        try:
            meta = json.loads(self.meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DamagedEntry(f"{self.meta_file} does not parse as JSON ({error})") from None
        if not isinstance(meta, dict) or meta.get("key") != key:
            logger.info("%s was built for other settings; rebuilding it", self.meta_file)
            return None
        for path, kind in ((self.matrix_file, "matrix"), (self.tokens_file, "tokens")):
            _verify(path, meta.get("files", {}).get(kind))
        try:
            matrix = np.load(self.matrix_file)
        except (OSError, ValueError) as error:
            raise DamagedEntry(f"{self.matrix_file} does not load ({error})") from None
        tokens = self.tokens_file.read_text(encoding="utf-8").split("\n")[:-1]
        if len(tokens) != len(matrix) or len(matrix) != meta["rows"]:
            raise DamagedEntry(f"{self.matrix_file} has {len(matrix)} rows for {len(tokens)} tokens "
                               f"({meta['rows']} in its metadata)")
        return matrix, tokens

    def save(self, key, matrix, tokens, seconds):
        """Write the entry atomically (see the module docstring)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.meta_file.unlink(missing_ok=True)
        _write_atomic(self.matrix_file, lambda f: np.save(f, matrix))
        _write_atomic(self.tokens_file, lambda f: f.write("".join(f"{t}\n" for t in tokens).encode("utf-8")))
        meta = {"key": key, "rows": len(matrix), "dim": int(matrix.shape[1]), "dtype": str(matrix.dtype),
                "files": {"matrix": _fingerprint(self.matrix_file), "tokens": _fingerprint(self.tokens_file)},
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "build_seconds": round(seconds, 2)}
        _write_atomic(self.meta_file, lambda f: f.write(json.dumps(meta, indent=1).encode("utf-8")))

    def get(self, key, build):
        """The entry for ``key``, built with ``build() -> (matrix, tokens)`` and saved when missing, stale or
        damaged. Returns ``(matrix, tokens, built)``."""
        cached = self._checked_load(key)
        if cached is not None:
            return (*cached, False)
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(self.lock_file):
            damage = None
            try:
                cached = self.load(key)  # another process may have built it while this one waited
            except DamagedEntry as error:
                damage = error
            if cached is not None:
                return (*cached, False)
            start = time.perf_counter()
            try:
                matrix, tokens = build()
            except Exception as error:
                if damage is None:
                    raise
                raise RecBoleLLMError(f"{damage}, and it cannot be rebuilt: {error}. Restore the file, or make the "
                                      f"encoder loadable so that it is rebuilt.") from error
            self.save(key, matrix, tokens, time.perf_counter() - start)
        logger.info("built %s: %s in %.1f s", self.matrix_file, matrix.shape, time.perf_counter() - start)
        return matrix, tokens, True

    def _checked_load(self, key):
        """``load``, with a damaged entry reported in one warning line and treated as missing."""
        try:
            return self.load(key)
        except DamagedEntry as error:
            logger.warning("%s; rebuilding it", error)
            return None

    def size_bytes(self):
        """Bytes on disk of the entry's three files."""
        return sum(f.stat().st_size for f in (self.matrix_file, self.tokens_file, self.meta_file) if f.is_file())


def _fingerprint(path):
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _verify(path, recorded):
    """Raise ``DamagedEntry`` unless ``path`` has the size and SHA-256 its metadata recorded."""
    if recorded is None:
        raise DamagedEntry(f"{path} has no checksum in its metadata")
    if not path.is_file():
        raise DamagedEntry(f"{path} is missing")
    if path.stat().st_size != recorded["bytes"]:
        raise DamagedEntry(f"{path} has {path.stat().st_size} bytes where {recorded['bytes']} were written")
    if file_sha256(path) != recorded["sha256"]:
        raise DamagedEntry(f"{path} does not match the checksum written with it")


def _write_atomic(path, write):
    with atomic_target(path) as temporary, open(temporary, "wb") as f:
        write(f)
