'use strict';
// Copies the service's job schema into the package so a packed tarball is self-contained.
const fs = require('node:fs');
const path = require('node:path');

const source = path.join(__dirname, '..', '..', '..', 'sandbox', 'schema', 'job.schema.json');
const target = path.join(__dirname, '..', 'schema', 'job.schema.json');
fs.mkdirSync(path.dirname(target), { recursive: true });
fs.copyFileSync(source, target);
console.log(`copied ${source} -> ${target}`);
