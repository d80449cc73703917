'use strict';
/**
 * Celery protocol v2 messages for the kombu Redis transport, built by hand.
 * The layout is what Celery 5.7's own Python client LPUSHes (checked against kombu 5.7).
 */
const { randomUUID } = require('node:crypto');
const os = require('node:os');

/** The Redis list kombu reads for queue `sandbox` at priority 0. */
const QUEUE = 'sandbox';

/**
 * One task message; returns { taskId, queue, raw } where raw is the string to LPUSH.
 * Options may fix taskId, replyTo, deliveryTag, origin, sentAt (unix s; used by tests to compare bytes).
 */
function buildTaskMessage(task, args, options = {}) {
  if (typeof task !== 'string' || !task) throw new TypeError('task name required');
  if (!Array.isArray(args)) throw new TypeError('args must be an array');
  const taskId = options.taskId || randomUUID();
  const queue = options.queue || QUEUE;
  // [args, kwargs, embed]: no callbacks, no chain; the worker builds the canvas itself.
  const body = JSON.stringify([args, {}, { callbacks: null, errbacks: null, chain: null, chord: null }]);
  const message = {
    body: Buffer.from(body, 'utf8').toString('base64'),
    'content-encoding': 'utf-8',
    'content-type': 'application/json',
    headers: {
      lang: 'py',
      task,
      id: taskId,
      shadow: null,
      eta: null,
      expires: null,
      group: null,
      group_index: null,
      retries: 0,
      timelimit: [null, null],
      root_id: taskId,
      parent_id: null,
      // Kept short: these show in Flower and worker logs, and a job may be large or secret.
      argsrepr: `<${args.length} args>`,
      kwargsrepr: '{}',
      origin: options.origin || `node-${process.pid}@${os.hostname()}`,
      ignore_result: false,
      replaced_task_nesting: 0,
      stamped_headers: null,
      stamps: {},
      // Enqueue time (unix seconds): kombu keeps none, and the workers' queue-age gauge and
      // `python -m sandbox health` read this header (docs/operations.md).
      sandbox_sent_at: options.sentAt ?? Date.now() / 1000,
    },
    properties: {
      correlation_id: taskId,
      reply_to: options.replyTo || randomUUID(),
      delivery_mode: 2,
      // The anonymous exchange routes straight to the list named by routing_key, so a restore
      // after a lost worker needs no binding table (Celery's Python client sends the same).
      delivery_info: { exchange: '', routing_key: queue },
      priority: 0,
      body_encoding: 'base64',
      delivery_tag: options.deliveryTag || randomUUID(),
    },
  };
  return { taskId, queue, raw: JSON.stringify(message) };
}

module.exports = { buildTaskMessage, QUEUE };
