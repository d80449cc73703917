'use strict';
/** The sandbox service's Node.js client. */
const { SandboxClient, TaskFailed, TimeoutError, JobVanished, TERMINAL } = require('./lib/client');
const { buildTaskMessage, QUEUE } = require('./lib/message');
const { validateJob, JobRejected, schemaPath } = require('./lib/schema');
const { signWebhook, verifyWebhook, WebhookVerificationError } = require('./lib/webhook');
const { fetchObject } = require('./lib/objects');

module.exports = {
  SandboxClient,
  TaskFailed,
  TimeoutError,
  JobVanished,
  TERMINAL_STATUSES: TERMINAL,
  buildTaskMessage,
  QUEUE,
  validateJob,
  JobRejected,
  schemaPath,
  signWebhook,
  verifyWebhook,
  WebhookVerificationError,
  fetchObject,
};
