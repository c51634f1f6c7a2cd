"""Results reused from disk, keyed by what made them (a cached number is a claim).

* :func:`fingerprint` — a short hash of a direction's values;
* :func:`settings_key` / :func:`file_digest` — hashes of settings (any JSON-able value) and of files' contents;
* :class:`ResultsFile` — one probe's partial rows, resumable, refused when made by another probe;
* :class:`PartFiles` — one result part (a set of CSV tables) per item of a long job, each with the
  fingerprint of its inputs and settings: a part is reused only when that fingerprint matches, and
  re-computed otherwise; written atomically, so an interrupted job resumes at the next item.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd
import torch

from flatlora import distributed
from flatlora.io import atomic_write_json, atomic_write_text, read_json

from .space import Direction, Space

__all__ = ["fingerprint", "settings_key", "file_digest", "ResultsFile", "PartFiles"]


def fingerprint(space: Space, d: Direction) -> str:
    """A short hash of a direction's values (to check that a resumed probe uses the same directions)."""
    v = space.to_vector(d).detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha1(v.tobytes()).hexdigest()[:16]


def settings_key(settings: Any) -> str:
    """A short hash of JSON-able ``settings`` (keys sorted): equal settings, equal key."""
    text = json.dumps(_json_roundtrip(settings), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """SHA-1 of a file's bytes, or of a folder's files (relative names and bytes, in sorted order)."""
    path = Path(path)
    h = hashlib.sha1()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()


class ResultsFile:
    """A probe's partial results: ``{"meta": …, "rows": […]}`` written atomically, so that a probe
    stopped at any time resumes where it was. A file made by another probe (other ``meta``: space,
    grid, directions, seed, batches…) is an error, found before any work.

    Under ``torchrun`` each rank adds its own rows to a shard file of its own
    (``NAME.rank{r}-of-{W}.json``, :func:`flatlora.distributed.shard_path`); :meth:`gather` joins
    every rank's rows, rank 0 writes the whole file, and the shard files are removed. ``rows`` holds
    the rows of the whole file (if any) and this rank's."""

    def __init__(self, path: Optional[str], meta: dict[str, Any], min_interval_s: float = 2.0):
        self.final = Path(path) if path is not None else None
        self.path = distributed.shard_path(self.final) if self.final is not None else None
        self.meta = meta
        self.min_interval_s = min_interval_s
        self._last_save = time.monotonic()
        self.previous = self._load(self.final) if self.final != self.path else []  # rows of a whole, earlier file
        self.rows: list[dict] = self.previous + self._load(self.path)

    def _load(self, path: Optional[Path]) -> list[dict]:
        if path is None or not path.exists():
            return []
        saved = read_json(path)
        # compare through JSON so that tuples, numpy floats … compare as they were written
        mine = _json_roundtrip(self.meta)
        if saved.get("meta") != mine:
            diff = sorted(k for k in set(mine) | set(saved.get("meta", {})) if saved.get("meta", {}).get(k) != mine.get(k))
            raise ValueError(f"{path} holds results of another probe (differs in {diff}); "
                             "delete it or pass another results_path")
        return saved["rows"]

    def add(self, rows: list[dict], *, final: bool = False) -> None:
        self.rows.extend(rows)
        if self.path is not None and (final or time.monotonic() - self._last_save >= self.min_interval_s):
            self.save()

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"meta": self.meta, "rows": self.rows[len(self.previous):]})
            self._last_save = time.monotonic()

    def gather(self) -> list[dict]:
        """Every rank's rows (the earlier whole file's first, then rank 0's, rank 1's …); written
        to the whole file by rank 0. In one process: :meth:`save`."""
        if not distributed.is_distributed():
            self.save()
            return self.rows
        new = distributed.all_gather_objects(self.rows[len(self.previous):])
        self.rows = self.previous + [row for part in new for row in part]
        if self.final is not None:
            if distributed.is_main():
                atomic_write_json(self.final, {"meta": self.meta, "rows": self.rows})
            distributed.barrier()
            self.path.unlink(missing_ok=True)
        self.previous = self.rows
        return self.rows


def _json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


class PartFiles:
    """Resumable parts of a long job: for each item, a set of named tables (CSV) and the fingerprint
    of everything that made them, in ``folder``::

        parts = PartFiles(folder, names=("measures", "curves"))
        tables = parts.get(key, fingerprint, compute)   # reused only if ``fingerprint`` matches

    ``key`` names the item (a file-name-safe string, unique within the folder); ``fingerprint`` is a
    JSON-able description of its inputs and settings (content hashes, options, split, sizes).
    A part whose recorded fingerprint differs is computed again and replaced. Its fingerprint is
    removed before the new tables are written and written again last, so a part is complete exactly
    when its fingerprint file is there: an interrupted write is recomputed, never reused. Nothing is
    created until the first part is written.

    Under ``torchrun`` every rank calls :meth:`get` (``compute`` may be collective); rank 0 decides
    whether a part is reusable and alone writes it."""

    def __init__(self, folder: str | Path, names: tuple[str, ...] = ("result",)):
        self.folder, self.names = Path(folder), tuple(names)

    def _paths(self, key: str) -> tuple[Path, dict[str, Path]]:
        return self.folder / f"{key}.json", {n: self.folder / f"{key}.{n}.csv" for n in self.names}

    def reusable(self, key: str, fingerprint: Any) -> bool:
        """True when the part ``key`` is complete and was made with this ``fingerprint``."""
        meta, tables = self._paths(key)
        if not (meta.exists() and all(p.exists() for p in tables.values())):
            return False
        return read_json(meta).get("fingerprint") == _json_roundtrip(fingerprint)

    def read(self, key: str) -> dict[str, pd.DataFrame]:
        """The tables of a complete part."""
        return {n: pd.read_csv(p) for n, p in self._paths(key)[1].items()}

    def get(self, key: str, fingerprint: Any, compute: Callable[[], dict[str, pd.DataFrame]], *,
            collective: bool = True) -> dict[str, pd.DataFrame]:
        """The tables of ``key``: read from disk when :meth:`reusable`, else ``compute()`` (a dict of
        DataFrames named as ``names``), written and returned. ``collective`` (under torchrun): every
        rank calls this for the same part and rank 0 decides and writes; ``collective=False``: this
        rank alone owns the part (work split across ranks)."""
        meta, tables = self._paths(key)
        reuse = self.reusable(key, fingerprint)
        if distributed.broadcast_object(reuse) if collective else reuse:
            return self.read(key)
        frames = compute()
        if set(frames) != set(self.names):
            raise ValueError(f"compute() returned tables {sorted(frames)}, expected {sorted(self.names)}")
        if distributed.is_main() or not collective:
            self.folder.mkdir(parents=True, exist_ok=True)
            meta.unlink(missing_ok=True)  # the part is incomplete until its fingerprint is written again
            for n, p in tables.items():
                atomic_write_text(p, frames[n].to_csv(index=False))
            atomic_write_json(meta, {"key": key, "fingerprint": _json_roundtrip(fingerprint)})
        return frames
