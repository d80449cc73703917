'use strict';
// Against a real Redis: enqueueing, following streams written in the service's layout, waiting.
const test = require('node:test');
const assert = require('node:assert/strict');
const Redis = require('ioredis');
const { SandboxClient, TaskFailed, JobRejected } = require('..');
const { needs, newId } = require('./helpers');

const opts = needs('REDIS_URL');

test('redis-backed client', opts, async (t) => {
  const redis = new Redis(process.env.REDIS_URL);
  // A private queue: the harness's worker consumes "sandbox" and must not see these messages.
  const queue = newId('q');
  const client = new SandboxClient({ redis, queue, blockMs: 100 });
  t.after(async () => {
    await redis.del(queue);
    await client.close();
    await redis.quit();
  });

  // The service's own layout: sandbox.events.EventBus writes exactly these fields.
  let seq = 0;
  const log = (id, stream, line) => redis.xadd(`sandbox:job:${id}:logs`, '*', 'stream', stream, 'seq', String(++seq), 'ts', String(Date.now() / 1000), 'line', line);
  const event = (id, status) => redis.xadd(`sandbox:job:${id}:events`, '*', 'event', JSON.stringify({ seq: ++seq, type: 'status', status, at: Date.now() / 1000, job_id: id }));
  const record = (id, status) => redis.set(`sandbox:job:${id}`, JSON.stringify({ id, status, exit_code: status === 'succeeded' ? 0 : null }));

  await t.test('submit validates, gives the job an id and LPUSHes one message', async () => {
    const { jobId, taskId, runId } = await client.submit({ command: 'ls' });
    assert.match(jobId, /^[A-Za-z0-9_-]{1,64}$/);
    assert.equal(runId, /^run_id:(\S+)/m.exec(await redis.info('server'))[1]); // the run it was sent to
    const raw = await redis.rpop(queue);
    const message = JSON.parse(raw);
    assert.equal(message.headers.id, taskId);
    const [[job]] = JSON.parse(Buffer.from(message.body, 'base64').toString());
    // JSON text, not an object: the worker's strict loader reads it (duplicate keys, size limit)
    assert.equal(typeof job, 'string');
    assert.deepEqual(JSON.parse(job), { command: 'ls', id: jobId });
  });

  await t.test('an invalid job is refused before anything is sent', async () => {
    await assert.rejects(client.submit({ command: 'ls', eta: 5 }), JobRejected);
    assert.equal(await redis.llen(queue), 0);
  });

  await t.test('a late follower gets every line from the start and stops at the terminal status', async () => {
    const id = newId();
    await event(id, 'running');
    await log(id, 'stdout', 'one');
    await log(id, 'stderr', 'two');
    await event(id, 'succeeded');
    const items = [];
    for await (const item of client.follow(id)) items.push(item.kind === 'log' ? item.line : item.status);
    // Logs and events are two streams: order holds within each, and nothing is lost or repeated.
    assert.deepEqual(items.filter((x) => ['one', 'two'].includes(x)), ['one', 'two']);
    assert.deepEqual(items.filter((x) => ['running', 'succeeded'].includes(x)), ['running', 'succeeded']);
    assert.equal(items.length, 4);
  });

  await t.test('a reconnecting follower resumes after the last id it saw', async () => {
    const id = newId();
    await log(id, 'stdout', 'a');
    await log(id, 'stdout', 'b');
    await log(id, 'stdout', 'c');
    let lastId;
    for await (const entry of client.followLogs(id)) {
      lastId = entry.id;
      if (entry.line === 'b') break;
    }
    await event(id, 'failed');
    const rest = [];
    for await (const entry of client.followLogs(id, { logId: lastId })) rest.push(entry.line);
    assert.deepEqual(rest, ['c']);
  });

  await t.test('lines written while following arrive live, in order', async () => {
    const id = newId();
    const seen = [];
    const following = (async () => {
      for await (const entry of client.followLogs(id)) seen.push(entry.line);
    })();
    for (let i = 0; i < 5; i += 1) {
      await log(id, 'stdout', `tick ${i}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    await event(id, 'cancelled');
    await following;
    assert.deepEqual(seen, ['tick 0', 'tick 1', 'tick 2', 'tick 3', 'tick 4']);
  });

  await t.test('a terminal record ends the follow even when the events stream has expired', async () => {
    const id = newId();
    await log(id, 'stdout', 'only');
    await record(id, 'timed_out');
    const lines = [];
    for await (const entry of client.followLogs(id)) lines.push(entry.line);
    assert.deepEqual(lines, ['only']);
  });

  await t.test('aborting a follow ends it promptly', async () => {
    const id = newId();
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 50);
    const items = [];
    for await (const item of client.follow(id, { signal: controller.signal, blockMs: 10_000 })) items.push(item);
    assert.deepEqual(items, []);
  });

  await t.test('a log line that looks like an event stays a log line', async () => {
    const id = newId();
    const forged = JSON.stringify({ type: 'status', status: 'succeeded', job_id: id });
    await log(id, 'stdout', forged);
    await event(id, 'failed');
    const items = [];
    for await (const item of client.follow(id)) items.push([item.kind, item.line ?? item.status]);
    assert.deepEqual(items.filter(([k]) => k === 'event'), [['event', 'failed']]);
    assert.deepEqual(items.filter(([k]) => k === 'log'), [['log', forged]]);
  });

  await t.test('wait returns the record after the terminal status and reports progress', async () => {
    const id = newId();
    await record(id, 'succeeded');
    await log(id, 'stdout', 'hello');
    await event(id, 'succeeded');
    const logs = [];
    const got = await client.wait(id, { onLog: (e) => logs.push(e.line) });
    assert.equal(got.status, 'succeeded');
    assert.deepEqual(logs, ['hello']);
  });

  await t.test('wait rejects when the submit task failed on the worker', async () => {
    const id = newId();
    const taskId = newId('task');
    await redis.set(`celery-task-meta-${taskId}`, JSON.stringify({ status: 'FAILURE', result: { exc_type: 'KeyError', exc_message: ['x'] }, task_id: taskId }));
    await assert.rejects(client.wait(id, { taskId, timeoutMs: 10_000 }), TaskFailed);
  });

  await t.test('waiting reads the record once per idle tick and scans the queue only after a restart', async () => {
    const { jobId, taskId } = await client.submit({ command: 'ls' }); // nobody consumes the private queue
    const calls = { record: 0, result: 0, lrange: 0, info: 0 };
    const real = { get: redis.get, lrange: redis.lrange, info: redis.info };
    redis.get = function get(key, ...rest) {
      if (key === `sandbox:job:${jobId}`) calls.record += 1;
      if (key === `celery-task-meta-${taskId}`) calls.result += 1;
      return real.get.call(this, key, ...rest);
    };
    redis.lrange = function lrange(...args) {
      calls.lrange += 1;
      return real.lrange.apply(this, args);
    };
    redis.info = async function info(...args) { // from the first tick on, Redis "restarted" (its run_id changed)
      calls.info += 1;
      const text = await real.info.apply(this, args);
      return calls.info > 1 ? text.replace(/^run_id:\S+/m, 'run_id:restarted') : text;
    };
    try {
      await assert.rejects(client.wait(jobId, { taskId, timeoutMs: 2500 }), { name: 'TimeoutError' });
    } finally {
      for (const name of Object.keys(real)) delete redis[name];
    }
    assert.ok(calls.result >= 3, JSON.stringify(calls)); // idle ticks happened (one task result read each)
    assert.equal(calls.record, calls.result, JSON.stringify(calls)); // the record too, once per tick
    // the message is still queued: found at once after the restart, then again only after 1 s
    assert.ok(calls.lrange >= 1 && calls.lrange <= 2, JSON.stringify(calls));
    await redis.del(queue);
  });

  await t.test('wait gives up after its timeout', async () => {
    await assert.rejects(client.wait(newId(), { timeoutMs: 150 }), { name: 'TimeoutError' });
  });

  await t.test('waitForTask returns a successful result', async () => {
    const taskId = newId('task');
    setTimeout(() => redis.set(`celery-task-meta-${taskId}`, JSON.stringify({ status: 'SUCCESS', result: { ok: 1 } })), 30);
    assert.deepEqual(await client.waitForTask(taskId, { timeoutMs: 5000 }), { ok: 1 });
  });
});
