"""Nearest-user retrieval over per-user preference embeddings (faiss).

Each user is one vector: the *preference direction* of their feedback in the reward
encoder's embedding space,

    pref(user) = normalize( mean(embed(prompt, liked)) - mean(embed(prompt, disliked)) )

where a thumbs-up completion and a pair's ``chosen`` count as liked, a thumbs-down and
a pair's ``rejected`` as disliked (:func:`preference_vector`, pure). With only one
polarity the missing mean is zero. Cosine similarity (inner product of unit vectors)
ranks neighbours.

Tenancy: one exact ``faiss.IndexFlatIP`` per tenant, so a search can only ever return
users of the caller's tenant.

Persistence: :meth:`PreferenceIndex.save` writes all vectors to one safetensors file
(keys in its metadata) via temp + fsync + rename; :meth:`PreferenceIndex.load` reads it
and rebuilds the faiss indexes (faiss's own serialisation is not used).

Simplifications: exact search (fine for thousands of users); removing a user rebuilds
that tenant's index.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metarlhf.errors import ConfigError, DataError


def preference_vector(emb: np.ndarray, liked: Sequence[bool]) -> np.ndarray:
    """Unit vector ``mean(emb[liked]) - mean(emb[~liked])`` ([n, d], [n] -> [d]).

    Raises :class:`DataError` on empty input or a zero difference."""
    emb = np.asarray(emb, dtype=np.float32)
    mask = np.asarray(liked, dtype=bool)
    if emb.ndim != 2 or emb.shape[0] == 0 or mask.shape != (emb.shape[0],):
        raise DataError(f"need [n, d] embeddings with n >= 1 and n labels, got {emb.shape} and {mask.shape}")
    pos = emb[mask].mean(0) if mask.any() else np.zeros(emb.shape[1], np.float32)
    neg = emb[~mask].mean(0) if (~mask).any() else np.zeros(emb.shape[1], np.float32)
    v = pos - neg  # [d]
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm < 1e-8:
        raise DataError("feedback gives no preference direction (liked and disliked embeddings cancel out)")
    return (v / norm).astype(np.float32)


class PreferenceIndex:
    """Per-tenant exact cosine index of user preference vectors."""

    def __init__(self, dim: int, path: str | os.PathLike | None = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"dim must be an int >= 1, got {dim!r}")
        self.dim = dim
        self.path = Path(path) if path is not None else None
        self._vecs: dict[str, dict[str, np.ndarray]] = {}  # tenant -> user -> [d]
        self._index: dict[str, tuple[object, list[str]]] = {}  # tenant -> (faiss index, row -> user)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return sum(len(v) for v in self._vecs.values())

    def keys(self) -> list[tuple[str, str]]:
        """Every indexed ``(tenant, user)``."""
        with self._lock:
            return [(t, u) for t, users in self._vecs.items() for u in users]

    def _check(self, vec: np.ndarray) -> np.ndarray:
        v = np.asarray(vec, dtype=np.float32).reshape(-1)
        if v.shape != (self.dim,):
            raise DataError(f"preference vector has dimension {v.shape[0]}, the index holds {self.dim}")
        n = float(np.linalg.norm(v))
        if not np.isfinite(n) or n < 1e-8:
            raise DataError("preference vector is zero or not finite")
        return v / n

    def _rebuild(self, tenant: str) -> None:
        import faiss

        users = sorted(self._vecs.get(tenant, {}))
        index = faiss.IndexFlatIP(self.dim)
        if users:
            index.add(np.stack([self._vecs[tenant][u] for u in users]))  # [n, d]
        self._index[tenant] = (index, users)

    def upsert(self, tenant: str, user: str, vec: np.ndarray) -> None:
        v = self._check(vec)
        with self._lock:
            self._vecs.setdefault(tenant, {})[user] = v
            self._rebuild(tenant)

    def remove(self, tenant: str, user: str) -> bool:
        with self._lock:
            if user not in self._vecs.get(tenant, {}):
                return False
            del self._vecs[tenant][user]
            self._rebuild(tenant)
            return True

    def get(self, tenant: str, user: str) -> np.ndarray | None:
        with self._lock:
            return self._vecs.get(tenant, {}).get(user)

    def search(self, tenant: str, vec: np.ndarray, k: int = 5, exclude: str | None = None) -> list[tuple[str, float]]:
        """Up to ``k`` ``(user, cosine)`` of this tenant, most similar first."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be an int >= 1, got {k!r}")
        v = self._check(vec)
        with self._lock:
            if tenant not in self._index:
                return []
            index, users = self._index[tenant]
            if not users:
                return []
            kk = min(len(users), k + (1 if exclude is not None else 0))
            scores, rows = index.search(v[None, :], kk)  # [1, kk]
        out = [(users[r], float(s)) for s, r in zip(scores[0], rows[0], strict=True) if r >= 0 and users[r] != exclude]
        return out[:k]

    def neighbors(self, tenant: str, user: str, k: int = 5) -> list[tuple[str, float]]:
        """Nearest other users of a user already in the index ([] if they are not)."""
        v = self.get(tenant, user)
        return [] if v is None else self.search(tenant, v, k, exclude=user)

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike | None = None) -> Path:
        import torch

        from metarlhf.io import save_tensors

        path = Path(path) if path is not None else self.path
        if path is None:
            raise ConfigError("no path to save the preference index to")
        # snapshot, write and rename under the lock: two concurrent saves (a job, an erasure)
        # must not let an older snapshot's rename land last
        with self._lock:
            keys = [(t, u) for t in sorted(self._vecs) for u in sorted(self._vecs[t])]
            mat = np.stack([self._vecs[t][u] for t, u in keys]) if keys else np.zeros((0, self.dim), np.float32)
            save_tensors(path, {"vectors": torch.from_numpy(mat)},  # [n, d]
                         metadata={"keys": json.dumps(keys), "dim": str(self.dim)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, dim: int) -> PreferenceIndex:
        """Rebuild an index from a file written by :meth:`save` (empty if it does not exist)."""
        from safetensors import safe_open

        idx = cls(dim, path)
        path = Path(path)
        if not path.exists():
            return idx
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                mat = f.get_tensor("vectors")
            keys = json.loads(meta.get("keys", "[]"))
            file_dim = int(meta.get("dim", dim))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise DataError(f"preference index {str(path)!r} is unreadable: {e}") from e
        if file_dim != dim or mat.shape != (len(keys), dim):
            raise DataError(f"preference index {str(path)!r} holds {mat.shape} vectors of dim {file_dim}, expected {dim}")
        for (t, u), v in zip(keys, mat, strict=True):
            idx._vecs.setdefault(t, {})[u] = np.asarray(v, np.float32)
        for t in idx._vecs:
            idx._rebuild(t)
        return idx
