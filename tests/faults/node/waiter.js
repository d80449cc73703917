'use strict';
// The project's own client waiting for a job: prints how the wait ended as one JSON line.
const { SandboxClient } = require('../../../clients/node');

async function main() {
  const [url, jobId, taskId] = process.argv.slice(2);
  const client = new SandboxClient({ redis: url, blockMs: 200 });
  try {
    const record = await client.wait(jobId, { taskId, timeoutMs: 120_000 });
    process.stdout.write(JSON.stringify({ ended: record.status }));
  } catch (e) {
    process.stdout.write(JSON.stringify({ error: e.name, message: e.message }));
  } finally {
    client.redis.disconnect();
  }
}

main();
