// The operator API (server/src/api.rs), with the token of this tab's session.
import { useEffect, useRef, useState } from "preact/hooks";
import { signal } from "@preact/signals";

const KEY = "modelcast-token";

export type Role = "viewer" | "deployer" | "admin";
const RANK: Record<Role, number> = { viewer: 0, deployer: 1, admin: 2 };

export interface Whoami {
  name: string | null;
  role: Role;
  tokens: boolean;
  enrol: boolean;
}

/** Whether `role` may do what needs `needed` (the API checks again, whatever the page says). */
export function may(who: Whoami | null, needed: Role): boolean {
  return who != null && RANK[who.role] >= RANK[needed];
}

export function token(): string | null {
  return sessionStorage.getItem(KEY);
}

export function setToken(t: string | null) {
  if (t) sessionStorage.setItem(KEY, t);
  else sessionStorage.removeItem(KEY);
}

/** A refused or failed call: the API's status and its message. */
export class ApiError extends Error {
  constructor(
    public status: number,
    message: string,
  ) {
    super(message);
  }
}

function headers(json: boolean): Record<string, string> {
  const h: Record<string, string> = {};
  const t = token();
  if (t) h.Authorization = "Bearer " + t;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function answer<T>(r: Response, path: string): Promise<T> {
  if (!r.ok) {
    let why = `${r.status} ${r.statusText}`;
    try {
      const body = await r.json();
      if (body && typeof body.error === "string") why = body.error;
    } catch {
      // Not JSON: the status says it.
    }
    if (r.status === 401) unauthorized.value = true;
    throw new ApiError(r.status, `${path}: ${why}`);
  }
  return (await r.json()) as T;
}

/** Set when the API answers 401: the page asks for a token. */
export const unauthorized = signal(false);

/** When the API last answered, and whether the last call failed to reach it. */
export const link = signal<{ ok_at: number; failing_since: number | null; error: string | null }>({
  ok_at: 0,
  failing_since: null,
  error: null,
});

function reached() {
  link.value = { ok_at: Date.now(), failing_since: null, error: null };
}

function unreachable(e: unknown) {
  const prev = link.value;
  link.value = {
    ok_at: prev.ok_at,
    failing_since: prev.failing_since ?? Date.now(),
    error: e instanceof Error ? e.message : String(e),
  };
}

export async function get<T>(path: string): Promise<T> {
  let r: Response;
  try {
    r = await fetch(path, { headers: headers(false) });
  } catch (e) {
    unreachable(e);
    throw e;
  }
  if (r.status >= 500) unreachable(new Error(`${path}: ${r.status}`));
  else reached();
  return answer<T>(r, path);
}

/** A GET whose answer also says how many there are in all (`X-Total-Count`). */
export async function getPage<T>(path: string): Promise<{ items: T[]; total: number }> {
  const r = await fetch(path, { headers: headers(false) }).catch((e) => {
    unreachable(e);
    throw e;
  });
  reached();
  const items = await answer<T[]>(r, path);
  const total = Number(r.headers.get("X-Total-Count") ?? items.length);
  return { items, total };
}

export async function post<T>(path: string, body: unknown): Promise<T> {
  const r = await fetch(path, {
    method: "POST",
    headers: headers(true),
    body: JSON.stringify(body ?? {}),
  });
  return answer<T>(r, path);
}

export interface Live<T> {
  data: T | null;
  error: string | null;
  /** Reads again now (after an action). */
  reload: () => void;
}

/**
 * `path` read now and every `everyMs` after the previous answer (never two at once, so a slow
 * server is not piled on); null reads nothing.
 */
export function useLive<T>(path: string | null, everyMs = 2000): Live<T> {
  const [data, setData] = useState<T | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [tick, setTick] = useState(0);
  const current = useRef(path);
  current.current = path;
  useEffect(() => {
    if (path == null) return;
    let stopped = false;
    let timer: number | undefined;
    const read = async () => {
      try {
        const d = await get<T>(path);
        if (!stopped && current.current === path) {
          setData(d);
          setError(null);
        }
      } catch (e) {
        if (!stopped) setError(e instanceof Error ? e.message : String(e));
      }
      if (!stopped) timer = window.setTimeout(read, everyMs);
    };
    read();
    return () => {
      stopped = true;
      window.clearTimeout(timer);
    };
  }, [path, everyMs, tick]);
  return { data, error, reload: () => setTick((t) => t + 1) };
}

// What the API answers (the fields the console reads).

export interface SlotContent {
  version: number;
  sha256?: string;
}

export interface UpdateProgress {
  phase: string;
  version: number;
  received_bytes?: number;
  total_bytes?: number;
  reason?: string;
  held?: { by: string; until?: number; activation_only?: boolean };
}

export interface ShadowSummary {
  version: number;
  compared: number;
  wanted: number;
  dropped: number;
  agreement_permille?: number;
  max_abs_diff: number;
  mean_abs_diff: number;
  ks?: number;
  serving_p99_us?: number;
  candidate_p99_us?: number;
  verdict?: "passed" | "failed" | "cancelled";
}

export interface CanaryState {
  version: number;
  percent: number;
  key?: string;
}

export interface ModelState {
  shadow?: ShadowSummary;
  canary?: CanaryState;
  low_memory_swap_ms?: number;
  active: "a" | "b" | null;
  a: SlotContent | null;
  b: SlotContent | null;
  update: UpdateProgress | null;
  engine?: { backend: string; reason: string };
}

export interface DeviceReport {
  models: Record<string, ModelState>;
  last_error?: { model?: string; version?: number; reason: string; at?: number } | null;
  labels?: Record<string, string>;
}

export interface Device {
  id: string;
  labels: Record<string, string>;
  report: DeviceReport | null;
  last_seen: number;
  online: boolean;
  quarantine?: { by: string; at: number; reason: string };
  dropped?: Record<string, number>;
}

export interface FleetSummary {
  devices: number;
  online: number;
  states: Record<string, number>;
  quarantined: number;
  serving: Record<string, Record<string, number>>;
}

export interface Manifest {
  name: string;
  version: number;
  size: number;
  model_format: string;
  metadata: Record<string, string>;
  forms?: { model_format: string; size: number }[];
  fallback_version?: number | null;
  encrypted?: unknown;
}

export interface ModelEntry {
  manifest: Manifest;
  published_by: string;
  published_at: number;
  stage?: "candidate" | "production" | "retired";
  staged_by?: [string, number];
}

export interface VersionHistory extends ModelEntry {
  devices: string[];
}

export interface Member {
  device: string;
  wave: number;
  previous: number | null;
  state: "waiting" | "updating" | "committed" | "failed" | "reverting" | "reverted" | "skipped";
  reason?: string;
  failure?: string;
  transferred?: { received_bytes: number; reused_bytes: number };
  shadow?: ShadowSummary;
}

export interface Counts {
  at: number;
  committed: number;
  updating: number;
  failed: number;
  reverted: number;
  [k: string]: number;
}

export interface RolloutSpec {
  model: string;
  version: number;
  group: string;
  waves: string[];
  success_percent: number;
  max_failures: number;
  max_failure_percent?: number | null;
  wave_timeout_secs: number;
  auto_rollback: boolean;
  abort_on_alerts: boolean;
}

export interface Rollout {
  id: number;
  spec: RolloutSpec;
  by: string;
  created: number;
  ended?: number;
  state: "running" | "paused" | "completed" | "aborted" | "cancelled";
  reason?: string;
  wave_sizes: number[];
  wave: number;
  wave_started: number;
  members: Member[];
  timeline: Counts[];
}

export interface Percentiles {
  p50: number;
  p95: number;
  p99: number;
}

export interface Totals {
  requests: number;
  errors: number;
  error_rate: number;
  latency_us?: Percentiles;
  non_finite: number;
}

export interface Step extends Totals {
  at_ms: number;
}

export interface TelemetryAnswer {
  question: { model: string; version?: number };
  from_ms: number;
  to_ms: number;
  step_ms: number;
  devices: number;
  points: number;
  totals: Totals;
  versions: Record<string, Totals>;
  series: Step[];
}

export interface Alert {
  id: number;
  device: string;
  model: string;
  version: number;
  kind: string;
  output?: string;
  message: string;
  test: string;
  value: number;
  threshold: number;
  raised_ms: number;
  cleared_ms?: number | null;
}

export interface AlertList {
  alerts: Alert[];
  versions: { model: string; version: number; devices: number; kinds: Record<string, number> }[];
}

export interface AuditEntry {
  seq: number;
  at: number;
  who: string;
  action: string;
  details: Record<string, unknown>;
}

export interface Enrolment {
  device: string;
  claim: string | null;
  state: "pending" | "enrolled" | "rejected" | "revoked";
  labels?: Record<string, string>;
  requested_at: number;
}

export interface DeviceTelemetry {
  device: string;
  from_ms: number;
  to_ms: number;
  models: {
    model: string;
    version: number;
    slot: string;
    requests: number;
    errors: number;
    latency_us?: Percentiles;
  }[];
  system: { cpu_ms: number; rss_bytes: number; store_bytes: number; disk_free_bytes: number; queued: number };
}
