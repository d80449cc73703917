'use strict';
// A stock producer: npm celery-node with its default settings (queue "celery", protocol 2, JSON),
// as a Node.js service that knows nothing of this project would call sandbox.submit.
const celery = require('celery-node');

async function main() {
  const [url, job] = process.argv.slice(2);
  const client = celery.createClient(url, url);
  const result = client.createTask('sandbox.submit').applyAsync([job]);
  const record = await result.get(90_000);
  process.stdout.write(JSON.stringify(record));
  client.disconnect();
}

main().catch((e) => {
  process.stderr.write(`${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
