"""Celery's own settings, built from Settings (the SANDBOX_* variables)."""
from config import load_settings
from config.settings import LONGEST_OTHER_STAGE_S, WORKER_HEADROOM_THREADS
from sandbox import nodes as _nodes

_settings = load_settings()

broker_url = _settings.redis_url
result_backend = _settings.redis_url

# JSON only: a pickle message is refused (ContentDisallowed) instead of being executed.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# One worker process per node, its tasks on threads (docs/capacity.md): a sandbox is a subprocess
# the stages mostly wait on, and a thread costs a few hundred KiB where a prefork child cost ~100 MB.
# Enough threads for every admissible sandbox's current stage plus headroom for submits, notifies
# and creates waiting for admission: admitted jobs' stages can always get a thread.
worker_pool = "threads"
worker_concurrency = _settings.node_max_sandboxes + WORKER_HEADROOM_THREADS

# A task is acknowledged only once it finished; a lost worker's task is redelivered, so every
# stage is idempotent and `execute` claims the job in Redis before it starts the command.
task_acks_late = True
task_reject_on_worker_lost = True  # no effect under threads: a lost node is found by its heartbeat
worker_prefetch_multiplier = 1
# Redis redelivers anything unacknowledged after visibility_timeout: it must exceed the longest
# stage (execute at the operator's maximum timeout) or a healthy job would run twice.
# A killed worker's unacknowledged messages come back once the visibility timeout has passed and
# a restore sweep runs: every 10 s here (kombu's default is every 100 s).
# "priority": a node drains its queues in the order tasks.app.consumed_queues lists them (its
# in-flight jobs' stages, then submits, then new creates), so a burst never grows live sandboxes
# faster than jobs finish (kombu's default round robin ran every create of a burst first).
broker_transport_options = {"visibility_timeout": _settings.visibility_timeout_s,
                            "unacked_restore_interval": 10, "unacked_restore_throttle": 1,
                            "queue_order_strategy": "priority"}
result_backend_transport_options = {"visibility_timeout": _settings.visibility_timeout_s}
broker_connection_retry_on_startup = True
# A Redis restart (seconds) must not drop a chain's next stage or a stage's result: Celery's
# defaults give up after about a second, which stalled a job mid-chain when Redis restarted.
task_publish_retry_policy = {"max_retries": 40, "interval_start": 0, "interval_step": 0.5, "interval_max": 2}
result_backend_always_retry = True
result_backend_max_retries = 40
result_backend_max_sleep_between_retries_ms = 2000
# The guards of docs/reliability.md: a queue item that is no message envelope is dead-lettered by
# the transport, a task message Celery cannot run by the consumer; neither stops the worker.
broker_transport = "tasks.transport:Transport"
worker_consumer = "tasks.consumer:Consumer"

task_default_queue = "sandbox"
# Cancels and beat's stuck/orphan sweeps have a queue of their own that every worker consumes
# outside the task prefetch limit (tasks.consumer.ControlConsumer): they never wait for a slot.
task_routes = {name: {"queue": "sandbox.control"}
               for name in ("sandbox.cancel", "sandbox.sweep_stuck", "sandbox.sweep_orphans")}
task_create_missing_queues = True
result_expires = _settings.record_ttl_s
result_extended = True

# Flower needs worker events.
worker_send_task_events = True
task_send_sent_event = True
# No STARTED state in the result backend: nobody reads it (Flower follows events), and it cost two
# Redis writes per job. Job progress is the job record's status.
task_track_started = False

# Per-stage limits (seconds). execute's limits are set per job from its timeout (tasks.canvas).
task_annotations = {
    "sandbox.submit": {"soft_time_limit": 30, "time_limit": 60},
    "sandbox.create": {"soft_time_limit": 120, "time_limit": 180},
    "sandbox.prepare": {"soft_time_limit": LONGEST_OTHER_STAGE_S - 60, "time_limit": LONGEST_OTHER_STAGE_S},
    "sandbox.collect": {"soft_time_limit": LONGEST_OTHER_STAGE_S - 60, "time_limit": LONGEST_OTHER_STAGE_S},
    "sandbox.cleanup": {"soft_time_limit": 120, "time_limit": 180},
    "sandbox.cancel": {"soft_time_limit": 30, "time_limit": 60},
    "sandbox.notify": {"soft_time_limit": 300, "time_limit": 360},  # every retry of one delivery
    "sandbox.sweep_orphans": {"soft_time_limit": 30, "time_limit": 60},
    "sandbox.sweep_node": {"soft_time_limit": 300, "time_limit": 360},
    "sandbox.sweep_stuck": {"soft_time_limit": 300, "time_limit": 360},
    "sandbox.sweep_artifacts": {"soft_time_limit": 3000, "time_limit": 3300},  # under its 1 h period
}

# One beat is enough; a second (or a restarted one) sends every sweep twice, but each sweep takes a
# Redis lock for its period (tasks.sweeps), so only one of the two does the work.
beat_schedule = _nodes.beat_schedule(_settings)  # sandbox.nodes lists the sweeps (health checks the same list)
