"""`dead-letters --drop` removes the entry the operator saw, by its dead_id: a letter that arrives
between the listing and the drop shifts every index (LPUSH), never the id. Real Redis."""
from __future__ import annotations

import json

import redis

from sandbox import deadletters


def _ids(client: redis.Redis) -> list[str]:
    return [json.loads(e)["dead_id"] for e in client.lrange(deadletters.DEAD_LIST, 0, -1)]


def test_drop_by_id_removes_the_listed_entry_even_after_a_newer_letter_shifted_the_indexes(
        redis_client: redis.Redis) -> None:
    redis_client.delete(deadletters.DEAD_LIST)
    for n in range(3):
        deadletters.push(redis_client, "sandbox", f"reason {n}", b"body")
    seen = deadletters.entries(redis_client)[1]  # the operator lists and picks index 1
    deadletters.push(redis_client, "sandbox", "a newer letter", b"body")  # index 1 is now another entry
    assert deadletters.drop(redis_client, seen["dead_id"]) == 1
    assert seen["dead_id"] not in _ids(redis_client)
    assert [e["reason"] for e in deadletters.entries(redis_client)] == ["a newer letter", "reason 2", "reason 0"]


def test_an_unknown_or_malformed_id_drops_nothing(redis_client: redis.Redis) -> None:
    redis_client.delete(deadletters.DEAD_LIST)
    deadletters.push(redis_client, "sandbox", "kept", b"body")
    assert deadletters.drop(redis_client, "dl0123456789abcdef") == 0
    assert deadletters.drop(redis_client, '" .. redis.call("DEL", KEYS[1]) .. "') == 0
    assert len(_ids(redis_client)) == 1
