"""A job with a callback_url: the worker POSTs its terminal record, signed, and retries a failure."""
from __future__ import annotations

import json

from sandbox import webhooks
from tests.conftest import WEBHOOK_SECRET, new_job_id, wait_for
from tests.support.hooks import HookReceiver, Post


class Receiver(HookReceiver):
    """Answers 500 to the first delivery, then verifies every signature and keeps what it accepts."""

    def __init__(self, fail_first: bool = True) -> None:
        super().__init__(self._judge)
        self.fail_first = fail_first
        self.accepted: list[dict] = []

    def _judge(self, post: Post) -> int:
        try:
            webhooks.verify(WEBHOOK_SECRET.encode(), post.headers["X-Sandbox-Signature"], post.body)
        except ValueError:
            return 401
        if self.fail_first and len(self.posts) == 1:
            return 500
        self.accepted.append(json.loads(post.body))
        return 204


def test_terminal_record_reaches_the_receiver_after_a_failed_first_delivery(submit, redis_client):
    with Receiver() as receiver:
        job_id = new_job_id("hook")
        record = submit({"id": job_id, "command": "ls", "callback_url": receiver.url})
        assert record["status"] == "succeeded"

        wait_for(lambda: receiver.accepted, timeout_s=60)
        [envelope] = receiver.accepted
        assert envelope["event"] == "job.terminal"
        assert envelope["data"]["id"] == job_id and envelope["data"]["status"] == "succeeded"
        # One delivery id across the retry, so a receiver can drop duplicates.
        assert {p.headers["X-Sandbox-Delivery"] for p in receiver.posts} == {envelope["delivery_id"]}
        deliveries = wait_for(lambda: json.loads(redis_client.get(f"sandbox:job:{job_id}"))["webhook_deliveries"])
        assert [d["status_code"] for d in deliveries] == [500, 204]


def test_callback_host_off_the_allow_list_is_rejected(submit):
    record = submit({"id": new_job_id("hookbad"), "command": "ls", "callback_url": "https://evil.example/x"})
    assert record["status"] == "rejected"
    assert record["error"]["field"] == "/callback_url"


def test_callback_events_all_posts_every_transition_once_then_the_record(submit):
    with Receiver(fail_first=False) as receiver:
        job_id = new_job_id("hookall")
        record = submit({"id": job_id, "command": "ls", "callback_url": receiver.url,
                         "callback_events": "all"})
        wait_for(lambda: any(e["event"] == "job.terminal" for e in receiver.accepted), timeout_s=60)
        wait_for(lambda: len(receiver.accepted) >= 7, timeout_s=30)
        statuses = sorted((e["data"]["at"], e["data"]["status"]) for e in receiver.accepted if e["event"] == "job.status")
        assert [s for _, s in statuses] == ["queued", "creating", "preparing", "running", "collecting", "cleaning"]
        assert [e["data"]["status"] for e in receiver.accepted if e["event"] == "job.terminal"] == [record["status"]]
