"""A job with a callback_url: the worker POSTs its terminal record, signed, and retries a failure."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sandbox import webhooks
from tests.conftest import WEBHOOK_SECRET, new_job_id, wait_for


class Receiver(ThreadingHTTPServer):
    """Answers 500 to the first delivery, then verifies every signature and keeps what it accepts."""

    def __init__(self, fail_first: bool = True) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.fail_first = fail_first
        self.attempts: list[dict] = []
        self.accepted: list[dict] = []


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.attempts.append({"delivery": self.headers["X-Sandbox-Delivery"]})
        try:
            webhooks.verify(WEBHOOK_SECRET.encode(), self.headers["X-Sandbox-Signature"], body)
        except ValueError:
            self.send_response(401)
        else:
            if self.server.fail_first and len(self.server.attempts) == 1:
                self.send_response(500)
            else:
                self.server.accepted.append(json.loads(body))
                self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


def test_terminal_record_reaches_the_receiver_after_a_failed_first_delivery(submit, redis_client):
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        job_id = new_job_id("hook")
        url = f"http://127.0.0.1:{receiver.server_address[1]}/hooks/sandbox"
        record = submit({"id": job_id, "command": "ls", "callback_url": url})
        assert record["status"] == "succeeded"

        wait_for(lambda: receiver.accepted, timeout_s=60)
        [envelope] = receiver.accepted
        assert envelope["event"] == "job.terminal"
        assert envelope["data"]["id"] == job_id and envelope["data"]["status"] == "succeeded"
        # One delivery id across the retry, so a receiver can drop duplicates.
        assert {a["delivery"] for a in receiver.attempts} == {envelope["delivery_id"]}
        deliveries = wait_for(lambda: json.loads(redis_client.get(f"sandbox:job:{job_id}"))["webhook_deliveries"])
        assert [d["status_code"] for d in deliveries] == [500, 204]
    finally:
        receiver.shutdown()


def test_callback_host_off_the_allow_list_is_rejected(submit):
    record = submit({"id": new_job_id("hookbad"), "command": "ls", "callback_url": "https://evil.example/x"})
    assert record["status"] == "rejected"
    assert record["error"]["field"] == "/callback_url"


def test_callback_events_all_posts_every_transition_once_then_the_record(submit):
    receiver = Receiver(fail_first=False)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        job_id = new_job_id("hookall")
        url = f"http://127.0.0.1:{receiver.server_address[1]}/hooks"
        record = submit({"id": job_id, "command": "ls", "callback_url": url, "callback_events": "all"})
        wait_for(lambda: any(e["event"] == "job.terminal" for e in receiver.accepted), timeout_s=60)
        wait_for(lambda: len(receiver.accepted) >= 7, timeout_s=30)
        statuses = sorted((e["data"]["at"], e["data"]["status"]) for e in receiver.accepted if e["event"] == "job.status")
        assert [s for _, s in statuses] == ["queued", "creating", "preparing", "running", "collecting", "cleaning"]
        assert [e["data"]["status"] for e in receiver.accepted if e["event"] == "job.terminal"] == [record["status"]]
    finally:
        receiver.shutdown()
