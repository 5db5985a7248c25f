"""The evaluation splits of a trial and their manifest roles: the test split (the paper's protocol) and
the validation split carved from the training identities (`protocol.val_identities`)."""

from __future__ import annotations

TEST, VAL = "test", "val"


def role(split: str, kind: str) -> str:
    """The manifest role of a `kind` (query | gallery | gallery_pool) row of `split`: `query` for the test
    split, `val_query` for validation; training rows are `train` either way."""
    return kind if split == TEST or kind == "train" else f"{split}_{kind}"
