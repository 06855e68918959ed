// How the console writes times, sizes and states.
import type { Device, ModelState } from "./api";

export function ago(unixSecs: number, now = Date.now()): string {
  if (!unixSecs) return "never";
  const s = Math.max(0, Math.round(now / 1000 - unixSecs));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

/** Unix seconds as UTC, to the second. */
export function utc(unixSecs: number): string {
  return new Date(unixSecs * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC";
}

export function duration(s: number): string {
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function bytes(n: number): string {
  if (n >= 1 << 30) return `${(n / (1 << 30)).toFixed(2)} GiB`;
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${n} B`;
}

export function ms(us: number | undefined | null): string {
  return us == null ? "–" : `${(us / 1000).toFixed(3)} ms`;
}

/** The version a model serves on a device, if any. */
export function servingVersion(m: ModelState): number | null {
  const slot = m.active ? m[m.active] : null;
  return slot ? slot.version : null;
}

export type Tone = "ok" | "bad" | "busy" | "muted";

/** A device's state in a word and a tone: its first model's update phase. */
export function deviceState(d: Device): [string, Tone] {
  const r = d.report;
  if (!r) return ["unknown", "muted"];
  const models = Object.values(r.models);
  if (!models.length) return ["no model", "muted"];
  for (const m of models) {
    const u = m.update;
    if (!u || u.phase === "active") continue;
    let text = `${u.phase} v${u.version}`;
    if (u.phase === "downloading" && u.total_bytes)
      text += ` ${Math.round((100 * (u.received_bytes ?? 0)) / u.total_bytes)}%`;
    if (u.phase === "waiting" && u.held)
      text += u.held.by === "metered" ? ": metered link" : ": maintenance window";
    return [text, u.phase === "failed" ? "bad" : "busy"];
  }
  return ["active", "ok"];
}

export function labelText(labels: Record<string, string>): string[] {
  return Object.entries(labels).map(([k, v]) => `${k}=${v}`);
}
