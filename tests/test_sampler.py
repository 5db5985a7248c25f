"""IdentityBalancedSampler: P x K structure, rank shares, shuffling, determinism, resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from rain_model.sampler import IdentityBalancedSampler

# 12 identities with 1..7 images each (shuffled in the dataset), plus 9 unlabelled images
_RNG = np.random.default_rng(0)
LABELS: list[int] = _RNG.permutation(
    np.concatenate([np.repeat(np.arange(12), [1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5]), np.full(9, -1)])
).tolist()


def _sampler(**kwargs: object) -> IdentityBalancedSampler:
    args: dict[str, object] = {"labels": LABELS, "p": 4, "k": 3, "seed": 5}
    args.update(kwargs)
    return IdentityBalancedSampler(**args)  # type: ignore[arg-type]


def _groups(sampler: IdentityBalancedSampler) -> list[list[list[int]]]:
    """The batches of one pass over `sampler`, each cut into consecutive groups of K indices."""
    return [[batch[i:i + sampler.k] for i in range(0, len(batch), sampler.k)] for batch in sampler]


def test_every_global_batch_has_p_identities_times_k_images() -> None:
    sampler = _sampler(drop_unlabelled=True)
    batches = _groups(sampler)
    assert len(batches) == len(sampler) == sum(label >= 0 for label in LABELS) // (4 * 3)
    for groups in batches:
        assert len(groups) == 4 and all(len(group) == 3 for group in groups)
        identities = [{LABELS[i] for i in group} for group in groups]
        assert all(len(ids) == 1 for ids in identities)  # each group is one identity
        assert len({next(iter(ids)) for ids in identities}) == 4  # P distinct identities


def test_identities_are_visited_evenly_and_their_images_before_repeats() -> None:
    sampler = _sampler(drop_unlabelled=True, p=2, k=2)
    visits: Counter[int] = Counter()
    images: dict[int, list[int]] = {}
    for groups in _groups(sampler):
        for group in groups:
            visits[LABELS[group[0]]] += 1
            images.setdefault(LABELS[group[0]], []).extend(group)
    assert max(visits.values()) - min(visits.values()) <= 2
    for identity, drawn in images.items():
        n = LABELS.count(identity)
        first_pass = drawn[:n]  # a permutation of the identity's images, then the next one
        assert len(set(first_pass)) == len(first_pass), identity


def test_ranks_get_disjoint_identities_that_cover_the_global_batch() -> None:
    world = [_sampler(rank=r, world_size=2, p=4) for r in range(2)]
    assert len(world[0]) == len(world[1])
    per_rank = [list(s) for s in world]
    whole = list(_sampler(p=4))  # one process (world_size 1) takes the whole global batch
    assert len(whole) == len(per_rank[0])
    for b, batch in enumerate(whole):
        shares = [per_rank[r][b] for r in range(2)]
        assert all(len(share) == 2 * 3 for share in shares)  # P / world_size identities x K
        assert shares[0] + shares[1] == batch
        ids = [{LABELS[i] for i in share if LABELS[i] >= 0} for share in shares]
        assert not ids[0] & ids[1]


def test_unlabelled_images_fill_slots_unless_dropped() -> None:
    kept = {i for batch in _sampler() for i in batch}
    assert {i for i, label in enumerate(LABELS) if label < 0} <= kept  # one epoch uses all of them
    dropped = {i for batch in _sampler(drop_unlabelled=True) for i in batch}
    assert all(LABELS[i] >= 0 for i in dropped)


def test_epochs_are_reshuffled_and_each_seed_is_deterministic() -> None:
    a, b, other_seed = _sampler(), _sampler(), _sampler(seed=6)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    other_seed.set_epoch(3)
    assert list(other_seed) != list(a)
    b.set_epoch(4)
    assert list(b) != list(a)


def test_state_dict_round_trip_resumes_at_the_same_batch() -> None:
    full = _sampler(rank=1, world_size=2)
    full.set_epoch(2)
    expected = list(full)

    first = _sampler(rank=1, world_size=2)
    first.set_epoch(2)
    iterator = iter(first)
    seen = [next(iterator) for _ in range(2)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["position"] == 2

    resumed = _sampler(rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a trainer calls this again for the epoch it resumes: position is kept
    assert seen + list(resumed) == expected
    assert resumed.state_dict()["position"] == 0  # a finished pass starts the epoch over
    assert list(resumed) == expected


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="world_size"):
        _sampler(p=3, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        _sampler(rank=2, world_size=2)
    with pytest.raises(ValueError, match="p=40"):
        _sampler(p=40)
    with pytest.raises(ValueError, match="seed"):
        _sampler().load_state_dict({"epoch": 0, "position": 0, "seed": 99})


def test_unlabelled_images_are_unlabelled_for_the_sampler_too() -> None:
    """Semi-supervised training (Figure 5): permuting the hidden identities of the unlabelled images changes
    neither the training labels nor a single batch, and C predicts only the labelled identities."""
    from tasks.images.loaders import semi_supervised_labels

    true = [i // 4 for i in range(80)]  # 20 identities x 4 images
    labels = semi_supervised_labels(true, 0.4, seed=3)
    assert sorted({y for y in labels if y >= 0}) == list(range(8))  # 40% of 20, renumbered for C
    hidden = [i for i, y in enumerate(labels) if y < 0]
    shuffled = list(true)
    for i, j in zip(hidden, np.random.default_rng(0).permutation(hidden), strict=True):
        shuffled[i] = true[j]
    assert shuffled != true
    assert semi_supervised_labels(shuffled, 0.4, seed=3) == labels
    a = IdentityBalancedSampler(labels, 4, 4, seed=1)
    b = IdentityBalancedSampler(semi_supervised_labels(shuffled, 0.4, seed=3), 4, 4, seed=1)
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert [list(x) for x in a] == [list(x) for x in b]
