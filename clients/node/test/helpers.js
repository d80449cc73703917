'use strict';
// REDIS_URL comes from the Python harness (tests/e2e/test_node_client.py) or from the shell.
const { randomUUID } = require('node:crypto');

/** node:test options: skip without Redis locally, but fail under CI, where Redis must be there. */
function needs(variable) {
  if (process.env[variable]) return {};
  if (process.env.CI === 'true') throw new Error(`${variable} is not set, and CI=true requires it`);
  return { skip: `${variable} is not set` };
}

const newId = (prefix = 'n') => `${prefix}-${randomUUID().replace(/-/g, '').slice(0, 16)}`;

module.exports = { needs, newId };
