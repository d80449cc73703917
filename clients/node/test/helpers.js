'use strict';
// REDIS_URL comes from the Python harness (tests/e2e/test_node_client.py) or from the shell.
const { randomUUID } = require('node:crypto');
const { spawn, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

/** node:test options: skip without Redis locally, but fail under CI, where Redis must be there. */
function needs(variable) {
  if (process.env[variable]) return {};
  if (process.env.CI === 'true') throw new Error(`${variable} is not set, and CI=true requires it`);
  return { skip: `${variable} is not set` };
}

const newId = (prefix = 'n') => `${prefix}-${randomUUID().replace(/-/g, '').slice(0, 16)}`;

/** node:test options for a test that starts its own `redis-server`: skip without it locally, fail under CI. */
function needsRedisServer() {
  if (spawnSync('redis-server', ['--version']).status === 0) return {};
  if (process.env.CI === 'true') throw new Error('redis-server is not installed, and CI=true requires it');
  return { skip: 'redis-server is not installed' };
}

const freePort = () => new Promise((resolve, reject) => {
  const server = net.createServer().once('error', reject).listen(0, '127.0.0.1', () => {
    const { port } = server.address();
    server.close(() => resolve(port));
  });
});

const listening = (port) => new Promise((resolve) => {
  const socket = net.connect(port, '127.0.0.1').once('connect', () => { socket.destroy(); resolve(true); })
    .once('error', () => resolve(false));
});

/**
 * A redis-server of the test's own, without persistence (what a Redis without AOF is): restart()
 * brings it back on the same port with every key gone. stop() when done. With `{started: false}`
 * nothing listens on its port (its url refuses connections) until start().
 */
async function ownRedis({ started = true } = {}) {
  const port = await freePort();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sandbox-client-redis-'));
  let proc = null;
  const start = async () => {
    proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
      '--dir', dir], { stdio: 'ignore' });
    const deadline = Date.now() + 10_000;
    while (!(await listening(port))) {
      if (Date.now() > deadline) throw new Error(`redis-server did not start on port ${port}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  };
  const stop = async () => {
    if (!proc || proc.exitCode !== null) return;
    const exited = new Promise((resolve) => proc.once('exit', resolve));
    proc.kill('SIGTERM');
    await exited;
  };
  if (started) await start();
  return {
    url: `redis://127.0.0.1:${port}/0`,
    start,
    restart: async () => { await stop(); await start(); },
    stop: async () => { await stop(); fs.rmSync(dir, { recursive: true, force: true }); },
  };
}

module.exports = { needs, needsRedisServer, newId, ownRedis, freePort };
