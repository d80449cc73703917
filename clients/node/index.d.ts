import type Redis from 'ioredis';

export type JobStatus =
  | 'queued' | 'creating' | 'preparing' | 'running' | 'collecting' | 'cleaning'
  | 'succeeded' | 'failed' | 'timed_out' | 'oom_killed' | 'cancelled' | 'rejected' | 'error';

export interface JobFile {
  path: string;
  content?: string;
  content_base64?: string;
  r2_key?: string;
  mode?: number;
}

/** A network policy; allowed_ports defaults to [443]. */
export interface Network { allowed_hosts?: string[]; blocked_ports?: number[]; allowed_ports?: number[]; outbound?: boolean }

/** The job JSON of sandbox/schema/job.schema.json (the schema is the authority). */
export interface Job {
  id?: string;
  command: string;
  environment?: Record<string, string>;
  timeout?: number;
  /** bandwidth: egress rate in bits/s, e.g. "10Mbps" */
  resources?: { cpu?: string; memory?: string; disk?: string; pids?: number; bandwidth?: string };
  network?: Network;
  /** Run while preparing (after files are written), under its own network policy; see docs/network.md. */
  setup?: { command: string; timeout?: number; network?: Network };
  files?: JobFile[];
  callback_url?: string;
  /** "terminal" (default) POSTs the final record only; "all" also POSTs each status transition. */
  callback_events?: "terminal" | "all";
  collect?: string[];
}

export interface JobError { code: string; message: string; field?: string | null; rule?: string }
/** A stored log or artifact; an empty log is never stored: size 0 and url null (fetchObject reads it as empty). */
export interface StoredObject { key: string; size: number; url: string | null }

export interface JobRecord {
  id: string;
  status: JobStatus;
  exit_code: number | null;
  error: JobError | null;
  created_at: number;
  updated_at: number;
  timeline: { status: JobStatus; at: number }[];
  stages: Record<string, { host?: string; started_at?: number; duration_s?: number; [k: string]: unknown }>;
  resources_used: Record<string, unknown>;
  artifacts: StoredObject[];
  logs: StoredObject[];
  security_events: Record<string, unknown>[];
  webhook_deliveries: WebhookDelivery[];
  /** The egress connection log of the command (null without outbound); docs/network.md. */
  network?: NetworkSection | null;
  /** The setup command's run, if the job had one. */
  setup?: { outcome: string; exit_code: number | null; signal: number | null; duration_s: number;
            reason: string; network: NetworkSection | null } | null;
  [field: string]: unknown;
}

export interface Connection {
  at: number; kind: 'connect' | 'http'; host: string | null; port: number | null; address: string | null;
  sni: string | null; verdict: 'allowed' | 'refused'; reason: string; detail: string;
  bytes_up: number; bytes_down: number; requests: number; duration_s: number;
}

export interface NetworkSection {
  policy: { allowed_hosts: string[]; allowed_ports: number[]; rate_bytes_per_s: number; max_bytes: number };
  totals: { connections: number; allowed: number; refused: number; bytes_up: number; bytes_down: number };
  connections: Connection[];
  connections_dropped: number;
}

export interface WebhookDelivery {
  delivery_id: string;
  event: 'job.terminal' | 'job.status';
  attempt: number;
  at: number;
  status_code: number | null;
  error: string | null;
}

/** One log line: escaped text (never raw control characters), capped in length. */
export interface LogEntry {
  kind: 'log';
  id: string;
  stream: 'stdout' | 'stderr';
  seq: number;
  ts: number;
  line: string;
  cut?: true;
  marker?: 'truncated';
}

export interface JobEvent {
  kind: 'event';
  id: string;
  type: 'status' | 'security' | 'invalid';
  seq: number;
  at: number;
  job_id: string;
  status?: JobStatus;
  detail?: unknown;
  [field: string]: unknown;
}

export interface FollowOptions {
  logId?: string;
  eventId?: string;
  blockMs?: number;
  signal?: AbortSignal;
  onIdle?: () => Promise<void>;
}

export interface WaitOptions {
  taskId?: string;
  /** submit()'s runId: a Redis restart between the submit and this wait is seen too. */
  runId?: string | null;
  timeoutMs?: number;
  onLog?: (entry: LogEntry) => void;
  onEvent?: (event: JobEvent) => void;
  signal?: AbortSignal;
}

export interface CancelAnswer { job_id: string; cancelled: boolean; status: JobStatus | null; message: string }

export class SandboxClient {
  constructor(options?: { redis?: string | Redis; queue?: string; blockMs?: number });
  readonly redis: Redis;
  close(): Promise<void>;
  /** runId: the run of Redis (INFO run_id) the message went to; null if INFO failed. */
  submit(job: Job): Promise<{ jobId: string; taskId: string; runId: string | null }>;
  wait(jobId: string, options?: WaitOptions): Promise<JobRecord>;
  run(job: Job, options?: WaitOptions): Promise<JobRecord>;
  getRecord(jobId: string): Promise<JobRecord | null>;
  getTaskResult(taskId: string): Promise<{ status: string; result: unknown; [k: string]: unknown } | null>;
  follow(jobId: string, options?: FollowOptions): AsyncGenerator<LogEntry | JobEvent>;
  followLogs(jobId: string, options?: FollowOptions): AsyncGenerator<LogEntry>;
  followEvents(jobId: string, options?: FollowOptions): AsyncGenerator<JobEvent>;
  cancel(jobId: string, options?: { timeoutMs?: number }): Promise<CancelAnswer>;
  waitForTask(taskId: string, options?: { timeoutMs?: number }): Promise<unknown>;
}

export class TaskFailed extends Error { taskId: string; result: unknown }
export class TimeoutError extends Error {}
/** Redis lost the job (restart without its data): it can no longer end; submit it again. */
export class JobVanished extends Error { jobId: string }
export const TERMINAL_STATUSES: ReadonlySet<JobStatus>;

export const QUEUE: string;
export function buildTaskMessage(
  task: string, args: unknown[],
  options?: { taskId?: string; replyTo?: string; deliveryTag?: string; origin?: string; queue?: string; sentAt?: number },
): { taskId: string; queue: string; raw: string };

export class JobRejected extends Error {
  code: 'rejected';
  field: string;
  rule: string;
  detail: string;
  toJSON(): JobError;
}
export function validateJob<T extends Job>(job: T): T;
export function schemaPath(): string;

export function signWebhook(secret: string | Buffer, timestamp: number, body: string | Buffer): string;
export function verifyWebhook(options: {
  secret: string | Buffer;
  header: string | undefined;
  body: string | Buffer;
  toleranceS?: number;
  now?: number;
}): { timestamp: number; envelope: { delivery_id: string; event: string; data: unknown } };
export class WebhookVerificationError extends Error {}

/** The bytes behind a record's log or artifact entry: an empty log (size 0, url null) is an empty Buffer. */
export function fetchObject(entry: StoredObject,
                            options?: { headers?: Record<string, string>; signal?: AbortSignal }): Promise<Buffer>;
