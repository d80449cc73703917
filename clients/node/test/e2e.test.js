'use strict';
// The whole path from Node: a real worker, real Redis, real sandbox (started by the pytest
// harness, tests/e2e/test_node_client.py, which sets SANDBOX_E2E=1 and REDIS_URL).
const test = require('node:test');
const assert = require('node:assert/strict');
const { SandboxClient, JobRejected } = require('..');
const { newId } = require('./helpers');

const opts = process.env.SANDBOX_E2E === '1' && process.env.REDIS_URL
  ? { timeout: 240_000 } : { skip: 'SANDBOX_E2E=1 and REDIS_URL are set by tests/e2e/test_node_client.py' };

test('end to end through the worker', opts, async (t) => {
  const client = new SandboxClient({ redis: process.env.REDIS_URL, blockMs: 200 });
  t.after(() => client.close());

  await t.test('a job runs, its lines arrive in order, escaped, and its final record arrives', async () => {
    const script = 'import sys; print("one", flush=True); print("\\x1b[31mred", file=sys.stderr, flush=True); print("two")';
    const lines = [];
    const statuses = [];
    const record = await client.run({ id: newId('ok'), command: `python3 -c '${script}'`, timeout: 60 }, {
      timeoutMs: 120_000,
      onLog: (e) => lines.push(e),
      onEvent: (e) => statuses.push(e.status),
    });
    assert.equal(record.status, 'succeeded', JSON.stringify(record));
    assert.equal(record.exit_code, 0);
    assert.deepEqual(lines.filter((e) => e.stream === 'stdout').map((e) => e.line), ['one', 'two']);
    assert.deepEqual(lines.filter((e) => e.stream === 'stderr').map((e) => e.line), ['\\x1b[31mred']);
    const seqs = lines.map((e) => e.seq);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
    assert.equal(statuses.at(-1), 'succeeded');
    assert.ok(statuses.includes('running'));
  });

  await t.test('a long job\'s lines arrive while it runs, and cancelling it kills it', async () => {
    const jobId = newId('long');
    const script = 'import time; print("started", flush=True); time.sleep(120); print("never")';
    const { taskId } = await client.submit({ id: jobId, command: `python3 -c '${script}'`, timeout: 300 });
    let statusAtFirstLine = null;
    const seen = [];
    for await (const entry of client.followLogs(jobId)) {
      seen.push(entry.line);
      if (statusAtFirstLine === null) {
        // The job sleeps for two minutes after this line: it must still be running now.
        statusAtFirstLine = (await client.getRecord(jobId)).status;
        const answer = await client.cancel(jobId);
        assert.equal(answer.cancelled, true, JSON.stringify(answer));
        assert.equal(answer.job_id, jobId);
      }
    }
    assert.equal(statusAtFirstLine, 'running');
    assert.deepEqual(seen, ['started']);
    const record = await client.wait(jobId, { taskId, timeoutMs: 60_000 });
    assert.equal(record.status, 'cancelled');
    assert.ok(record.timeline.some((s) => s.status === 'running'));

    const again = await client.cancel(jobId);
    assert.equal(again.cancelled, false);
    assert.equal(again.status, 'cancelled');
    assert.match(again.message, /already|nothing/);
  });

  await t.test('a job the policy refuses comes back rejected, naming the field', async () => {
    const record = await client.run({ id: newId('bad'), command: 'rm -rf /' }, { timeoutMs: 60_000 });
    assert.equal(record.status, 'rejected');
    assert.equal(record.error.field, '/command');
  });

  await t.test('a job the schema refuses is never sent', async () => {
    const jobId = newId('never');
    await assert.rejects(client.submit({ id: jobId, command: 'ls', countdown: 5 }), JobRejected);
    assert.equal(await client.getRecord(jobId), null);
  });
});
