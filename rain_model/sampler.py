"""P x K identity-balanced batches, split across distributed workers (ranks)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


class IdentityBalancedSampler:
    """Batch sampler: every *global* batch holds P identities x K images; each rank gets P / world_size
    of those identities (with their K images each), so ranks are disjoint and together cover the batch.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)``; call ``set_epoch(e)`` before each epoch.

    How an epoch is drawn (all from ``numpy.random.default_rng([seed, epoch])``, so every rank computes
    the same global order and takes its own share):

    * Identities are visited in shuffled order, a fresh permutation each time the previous one is used
      up; a batch takes the next P *distinct* ones.
    * An identity's K images come from its own stream of shuffled permutations of its images, so all
      of them are used before any repeats; an identity with fewer than K images repeats some.
    * Unlabelled images (label < 0), unless ``drop_unlabelled``, are shuffled once per epoch and cut
      into groups of K (the last one topped up from the start); each group takes an identity slot.
    * ``len(sampler)`` = max(1, number of images // (P * K)) batches per epoch, the same on every rank.

    ``state_dict()`` holds the epoch and the position (batches this sampler has yielded in the epoch);
    ``load_state_dict`` resumes at the next batch. A DataLoader with workers pulls batches ahead of the
    training loop, so a trainer that checkpoints should store its own count of consumed batches as
    ``position``. A completed pass resets the position to 0 (the same epoch can be iterated again).
    """

    def __init__(
        self,
        labels: Sequence[int],
        p: int,
        k: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_unlabelled: bool = False,
    ) -> None:
        if p < 1 or k < 1:
            raise ValueError(f"p={p!r}, k={k!r}: both must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r}, world_size={world_size!r}: need 0 <= rank < world_size")
        if p % world_size:
            raise ValueError(f"p={p!r}: must be divisible by world_size={world_size}")
        label_array = np.asarray(labels, dtype=np.int64)
        if label_array.ndim != 1:
            raise ValueError(f"labels: expected a 1-d sequence of ints, got shape {label_array.shape}")
        self.p, self.k, self.seed = p, k, seed
        self.rank, self.world_size = rank, world_size
        identities, inverse = np.unique(label_array[label_array >= 0], return_inverse=True)
        labelled = np.flatnonzero(label_array >= 0)
        order = np.argsort(inverse, kind="stable")  # labelled images grouped by identity
        bounds = np.cumsum(np.bincount(inverse, minlength=len(identities)))[:-1]
        self._images_of: list[np.ndarray] = np.split(labelled[order], bounds) if len(identities) else []
        empty = np.zeros(0, dtype=np.int64)
        self._unlabelled = empty if drop_unlabelled else np.flatnonzero(label_array < 0)
        self._n_groups = len(identities) + -(-len(self._unlabelled) // k)
        if self._n_groups < p:
            raise ValueError(
                f"p={p!r}: only {len(identities)} identities and {len(self._unlabelled)} unlabelled images "
                f"({self._n_groups} groups of K={k}) to fill {p} distinct slots per batch"
            )
        n_images = len(labelled) + len(self._unlabelled)
        self._len = max(1, n_images // (p * k))
        self._epoch = 0
        self._position = 0

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shuffle); a new epoch starts at its first batch."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._position = 0

    def __iter__(self) -> Iterator[list[int]]:
        start = self._position
        for b, groups in enumerate(self._global_batches(self._epoch)):
            if b < start:
                continue
            self._position = b + 1
            share = self.p // self.world_size
            mine = groups[self.rank * share : (self.rank + 1) * share]  # share x K indices
            yield [int(i) for group in mine for i in group]
        self._position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed, "p": self.p, "k": self.k}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "p", "k"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"{key}={state[key]!r} in the state, but this sampler has {getattr(self, key)!r}")
        position = int(state["position"])
        if not 0 <= position <= self._len:
            raise ValueError(f"position={position!r}: must be in 0..{self._len}")
        self._epoch = int(state["epoch"])
        self._position = position

    def _global_batches(self, epoch: int) -> Iterator[list[np.ndarray]]:
        """The whole epoch as every rank draws it: per batch, P groups of K dataset indices."""
        rng = np.random.default_rng([self.seed, epoch])
        n_identities = len(self._images_of)
        unlabelled = rng.permutation(self._unlabelled)
        n_unlabelled_groups = self._n_groups - n_identities
        unlabelled_groups = np.resize(unlabelled, n_unlabelled_groups * self.k).reshape(-1, self.k)
        streams: list[np.ndarray] = [np.zeros(0, dtype=np.int64) for _ in range(n_identities)]
        queue: deque[int] = deque()
        for _ in range(self._len):
            chosen: list[int] = []
            deferred: list[int] = []
            while len(chosen) < self.p:
                if not queue:
                    queue.extend(int(g) for g in rng.permutation(self._n_groups))
                group = queue.popleft()
                (deferred if group in chosen else chosen).append(group)
            queue.extendleft(reversed(deferred))
            batch: list[np.ndarray] = []
            for group in chosen:
                if group >= n_identities:
                    batch.append(unlabelled_groups[group - n_identities])
                    continue
                while len(streams[group]) < self.k:
                    streams[group] = np.concatenate([streams[group], rng.permutation(self._images_of[group])])
                batch.append(streams[group][: self.k])
                streams[group] = streams[group][self.k :]
            yield batch
