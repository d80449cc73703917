'use strict';
// wait() and follow() while Redis is down: only the wait's timeout (or its signal) ends it, on time,
// whatever Redis does; and a wait begun while Redis is down still completes once Redis is back.
const test = require('node:test');
const assert = require('node:assert/strict');
const Redis = require('ioredis');
const { SandboxClient } = require('..');
const { needsRedisServer, newId, ownRedis, freePort } = require('./helpers');

const PENDING = Symbol('pending');
// A hang is the failure, not slowness: the bound is generous.
const MARGIN_MS = 5000;

/** What `promise` settled to within `ms` ({value} or {error}), or PENDING. */
async function within(promise, ms) {
  let timer;
  const late = new Promise((resolve) => { timer = setTimeout(() => resolve(PENDING), ms); });
  try {
    return await Promise.race([promise.then((value) => ({ value }), (error) => ({ error })), late]);
  } finally {
    clearTimeout(timer);
  }
}

/** A client of a Redis that refuses connections (nothing listens on `port`). */
function deadClient(t, port) {
  const client = new SandboxClient({ redis: `redis://127.0.0.1:${port}/0`, blockMs: 100 });
  client.redis.on('error', () => {}); // ECONNREFUSED on every reconnect: expected here
  t.after(() => client.redis.disconnect());
  return client;
}

test('with nothing listening, every wait rejects with its TimeoutError, whenever its timeout falls', async (t) => {
  const port = await freePort();
  // Timeouts spread over the reconnect cycle: the timeout must win whatever the connection is doing
  // (connecting, reconnecting, a command queued offline, the pause between retries).
  const timeouts = [300, 550, 800, 1100, 1400, 1750, 2100, 2600, 3200, 4000];
  const outcomes = await Promise.all(timeouts.map(async (timeoutMs) => {
    const outcome = await within(deadClient(t, port).wait(newId(), { timeoutMs }), timeoutMs + MARGIN_MS);
    return { timeoutMs, outcome: outcome === PENDING ? 'still pending' : outcome.error?.name ?? 'resolved' };
  }));
  assert.deepEqual(outcomes, timeouts.map((timeoutMs) => ({ timeoutMs, outcome: 'TimeoutError' })));
});

test('with nothing listening, a wait rejects with its signal\'s reason and a follow ends when aborted', async (t) => {
  const port = await freePort();
  const delays = [200, 450, 700, 1000, 1300, 1700];
  const outcomes = await Promise.all(delays.map(async (ms) => {
    const reason = new Error(`stopped after ${ms} ms`);
    const waitOutcome = within(deadClient(t, port).wait(newId(), { signal: abortAfter(ms, reason) }), ms + MARGIN_MS);
    const followSignal = abortAfter(ms, reason);
    const follow = (async () => {
      const items = [];
      for await (const item of deadClient(t, port).follow(newId(), { signal: followSignal })) items.push(item);
      return items;
    })();
    const [waited, followed] = await Promise.all([waitOutcome, within(follow, ms + MARGIN_MS)]);
    return {
      ms,
      wait: waited === PENDING ? 'still pending' : waited.error === reason ? 'rejected with the reason' : String(waited.error ?? 'resolved'),
      follow: followed === PENDING ? 'still pending' : followed.error ? String(followed.error) : `ended with ${followed.value.length} items`,
    };
  }));
  assert.deepEqual(outcomes, delays.map((ms) => ({ ms, wait: 'rejected with the reason', follow: 'ended with 0 items' })));
});

/** A signal that aborts with `reason` after `ms`. */
function abortAfter(ms, reason) {
  const controller = new AbortController();
  setTimeout(() => controller.abort(reason), ms);
  return controller.signal;
}

test('a wait begun while Redis is down completes once Redis is back and the job ends', needsRedisServer(), async (t) => {
  const server = await ownRedis({ started: false });
  t.after(() => server.stop());
  const client = new SandboxClient({ redis: server.url, blockMs: 100 });
  client.redis.on('error', () => {});
  t.after(() => client.redis.disconnect());
  const id = newId();
  const lines = [];
  const waiting = client.wait(id, { timeoutMs: 60_000, onLog: (entry) => lines.push(entry.line) });

  await new Promise((resolve) => setTimeout(resolve, 1500)); // several failed reconnects first
  await server.start();
  const writer = new Redis(server.url);
  t.after(() => writer.disconnect());
  await writer.xadd(`sandbox:job:${id}:logs`, '*', 'stream', 'stdout', 'seq', '1', 'ts', String(Date.now() / 1000), 'line', 'hello');
  await writer.set(`sandbox:job:${id}`, JSON.stringify({ id, status: 'succeeded', exit_code: 0 }));
  await writer.xadd(`sandbox:job:${id}:events`, '*', 'event', JSON.stringify({ seq: 2, type: 'status', status: 'succeeded', at: Date.now() / 1000, job_id: id }));

  const outcome = await within(waiting, 30_000);
  assert.notEqual(outcome, PENDING, 'the wait never settled after Redis came back');
  assert.ifError(outcome.error);
  assert.deepEqual(outcome.value, { id, status: 'succeeded', exit_code: 0 });
  assert.deepEqual(lines, ['hello']);
});
