'use strict';
// VanishWatch with a fake Redis and clock: when a waiter scans the queue, and when it gives up.
const test = require('node:test');
const assert = require('node:assert/strict');
const { JobVanished, SandboxClient } = require('..');
const { VanishWatch, RESCAN_FIRST_MS } = require('../lib/vanish');
const { needsRedisServer, newId, ownRedis } = require('./helpers');

/** Answers INFO with `runId`, the queue and `unacked` from arrays; counts every call. */
function fakeRedis(taskId) {
  const redis = {
    runId: 'first', queue: [`{"headers":{"id":"${taskId}"}}`, '{"headers":{"id":"other"}}'], unacked: [],
    calls: { info: 0, lrange: 0, hvals: 0 },
    async info() { redis.calls.info += 1; return `# Server\r\nrun_id:${redis.runId}\r\n`; },
    async lrange() { redis.calls.lrange += 1; return redis.queue; },
    async hvals() { redis.calls.hvals += 1; return redis.unacked; },
  };
  return redis;
}

async function setUp() {
  const redis = fakeRedis('task-1');
  const clock = { ms: 1_000_000 };
  const watch = await new VanishWatch(redis, 'job-1', 'task-1', 'sandbox', { now: () => clock.ms }).begin();
  return { redis, clock, watch };
}

test('without a restart the queue is never read', async () => {
  const { redis, watch } = await setUp();
  for (let i = 0; i < 10; i += 1) await watch.check(null);
  assert.equal(redis.calls.lrange + redis.calls.hvals, 0);
});

test('after a restart the queue is read at once, then with backoff, not on every tick', async () => {
  const { redis, clock, watch } = await setUp();
  redis.runId = 'second';
  const scans = [];
  for (let s = 0; s < 4; s += 1) {
    for (let i = 0; i < 4; i += 1) {
      await watch.check(null);
      clock.ms += 250;
    }
    scans.push(redis.calls.lrange);
  }
  assert.deepEqual(scans, [1, 2, 2, 3]); // at once, after 1 s, then 2 s later
  clock.ms += 3_600_000;
  for (let i = 0; i < 20; i += 1) await watch.check(null);
  assert.equal(redis.calls.lrange, 4); // however long it waits, at most one scan per RESCAN_MAX_MS
  redis.runId = 'third';
  await watch.check(null);
  assert.equal(redis.calls.lrange, 5); // another restart is a reason of its own
});

test('a message a restart lost is reported once a second scan confirms it', async () => {
  const { redis, clock, watch } = await setUp();
  redis.queue = [];
  redis.runId = 'second';
  await watch.check(null); // one miss: kombu may be moving it between the queue and unacked
  await watch.check(null);
  assert.equal(redis.calls.lrange, 1);
  clock.ms += RESCAN_FIRST_MS;
  await assert.rejects(watch.check(null), (e) => e instanceof JobVanished && /submit it again/.test(e.message));
});

test('a miss the next scan contradicts is no loss; a record ends the watch', async () => {
  const { redis, clock, watch } = await setUp();
  const [message] = redis.queue;
  redis.queue = [];
  redis.runId = 'second';
  await watch.check(null);
  redis.unacked = [message]; // a worker fetched it
  clock.ms += RESCAN_FIRST_MS;
  await watch.check(null);
  await watch.check({ status: 'running' });
  assert.equal(watch.seen, true);
});

test('a record that disappears is reported at once, with no scan', async () => {
  const { redis, watch } = await setUp();
  await watch.check({ status: 'running' });
  await assert.rejects(watch.check(null), (e) => e instanceof JobVanished && /disappeared/.test(e.message));
  assert.equal(redis.calls.lrange + redis.calls.info, 1); // only begin()'s INFO
});

test('without the submit task id nothing is scanned (there is nothing to look for)', async () => {
  const redis = fakeRedis('task-1');
  const watch = await new VanishWatch(redis, 'job-1', undefined, 'sandbox').begin();
  redis.runId = 'second';
  for (let i = 0; i < 5; i += 1) await watch.check(null);
  assert.equal(redis.calls.lrange + redis.calls.hvals, 0);
});

test('given the submit\'s run, a restart before the wait began is seen', async () => {
  const redis = fakeRedis('task-1');
  const clock = { ms: 1_000_000 };
  redis.queue = []; // submitted on run "first", which restarted and lost it before anyone waited
  redis.runId = 'second';
  const watch = await new VanishWatch(redis, 'job-1', 'task-1', 'sandbox', { now: () => clock.ms, runId: 'first' }).begin();
  assert.equal(redis.calls.info, 0); // begin() keeps the submit's run
  await watch.check(null);
  clock.ms += RESCAN_FIRST_MS;
  await assert.rejects(watch.check(null), (e) => e instanceof JobVanished && /submit it again/.test(e.message));
});

test('a real Redis that restarts without its data between submit and wait: the wait rejects with JobVanished', needsRedisServer(), async (t) => {
  const server = await ownRedis();
  // a queue nobody consumes: the job stays a message until the restart loses it
  const client = new SandboxClient({ redis: server.url, queue: newId('q'), blockMs: 100 });
  t.after(async () => {
    client.redis.disconnect();
    await server.stop();
  });
  const handle = await client.submit({ command: 'ls' });
  assert.match(handle.runId, /^[0-9a-f]{40}$/);
  await server.restart();
  assert.equal(await client.redis.llen(client.queue), 0); // the message is gone with the data
  await assert.rejects(client.wait(handle.jobId, { taskId: handle.taskId, runId: handle.runId, timeoutMs: 15_000 }),
    (e) => e instanceof JobVanished && /submit it again/.test(e.message));
});
