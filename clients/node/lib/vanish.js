'use strict';
/**
 * VanishWatch: tells a waiter when its job can no longer end because Redis lost it. The same rules
 * as the Python side's sandbox.nodes.SubmissionWatch.
 *
 * It is given the record each idle tick reads (it reads none itself). Only a Redis restart (INFO's
 * run_id changed) while the job was never recorded is a reason to look for its message in the queue
 * and `unacked`: at once, then again after RESCAN_FIRST_MS doubling up to RESCAN_MAX_MS while it
 * stays unrecorded (a queue of thousands is not read on every tick). A scan that misses it is
 * confirmed by one more scan RESCAN_FIRST_MS later before the job is called lost: kombu moves a
 * restored or just-fetched message between the queue and `unacked` in two steps.
 */

const RESCAN_FIRST_MS = 1000;
const RESCAN_MAX_MS = 60_000;

/** The job can no longer end: Redis lost it (a restart without its data, or the last second of
 * submissions before a crash with AOF everysec). Submit it again. */
class JobVanished extends Error {
  constructor(jobId, message) {
    super(message);
    this.name = 'JobVanished';
    this.jobId = jobId;
  }
}

/** The run of Redis an INFO answer describes (its run_id, new at every start), or null. */
function runIdOf(info) {
  const match = /^run_id:(\S+)/m.exec(String(info));
  return match ? match[1] : null;
}

class VanishWatch {
  /**
   * `now` is injectable for tests; `taskId` (the submit task's id) is what the scan looks for.
   * `runId` is the run of Redis the job was submitted to (submit() reads it with the send), so a
   * restart between the submit and a later wait is seen too. Without it begin() takes the run the
   * wait begins on, and a restart that lost the job before then goes unseen (the wait's own timeout
   * ends it).
   */
  constructor(redis, jobId, taskId, queue, { now = Date.now, runId = null } = {}) {
    Object.assign(this, { redis, jobId, taskId, queue, now });
    this.runId = runId ?? null;
    this.seen = false;
    this.nextScanAt = null; // set by a restart; null: no reason to scan
    this.rescanMs = RESCAN_FIRST_MS;
    this.missed = false; // the last scan did not find the message: the next one confirms
  }

  /** Without the submit's run: notes the run the wait begins on (null if Redis is down: the first
   * one seen counts). */
  async begin() {
    if (this.runId === null) this.runId = await this.#runId().catch(() => null);
    return this;
  }

  /** Throws JobVanished once the record that existed is gone, or a restart lost the unrecorded job. */
  async check(record) {
    if (record) {
      this.seen = true;
      return;
    }
    if (this.seen) throw new JobVanished(this.jobId, `job ${this.jobId}'s record disappeared from Redis (data lost)`);
    if (!this.taskId) return;
    const runId = await this.#runId();
    if (this.runId === null) {
      this.runId = runId;
    } else if (runId !== null && runId !== this.runId) {
      Object.assign(this, { runId, missed: false, nextScanAt: this.now(), rescanMs: RESCAN_FIRST_MS });
    }
    if (this.nextScanAt === null || this.now() < this.nextScanAt) return;
    if (await this.#inFlight()) {
      this.missed = false;
      this.nextScanAt = this.now() + this.rescanMs;
      this.rescanMs = Math.min(this.rescanMs * 2, RESCAN_MAX_MS);
      return;
    }
    if (!this.missed) {
      this.missed = true;
      this.nextScanAt = this.now() + RESCAN_FIRST_MS;
      return;
    }
    throw new JobVanished(this.jobId, `Redis restarted and job ${this.jobId} was lost with it (never recorded, no longer queued): submit it again`);
  }

  async #runId() {
    return runIdOf(await this.redis.info('server'));
  }

  async #inFlight() {
    const queued = await this.redis.lrange(this.queue, 0, -1);
    if (queued.some((item) => item.includes(this.taskId))) return true;
    const unacked = await this.redis.hvals('unacked');
    return unacked.some((item) => item.includes(this.taskId));
  }
}

module.exports = { VanishWatch, JobVanished, runIdOf, RESCAN_FIRST_MS, RESCAN_MAX_MS };
