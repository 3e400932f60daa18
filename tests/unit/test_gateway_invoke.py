"""Pieces of the Invoke handlers: request ids (random version-4 UUIDs, as Lambda's)."""

from __future__ import annotations

import uuid

from lambdalet_gateway.invoke import new_request_id


def test_request_ids_are_random_version_4_uuids() -> None:
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    variants = set()
    for value in ids:
        parsed = uuid.UUID(value)
        assert str(parsed) == value  # canonical: lower-case, 8-4-4-4-12
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        variants.add(value[19])
    # every variant digit occurs (the two random bits after the variant's "10" are kept)
    assert variants == set("89ab")
    # and every position other than the version and variant nibbles takes more than one value
    for position in range(36):
        if position not in {8, 13, 14, 18, 19, 23}:
            assert len({value[position] for value in ids}) > 8, position
