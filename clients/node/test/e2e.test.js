'use strict';
// The whole path from Node: a real worker, real Redis, real sandbox (started by the pytest
// harness, tests/e2e/test_node_client.py, which sets SANDBOX_E2E=1 and REDIS_URL).
const test = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const { SandboxClient, JobRejected, verifyWebhook, signWebhook } = require('..');
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

  await t.test('a job past the service\'s document size limit comes back rejected too_large', async () => {
    // 3 MiB of content (under the 10 MiB inline cap) that is 18 MiB as JSON text, past the
    // service's ~15 MiB document limit: the limit applies because the job is sent as text. Sent
    // as an object it was decoded by kombu before the service saw it, and it ran.
    const content = '\u0001'.repeat(3 * 2 ** 20);
    const record = await client.run({ id: newId('big'), command: 'ls', files: [{ path: 'a.txt', content }] },
      { timeoutMs: 120_000 });
    assert.equal(record.status, 'rejected', JSON.stringify({ ...record, spec: undefined }).slice(0, 2000));
    assert.equal(record.error.rule, 'too_large');
  });

  await t.test('a job the schema refuses is never sent', async () => {
    const jobId = newId('never');
    await assert.rejects(client.submit({ id: jobId, command: 'ls', countdown: 5 }), JobRejected);
    assert.equal(await client.getRecord(jobId), null);
  });

  const secret = process.env.SANDBOX_WEBHOOK_SECRET;
  await t.test('a Node receiver verifies the signed terminal record, after failing the first delivery', { skip: !secret && 'the worker has no SANDBOX_WEBHOOK_SECRET' }, async () => {
    const accepted = new Map();
    const refused = [];
    let requests = 0;
    const server = http.createServer((req, res) => {
      const chunks = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => {
        requests += 1;
        if (requests === 1) { res.writeHead(500).end(); return; } // the first delivery fails
        try {
          const { envelope } = verifyWebhook({ secret, header: req.headers['x-sandbox-signature'], body: Buffer.concat(chunks) });
          if (accepted.has(envelope.delivery_id)) { refused.push('duplicate'); res.writeHead(200).end(); return; }
          accepted.set(envelope.delivery_id, envelope);
          res.writeHead(204).end();
        } catch (e) {
          refused.push(e.message);
          res.writeHead(401).end();
        }
      });
    });
    await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
    try {
      const url = `http://127.0.0.1:${server.address().port}/hook`;
      const record = await client.run({ id: newId('hook'), command: 'ls', callback_url: url }, { timeoutMs: 120_000 });
      assert.equal(record.status, 'succeeded', JSON.stringify(record));
      const deadline = Date.now() + 90_000;
      while (accepted.size === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      const [envelope] = accepted.values();
      assert.ok(envelope, `no verified delivery; refused: ${refused}`);
      assert.equal(envelope.event, 'job.terminal');
      assert.equal(envelope.data.id, record.id);
      assert.equal(envelope.data.status, 'succeeded');
      // A forged delivery to the same receiver is refused.
      const body = JSON.stringify({ ...envelope, delivery_id: 'forged' });
      const t0 = Math.floor(Date.now() / 1000);
      const forged = await fetch(url, { method: 'POST', body, headers: { 'X-Sandbox-Signature': `t=${t0},v1=${signWebhook('guess', t0, body)}` } });
      assert.equal(forged.status, 401);
      assert.equal(accepted.size, 1);
      // The delivery log lands in the record: one id, first attempt 500, then accepted.
      let log = [];
      while (Date.now() < deadline) {
        log = (await client.getRecord(record.id)).webhook_deliveries;
        if (log.length >= 2) break;
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.deepEqual(log.map((d) => d.status_code), [500, 204]);
      assert.equal(new Set(log.map((d) => d.delivery_id)).size, 1);
      assert.equal(log[0].delivery_id, envelope.delivery_id);
    } finally {
      server.close();
    }
  });
});
