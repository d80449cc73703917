'use strict';
/** SandboxClient: submit, wait, follow and cancel jobs over the service's Redis. */
const { randomUUID } = require('node:crypto');
const Redis = require('ioredis');
const { buildTaskMessage, QUEUE } = require('./message');
const { VanishWatch, JobVanished, runIdOf } = require('./vanish');

const CONTROL_QUEUE = 'sandbox.control';
const { validateJob } = require('./schema');

const TERMINAL = new Set(['succeeded', 'failed', 'timed_out', 'oom_killed', 'cancelled', 'rejected', 'error']);
const recordKey = (id) => `sandbox:job:${id}`;
const logsKey = (id) => `sandbox:job:${id}:logs`;
const eventsKey = (id) => `sandbox:job:${id}:events`;
const resultKey = (taskId) => `celery-task-meta-${taskId}`;
const JOB_ID = /^[A-Za-z0-9_-]{1,64}$/;

class TimeoutError extends Error {
  constructor(message) {
    super(message);
    this.name = 'TimeoutError';
  }
}

/** A Celery task that failed on the worker (its result has status FAILURE). */
class TaskFailed extends Error {
  constructor(taskId, result) {
    super(`task ${taskId} failed: ${result && result.exc_type}: ${result && result.exc_message}`);
    this.name = 'TaskFailed';
    this.taskId = taskId;
    this.result = result;
  }
}

function checkJobId(id) {
  if (typeof id !== 'string' || !JOB_ID.test(id)) throw new TypeError(`invalid job id ${JSON.stringify(id)}`);
  return id;
}

function fieldsToObject(fields) {
  const out = {};
  for (let i = 0; i + 1 < fields.length; i += 2) out[fields[i]] = fields[i + 1];
  return out;
}

function logEntry(id, fields) {
  const raw = fieldsToObject(fields);
  const entry = { id, stream: raw.stream, seq: Number(raw.seq), ts: Number(raw.ts), line: raw.line ?? '' };
  if (raw.cut === '1') entry.cut = true;
  if (raw.marker !== undefined) entry.marker = raw.marker;
  return entry;
}

function eventEntry(id, fields) {
  try {
    const event = JSON.parse(fieldsToObject(fields).event);
    return event && typeof event === 'object' ? { id, ...event } : { id, type: 'invalid' };
  } catch {
    return { id, type: 'invalid' };
  }
}

const isConnectionError = (e) => Boolean(e) && (e.name === 'MaxRetriesPerRequestError'
  || /ECONNREFUSED|ECONNRESET|EPIPE|Connection is closed|Stream isn't writeable/.test(String(e.message)));
const isTerminal = (event) => event.type === 'status' && TERMINAL.has(event.status);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * `promise`, or a rejection with the signal's reason as soon as `signal` aborts, whichever comes
 * first. While Redis is down an ioredis command waits in the offline queue for a reconnect, and one
 * on a connection disconnect() closed mid-reconnect never settles at all: every await of a wait or a
 * follow goes through here, so none outlives its timeout or signal whatever Redis does. The listener
 * is removed once either side settles (a long follow makes thousands of these).
 */
function orAbort(promise, signal) {
  if (!signal) return promise;
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    if (signal.aborted) {
      onAbort();
    } else {
      signal.addEventListener('abort', onAbort, { once: true });
    }
    promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}

class SandboxClient {
  /** `redis`: a URL or an ioredis instance (not closed by close() when passed in). */
  constructor({ redis = process.env.REDIS_URL || 'redis://127.0.0.1:6379/0', queue = QUEUE, blockMs = 1000 } = {}) {
    this.ownsRedis = !(redis instanceof Redis);
    this.redis = this.ownsRedis ? new Redis(redis, { lazyConnect: false, maxRetriesPerRequest: 3 }) : redis;
    this.queue = queue;
    this.blockMs = blockMs;
  }

  /** Closes the connection this client opened. */
  async close() {
    if (this.ownsRedis) await this.redis.quit();
  }

  async enqueue(task, args, queue = this.queue) {
    const { taskId, raw } = buildTaskMessage(task, args, { queue });
    await this.redis.lpush(queue, raw);
    return taskId;
  }

  /**
   * Validates and enqueues `sandbox.submit`; the job gets a fresh id unless it names one. The
   * handle carries the run of Redis the message went to (`runId`, from INFO in the same MULTI as
   * the push): wait() given it sees a restart that lost the job however late the wait begins.
   */
  async submit(job) {
    const withId = job && typeof job === 'object' && !Array.isArray(job) && job.id === undefined
      ? { ...job, id: randomUUID() } : job;
    validateJob(withId);
    // The job goes as JSON text, as the Python CLI sends it: the worker then parses it with its
    // strict loader (duplicate keys, the document size limit) like any other submission. Sent as
    // an object, kombu would decode it first and parse_job would see a ready-made dict.
    const { taskId, raw } = buildTaskMessage('sandbox.submit', [JSON.stringify(withId)], { queue: this.queue });
    const [[infoError, info], [pushError]] = await this.redis.multi().info('server').lpush(this.queue, raw).exec();
    if (pushError) throw pushError;
    return { jobId: withId.id, taskId, runId: infoError ? null : runIdOf(info) };
  }

  /** The job record, or null. */
  async getRecord(jobId) {
    const raw = await this.redis.get(recordKey(checkJobId(jobId)));
    return raw === null ? null : JSON.parse(raw);
  }

  /** A Celery result ({status, result, ...}), or null while it is pending. */
  async getTaskResult(taskId) {
    const raw = await this.redis.get(resultKey(taskId));
    return raw === null ? null : JSON.parse(raw);
  }

  /**
   * Waits for the job's terminal status, then returns its record. onLog/onEvent see every entry
   * as it arrives. A submit task that failed on the worker rejects with TaskFailed; a job Redis
   * lost rejects with JobVanished (pass submit()'s `taskId` and `runId`; see lib/vanish.js).
   */
  async wait(jobId, { taskId, runId, timeoutMs = 300_000, onLog, onEvent, signal } = {}) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(new TimeoutError(`job ${jobId} not finished after ${timeoutMs} ms`)), timeoutMs);
    const onAbort = () => controller.abort(signal.reason);
    if (signal?.aborted) onAbort();
    else if (signal) signal.addEventListener('abort', onAbort, { once: true });
    try {
      const watch = await orAbort(new VanishWatch(this.redis, jobId, taskId, this.queue, { runId }).begin(), controller.signal);
      // one idle tick: the task's result, then the record once (the follow's end and the watch share it)
      const idle = async () => {
        if (taskId) await this.#checkTask(taskId);
        const record = await this.getRecord(jobId);
        await watch.check(record);
        return record;
      };
      for await (const item of this.#follow(jobId, { signal: controller.signal }, idle)) {
        if (item.kind === 'log' && onLog) onLog(item);
        if (item.kind === 'event' && onEvent) onEvent(item);
      }
      if (controller.signal.aborted) throw controller.signal.reason;
      const record = await orAbort(this.getRecord(jobId), controller.signal);
      if (!record) throw new Error(`job ${jobId} ended but its record is gone`);
      return record;
    } finally {
      clearTimeout(timer);
      if (signal) signal.removeEventListener('abort', onAbort);
    }
  }

  async #checkTask(taskId) {
    const result = await this.getTaskResult(taskId);
    if (result && result.status === 'FAILURE') throw new TaskFailed(taskId, result.result);
  }

  /** submit() then wait(); resolves to the final record. */
  async run(job, options = {}) {
    const { jobId, taskId, runId } = await this.submit(job);
    return this.wait(jobId, { ...options, taskId, runId });
  }

  /**
   * Log lines and events as they arrive ({kind: "log"|"event", id, ...}), from the given ids
   * ("0" = from the start), until the job is terminal. Resume by passing the last ids seen.
   */
  async *follow(jobId, options = {}) {
    const { onIdle } = options;
    yield* this.#follow(jobId, options, async () => {
      if (onIdle) await onIdle();
      return this.getRecord(jobId);
    });
  }

  /** follow(), where `idle()` runs on each idle tick and answers the job record (or null). */
  async *#follow(jobId, { logId = '0', eventId = '0', blockMs = this.blockMs, signal } = {}, idle) {
    checkJobId(jobId);
    // XREAD BLOCK holds its connection: each follower gets its own.
    const conn = this.redis.duplicate();
    // Its connection errors reach us as failed commands (handled below); without a listener ioredis
    // would also print each one as an "Unhandled error event" for as long as Redis is down.
    conn.on('error', () => {});
    // Disconnecting ends a blocked XREAD at once and stops the reconnecting; the queued command it
    // may leave unsettled is not awaited: every await below races the signal (orAbort).
    const stop = () => conn.disconnect();
    if (signal) signal.addEventListener('abort', stop, { once: true });
    let finished = false;
    try {
      while (!signal?.aborted) {
        const block = finished ? [] : ['BLOCK', blockMs];
        let rows;
        try {
          rows = await orAbort(conn.xread('COUNT', 500, ...block, 'STREAMS', logsKey(jobId), eventsKey(jobId), logId, eventId), signal);
        } catch (e) {
          if (signal?.aborted) return;
          if (!isConnectionError(e)) throw e;
          try {
            await orAbort(sleep(500), signal); // Redis restarting: with its AOF it comes back with the job; keep following
          } catch {
            return; // aborted
          }
          continue;
        }
        if (!rows) {
          if (finished) return;
          try {
            // A follower arriving after the events stream expired would block forever otherwise.
            const record = await orAbort(idle(), signal);
            if (record && TERMINAL.has(record.status)) finished = true;
          } catch (e) {
            if (signal?.aborted) return;
            if (!isConnectionError(e)) throw e;
          }
          continue;
        }
        for (const [key, entries] of rows) {
          for (const [id, fields] of entries) {
            if (key === logsKey(jobId)) {
              logId = id;
              yield { kind: 'log', ...logEntry(id, fields) };
            } else {
              eventId = id;
              const event = eventEntry(id, fields);
              // The last log lines may land just before the terminal event: drain once more.
              if (isTerminal(event)) finished = true;
              yield { kind: 'event', ...event };
            }
          }
        }
      }
    } finally {
      if (signal) signal.removeEventListener('abort', stop);
      conn.disconnect();
    }
  }

  /** Only the log entries of follow(). */
  async *followLogs(jobId, options = {}) {
    for await (const item of this.follow(jobId, options)) if (item.kind === 'log') yield item;
  }

  /** Only the events of follow(); ends after the terminal status. */
  async *followEvents(jobId, options = {}) {
    for await (const item of this.follow(jobId, options)) if (item.kind === 'event') yield item;
  }

  /** Enqueues `sandbox.cancel` and returns its answer {job_id, cancelled, status, message}. */
  async cancel(jobId, { timeoutMs = 60_000 } = {}) {
    // sandbox.cancel goes to the control queue, which workers read even with every slot busy
    const taskId = await this.enqueue('sandbox.cancel', [checkJobId(jobId)], CONTROL_QUEUE);
    return this.waitForTask(taskId, { timeoutMs });
  }

  /** Polls a Celery result until it is ready; returns the task's return value. */
  async waitForTask(taskId, { timeoutMs = 60_000 } = {}) {
    const deadline = Date.now() + timeoutMs;
    let pause = 10;
    while (Date.now() < deadline) {
      const result = await this.getTaskResult(taskId);
      if (result && result.status === 'SUCCESS') return result.result;
      if (result && result.status === 'FAILURE') throw new TaskFailed(taskId, result.result);
      await sleep(pause);
      pause = Math.min(pause * 2, 200);
    }
    throw new TimeoutError(`task ${taskId} not finished after ${timeoutMs} ms`);
  }
}

module.exports = { SandboxClient, TaskFailed, TimeoutError, JobVanished, TERMINAL };
