'use strict';
/** Validation of a job against sandbox/schema/job.schema.json, with ajv (draft 2020-12). */
const fs = require('node:fs');
const path = require('node:path');
const Ajv2020 = require('ajv/dist/2020');

// The repository's original first (a stale packed copy must never shadow it), then the copy
// that npm pack puts into the package (scripts/sync-schema.js).
const CANDIDATES = [
  path.join(__dirname, '..', '..', '..', 'sandbox', 'schema', 'job.schema.json'),
  path.join(__dirname, '..', 'schema', 'job.schema.json'),
];

/** A job refused before it was sent; same shape as the service's `error` of a rejected job. */
class JobRejected extends Error {
  constructor(field, rule, message) {
    super(`${field || '/'}: ${message} [${rule}]`);
    this.name = 'JobRejected';
    this.code = 'rejected';
    this.field = field;
    this.rule = rule;
    this.detail = message;
  }

  toJSON() {
    return { code: 'rejected', field: this.field, rule: this.rule, message: this.detail };
  }
}

let compiled = null;

function schemaPath() {
  const found = CANDIDATES.find((p) => fs.existsSync(p));
  if (!found) throw new Error(`job.schema.json not found in ${CANDIDATES.join(', ')}`);
  return found;
}

function validator() {
  if (!compiled) {
    // strictSchema refuses unknown keywords (a typo must not silently validate nothing); the
    // other strict checks flag idioms of a portable schema, such as required inside oneOf.
    const ajv = new Ajv2020({ strictSchema: true, strictRequired: false, strictTypes: false, strictTuples: false });
    compiled = ajv.compile(JSON.parse(fs.readFileSync(schemaPath(), 'utf8')));
  }
  return compiled;
}

// JSON.stringify would turn NaN/Infinity into null and drop undefined: refuse them outright.
function checkJsonValues(value, pointer) {
  if (typeof value === 'number' && !Number.isFinite(value)) {
    throw new JobRejected(pointer, 'not_finite', 'numbers must be finite');
  }
  if (value === undefined || typeof value === 'function' || typeof value === 'bigint' || typeof value === 'symbol') {
    throw new JobRejected(pointer, 'not_json', 'only JSON values are allowed');
  }
  if (value && typeof value === 'object') {
    const proto = Object.getPrototypeOf(value);
    if (!Array.isArray(value) && proto !== Object.prototype && proto !== null) {
      throw new JobRejected(pointer, 'not_json', 'only plain objects are allowed');
    }
    for (const [key, item] of Object.entries(value)) {
      checkJsonValues(item, `${pointer}/${String(key).replace(/~/g, '~0').replace(/\//g, '~1')}`);
    }
  }
}

/** Throws JobRejected (field = JSON pointer, rule = the schema keyword) unless `job` fits the schema. */
function validateJob(job) {
  if (!job || typeof job !== 'object' || Array.isArray(job)) {
    throw new JobRejected('', 'type', 'a job must be a JSON object');
  }
  checkJsonValues(job, '');
  const validate = validator();
  if (!validate(job)) {
    const [error] = validate.errors;
    let field = error.instancePath;
    if (error.keyword === 'additionalProperties') field += `/${error.params.additionalProperty}`;
    if (error.keyword === 'required') field += `/${error.params.missingProperty}`;
    const rule = error.keyword === 'additionalProperties' ? 'unknown_field' : error.keyword;
    throw new JobRejected(field, rule, error.message);
  }
  return job;
}

module.exports = { validateJob, JobRejected, schemaPath };
