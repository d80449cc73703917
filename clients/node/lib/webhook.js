'use strict';
/**
 * Verifying the service's signed webhooks:
 *   X-Sandbox-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, `${t}.` + raw body)>
 * Body: {delivery_id, event, data}; the id inside the signed body is the one to de-duplicate by.
 */
const crypto = require('node:crypto');

/** Hex HMAC-SHA256 over `${timestamp}.` + body (body: Buffer or string, exactly as received). */
function signWebhook(secret, timestamp, body) {
  return crypto.createHmac('sha256', secret).update(`${Math.trunc(timestamp)}.`).update(body).digest('hex');
}

class WebhookVerificationError extends Error {
  constructor(message) {
    super(message);
    this.name = 'WebhookVerificationError';
  }
}

/**
 * Returns { timestamp, envelope } for a genuine, fresh delivery; throws WebhookVerificationError.
 * `body` must be the raw request bytes (a re-serialised JSON object will not verify).
 */
function verifyWebhook({ secret, header, body, toleranceS = 300, now = Date.now() / 1000 }) {
  if (!secret) throw new WebhookVerificationError('no secret configured');
  const parts = String(header || '').split(',').map((p) => p.trim().split('='));
  const stamps = parts.filter(([k]) => k === 't').map(([, v]) => v);
  const signatures = parts.filter(([k]) => k === 'v1').map(([, v]) => v || '');
  if (stamps.length !== 1 || !/^\d{1,12}$/.test(stamps[0])) {
    throw new WebhookVerificationError('signature header needs exactly one numeric t=');
  }
  const timestamp = Number(stamps[0]);
  if (Math.abs(now - timestamp) > toleranceS) {
    throw new WebhookVerificationError('timestamp outside the tolerance window (replay?)');
  }
  const expected = Buffer.from(signWebhook(secret, timestamp, body), 'hex');
  // timingSafeEqual needs equal lengths; comparing lengths first leaks nothing secret.
  const ok = signatures.some((sig) => {
    if (!/^[0-9a-f]{64}$/.test(sig)) return false;
    return crypto.timingSafeEqual(expected, Buffer.from(sig, 'hex'));
  });
  if (!ok) throw new WebhookVerificationError('signature mismatch');
  let envelope;
  try {
    envelope = JSON.parse(Buffer.isBuffer(body) ? body.toString('utf8') : body);
  } catch (e) {
    throw new WebhookVerificationError('body is not JSON');
  }
  return { timestamp, envelope };
}

module.exports = { signWebhook, verifyWebhook, WebhookVerificationError };
