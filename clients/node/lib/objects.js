'use strict';
/** Reading a record's stored objects (its `logs` and `artifacts` entries) through their URLs. */

/**
 * The bytes of a `{key, size, url}` entry. An empty log is never stored: its entry has size 0 and
 * url null, and reads as an empty Buffer here, not as a failed request. Any other entry without a
 * URL, or a GET that is not 2xx (an expired URL, an SSE-C object fetched without `headers`), throws.
 * @param {{key: string, size: number, url: string | null}} entry
 * @param {{headers?: Record<string, string>, signal?: AbortSignal}} [options]
 * @returns {Promise<Buffer>}
 */
async function fetchObject(entry, { headers, signal } = {}) {
  if (entry.url === null || entry.url === undefined) {
    if (entry.size === 0) return Buffer.alloc(0);
    throw new Error(`${entry.key}: the entry has no URL to fetch`);
  }
  const res = await fetch(entry.url, { headers, signal });
  if (!res.ok) throw new Error(`GET ${entry.key}: HTTP ${res.status}`);
  return Buffer.from(await res.arrayBuffer());
}

module.exports = { fetchObject };
