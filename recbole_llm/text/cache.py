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
"""
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import recbole

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


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


class CacheEntry:
    """One cached matrix: ``<folder>/<name>.npy``, ``.tokens.txt`` and ``.json``."""

    def __init__(self, folder, name):
        self.folder = Path(folder)
        self.name = name
        self.matrix_file = self.folder / f"{name}.npy"
        self.tokens_file = self.folder / f"{name}.tokens.txt"
        self.meta_file = self.folder / f"{name}.json"

    def load(self, key):
        """``(matrix, tokens)`` when the entry exists whole and was built for ``key``, else None."""
        try:
            meta = json.loads(self.meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if meta.get("key") != key:
            logger.info("%s was built for other settings; rebuilding it", self.meta_file)
            return None
        matrix = np.load(self.matrix_file)
        tokens = self.tokens_file.read_text(encoding="utf-8").split("\n")[:-1]
        if len(tokens) != len(matrix) or len(matrix) != meta["rows"]:
            logger.warning("%s does not match its token list; rebuilding it", self.matrix_file)
            return None
        return matrix, tokens

    def save(self, key, matrix, tokens, seconds):
        """Write the entry atomically (see the module docstring)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.meta_file.unlink(missing_ok=True)
        _write_atomic(self.matrix_file, lambda f: np.save(f, matrix))
        _write_atomic(self.tokens_file, lambda f: f.write("".join(f"{t}\n" for t in tokens).encode("utf-8")))
        meta = {"key": key, "rows": len(matrix), "dim": int(matrix.shape[1]), "dtype": str(matrix.dtype),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "build_seconds": round(seconds, 2)}
        _write_atomic(self.meta_file, lambda f: f.write(json.dumps(meta, indent=1).encode("utf-8")))

    def get(self, key, build):
        """The entry for ``key``, built with ``build() -> (matrix, tokens)`` and saved when missing or stale.
        Returns ``(matrix, tokens, built)``."""
        cached = self.load(key)
        if cached is not None:
            return (*cached, False)
        start = time.perf_counter()
        matrix, tokens = build()
        self.save(key, matrix, tokens, time.perf_counter() - start)
        logger.info("built %s: %s in %.1f s", self.matrix_file, matrix.shape, time.perf_counter() - start)
        return matrix, tokens, True

    def size_bytes(self):
        """Bytes on disk of the entry's three files."""
        return sum(f.stat().st_size for f in (self.matrix_file, self.tokens_file, self.meta_file) if f.is_file())


def _write_atomic(path, write):
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the cache is shared like the data beside it
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
