'use strict';
// Message building, schema validation and webhook verification: no services needed.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const {
  buildTaskMessage, validateJob, JobRejected, schemaPath, signWebhook, verifyWebhook, WebhookVerificationError,
} = require('..');

test('a task message has the protocol v2 fields Celery needs, body base64 [args, kwargs, embed]', () => {
  const job = { id: 'job-1', command: 'ls -l' };
  const { taskId, queue, raw } = buildTaskMessage('sandbox.submit', [job]);
  const message = JSON.parse(raw);
  assert.equal(queue, 'sandbox');
  assert.equal(message['content-type'], 'application/json');
  assert.equal(message['content-encoding'], 'utf-8');
  assert.equal(message.headers.task, 'sandbox.submit');
  assert.equal(message.headers.id, taskId);
  assert.equal(message.headers.root_id, taskId);
  assert.equal(message.properties.body_encoding, 'base64');
  assert.deepEqual(message.properties.delivery_info, { exchange: '', routing_key: 'sandbox' });
  assert.match(message.properties.delivery_tag, /^[0-9a-f-]{36}$/);
  assert.equal(message.properties.correlation_id, taskId);
  const body = JSON.parse(Buffer.from(message.body, 'base64').toString('utf8'));
  assert.deepEqual(body, [[job], {}, { callbacks: null, errbacks: null, chain: null, chord: null }]);
  // The job's content never lands in the headers that Flower and logs show.
  assert.ok(!JSON.stringify(message.headers).includes('ls -l'));
  // Enqueue time for the queue-age gauge and health check.
  assert.ok(Math.abs(message.headers.sandbox_sent_at - Date.now() / 1000) < 60);
});

test('every message gets its own task id and delivery tag', () => {
  const a = JSON.parse(buildTaskMessage('sandbox.cancel', ['j']).raw);
  const b = JSON.parse(buildTaskMessage('sandbox.cancel', ['j']).raw);
  assert.notEqual(a.headers.id, b.headers.id);
  assert.notEqual(a.properties.delivery_tag, b.properties.delivery_tag);
});

test('the schema validated is the service\'s own file', () => {
  const original = path.resolve(__dirname, '..', '..', '..', 'sandbox', 'schema', 'job.schema.json');
  assert.equal(fs.readFileSync(schemaPath(), 'utf8'), fs.readFileSync(original, 'utf8'));
});

test('a valid job passes validation unchanged', () => {
  const job = {
    id: 'a_b-1', command: 'ls -la', environment: { LANG: 'C' }, timeout: 5,
    resources: { cpu: '0.5', memory: '64Mi', disk: '16Mi' },
    files: [{ path: 'input/a.txt', content: 'hi' }],
  };
  assert.equal(validateJob(job), job);
});

const BAD = [
  [{ command: 'ls', queue: 'priority' }, '/queue', 'unknown_field'],
  [{ command: 'ls', headers: {} }, '/headers', 'unknown_field'],
  [{}, '/command', 'required'],
  [{ command: 'ls', timeout: Number.NaN }, '/timeout', 'not_finite'],
  [{ command: 'ls', timeout: Infinity }, '/timeout', 'not_finite'],
  [{ command: 'ls', timeout: true }, '/timeout', 'type'],
  [{ command: 'ls', id: 'a:b' }, '/id', 'pattern'],
  [{ command: 'ls', id: undefined }, '/id', 'not_json'],
  [{ command: 'ls', resources: { memory: 512 } }, '/resources/memory', 'type'],
  [{ command: 'ls', environment: { PATH: 1 } }, '/environment/PATH', 'type'],
  [{ command: 'ls', created: new Date() }, '/created', 'not_json'],
];
for (const [job, field, rule] of BAD) {
  test(`validation refuses ${JSON.stringify(job)} at ${field} (${rule})`, () => {
    assert.throws(() => validateJob(job), (e) => e instanceof JobRejected && e.field === field && e.rule === rule);
  });
}

test('non-objects are refused', () => {
  for (const job of [null, [], 'ls', 3]) assert.throws(() => validateJob(job), JobRejected);
});

const SECRET = 'shared-secret';
const BODY = '{"data":{"id":"j"},"delivery_id":"d","event":"job.terminal"}';
// Computed by sandbox.webhooks.sign in Python: both sides must agree byte for byte.
const PY_SIGNATURE = 'ac084daa96098365fb48f563fce04e407906011edc4f2c380a1fb5b394b68853';

test('Node and Python compute the same signature', () => {
  assert.equal(signWebhook(SECRET, 1700000000, BODY), PY_SIGNATURE);
  assert.equal(signWebhook(SECRET, 1700000000, Buffer.from(BODY)), PY_SIGNATURE);
});

test('a genuine, fresh delivery verifies and yields the envelope', () => {
  const header = `t=1700000000,v1=${PY_SIGNATURE}`;
  const { timestamp, envelope } = verifyWebhook({ secret: SECRET, header, body: Buffer.from(BODY), now: 1700000100 });
  assert.equal(timestamp, 1700000000);
  assert.deepEqual(envelope, { data: { id: 'j' }, delivery_id: 'd', event: 'job.terminal' });
});

const REFUSED = [
  ['forged with another secret', `t=1700000000,v1=${signWebhook('guess', 1700000000, BODY)}`, BODY, 1700000000],
  ['tampered body', `t=1700000000,v1=${PY_SIGNATURE}`, BODY.replace('"j"', '"k"'), 1700000000],
  ['replayed after the window', `t=1700000000,v1=${PY_SIGNATURE}`, BODY, 1700000000 + 301],
  ['timestamp moved', `t=1700000001,v1=${PY_SIGNATURE}`, BODY, 1700000001],
  ['two timestamps', `t=1700000000,t=1,v1=${PY_SIGNATURE}`, BODY, 1700000000],
  ['short signature', 't=1700000000,v1=abcd', BODY, 1700000000],
  ['no header', undefined, BODY, 1700000000],
];
for (const [name, header, body, now] of REFUSED) {
  test(`verification refuses: ${name}`, () => {
    assert.throws(() => verifyWebhook({ secret: SECRET, header, body, now }), WebhookVerificationError);
  });
}

test('fetchObject: an empty log (size 0, url null) reads as empty; a stored one is fetched; a failed GET throws', async () => {
  const http = require('node:http');
  const { fetchObject } = require('..');
  assert.deepEqual(await fetchObject({ key: 'jobs/j/logs/stderr.log', size: 0, url: null }), Buffer.alloc(0));
  await assert.rejects(fetchObject({ key: 'jobs/j/output/a', size: 3, url: null }), /no URL/);
  const server = http.createServer((req, res) => {
    if (req.url.startsWith('/ok')) res.end('out\n');
    else { res.statusCode = 403; res.end('expired'); }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const base = `http://127.0.0.1:${server.address().port}`;
  try {
    assert.equal((await fetchObject({ key: 'k', size: 4, url: `${base}/ok?sig` })).toString(), 'out\n');
    await assert.rejects(fetchObject({ key: 'k', size: 4, url: `${base}/no` }), /HTTP 403/);
  } finally {
    server.close();
  }
});
