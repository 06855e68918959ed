// Devices: the paginated list, and one device's page.
import { useEffect, useMemo, useState } from "preact/hooks";
import { useRoute } from "preact-iso";
import {
  get,
  getPage,
  may,
  post,
  useLive,
  type AlertList,
  type AuditEntry,
  type Device,
  type DeviceTelemetry,
  type Rollout,
} from "../api";
import { Chart } from "../chart";
import { ago, deviceState, duration, servingVersion, utc } from "../format";
import { Action, ErrorLine, Labels, Pill, Section, useWho } from "../ui";

const PAGE = 50;

/** Devices a page at a time (the server slices the list), with a search over ids and labels. */
export function DevicesTable(props: { title?: string }) {
  const [offset, setOffset] = useState(0);
  const [q, setQ] = useState("");
  const [page, setPage] = useState<{ items: Device[]; total: number } | null>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    let stopped = false;
    let timer: number | undefined;
    const read = async () => {
      try {
        const p = await getPage<Device>(
          `/api/v1/devices?offset=${offset}&limit=${PAGE}` + (q ? `&q=${encodeURIComponent(q)}` : ""),
        );
        if (!stopped) {
          setPage(p);
          setError(null);
        }
      } catch (e) {
        if (!stopped) setError(String((e as Error).message ?? e));
      }
      if (!stopped) timer = window.setTimeout(read, 3000);
    };
    read();
    return () => {
      stopped = true;
      window.clearTimeout(timer);
    };
  }, [offset, q]);
  const total = page?.total ?? 0;
  return (
    <Section
      title={props.title ?? "Devices"}
      id="devices"
      right={
        <input
          type="search"
          placeholder="search id or label"
          value={q}
          onInput={(e) => {
            setQ((e.target as HTMLInputElement).value);
            setOffset(0);
          }}
        />
      }
    >
      <ErrorLine error={error} />
      <table>
        <thead>
          <tr>
            <th>Device</th>
            <th>Online</th>
            <th>Labels</th>
            <th>Serving</th>
            <th>State</th>
            <th>Last error</th>
            <th>Last seen</th>
          </tr>
        </thead>
        <tbody>
          {(page?.items ?? []).map((d) => {
            const [state, tone] = deviceState(d);
            return (
              <tr key={d.id} data-device={d.id}>
                <td>
                  <a href={`/dashboard/devices/${encodeURIComponent(d.id)}`}>{d.id}</a>
                  {d.quarantine && <Pill tone="bad">quarantined</Pill>}
                </td>
                <td class={d.online ? "ok" : "bad"}>{d.online ? "online" : "offline"}</td>
                <td>
                  <Labels labels={d.labels} />
                </td>
                <td>
                  {Object.entries(d.report?.models ?? {}).map(([name, m]) => {
                    const v = servingVersion(m);
                    return (
                      <div key={name}>
                        <a href={`/dashboard/models/${encodeURIComponent(name)}`}>{name}</a>{" "}
                        {v == null ? "–" : `v${v} (${m.active})`}
                        {m.engine && <span class="muted"> on {m.engine.backend}</span>}
                      </div>
                    );
                  })}
                </td>
                <td class={tone}>{state}</td>
                <td class="bad">{d.report?.last_error?.reason ?? ""}</td>
                <td class="muted">{ago(d.last_seen)}</td>
              </tr>
            );
          })}
        </tbody>
      </table>
      <div class="pager">
        <button disabled={offset === 0} onClick={() => setOffset(Math.max(0, offset - PAGE))}>
          ← previous
        </button>
        <span data-total={total}>
          {total === 0 ? "no devices" : `${offset + 1}–${Math.min(total, offset + PAGE)} of ${total}`}
        </span>
        <button disabled={offset + PAGE >= total} onClick={() => setOffset(offset + PAGE)}>
          next →
        </button>
      </div>
    </Section>
  );
}

export function DevicesPage() {
  return <DevicesTable />;
}

/** Whether an audit entry or rollout concerns `id`. */
function mentions(details: unknown, id: string): boolean {
  if (details === id) return true;
  if (Array.isArray(details)) return details.some((d) => mentions(d, id));
  if (details && typeof details === "object") return Object.values(details).some((d) => mentions(d, id));
  return false;
}

interface HistoryRow {
  at: number;
  what: string;
  tone: string;
  link?: string;
}

export function DevicePage() {
  const { params } = useRoute();
  const id = params.id;
  const who = useWho();
  const device = useLive<Device>(`/api/v1/devices/${encodeURIComponent(id)}`);
  const rollouts = useLive<Rollout[]>("/api/v1/rollouts", 5000);
  const alerts = useLive<AlertList>("/api/v1/alerts?all=true", 10000);
  const audit = useLive<AuditEntry[]>(`/api/v1/audit?device=${encodeURIComponent(id)}`, 10000);
  const telemetry = useLive<DeviceTelemetry[]>(
    `/api/v1/devices/${encodeURIComponent(id)}/telemetry?since_secs=3600`,
    10000,
  );
  const d = device.data;
  if (!d) return <ErrorLine error={device.error ?? null} />;

  const history: HistoryRow[] = [];
  for (const r of rollouts.data ?? []) {
    const m = r.members.find((m) => m.device === id);
    if (!m) continue;
    const what = `rollout ${r.id}: ${r.spec.model} v${r.spec.version} (${m.wave === 0 ? "canary" : `wave ${m.wave + 1}`}), ${m.state}` +
      (m.failure ? `: ${m.failure}` : "") +
      (m.previous != null && (m.state === "reverted" || m.state === "reverting") ? `, back to v${m.previous}` : "");
    const tone = m.failure ? "bad" : m.state === "committed" ? "ok" : "busy";
    history.push({ at: r.created, what, tone, link: `/dashboard/rollouts/${r.id}` });
  }
  for (const a of audit.data ?? []) {
    if (!mentions(a.details, id)) continue;
    history.push({ at: a.at, what: `${a.action} by ${a.who}`, tone: "muted" });
  }
  const e = d.report?.last_error;
  if (e) history.push({ at: e.at ?? d.last_seen, what: `last error: ${e.reason}`, tone: "bad" });
  history.sort((a, b) => b.at - a.at);

  const mine = (alerts.data?.alerts ?? []).filter((a) => a.device === id);
  return (
    <>
      <Section
        title={`Device ${id}`}
        id="device"
        right={
          <Action
            needs="deployer"
            name={d.quarantine ? "release" : "quarantine"}
            label={d.quarantine ? "Release" : "Quarantine"}
            danger={!d.quarantine}
            confirm={
              d.quarantine
                ? `Release ${id}: what it sends is read again.`
                : `Quarantine ${id}: everything it sends is dropped unread until released.`
            }
            run={() =>
              post(`/api/v1/devices/${encodeURIComponent(id)}/quarantine`, {
                quarantined: !d.quarantine,
                reason: "from the console",
              })
            }
            done={device.reload}
          />
        }
      >
        <p>
          <Pill tone={d.online ? "ok" : "bad"}>{d.online ? "online" : "offline"}</Pill> last seen{" "}
          {ago(d.last_seen)} · <Labels labels={d.labels} />
          {d.quarantine && (
            <Pill tone="bad">
              quarantined by {d.quarantine.by}: {d.quarantine.reason}
            </Pill>
          )}
        </p>
        <table>
          <thead>
            <tr>
              <th>Model</th>
              <th>Slot A</th>
              <th>Slot B</th>
              <th>Serving</th>
              <th>Update</th>
              <th>Engine</th>
            </tr>
          </thead>
          <tbody>
            {Object.entries(d.report?.models ?? {}).map(([name, m]) => (
              <tr key={name} data-slots={name}>
                <td>
                  <a href={`/dashboard/models/${encodeURIComponent(name)}`}>{name}</a>
                </td>
                <td class={m.active === "a" ? "ok" : ""}>{m.a ? `v${m.a.version}` : "empty"}</td>
                <td class={m.active === "b" ? "ok" : ""}>{m.b ? `v${m.b.version}` : "empty"}</td>
                <td data-serving={servingVersion(m) ?? ""}>
                  {servingVersion(m) == null ? "–" : `v${servingVersion(m)} (${m.active})`}
                </td>
                <td class={m.update?.phase === "failed" ? "bad" : ""}>
                  {m.update ? `${m.update.phase} v${m.update.version}` : "–"}
                  {m.update?.reason && `: ${m.update.reason}`}
                  {m.shadow && (
                    <div class="small muted" data-shadow={m.shadow.verdict ?? "running"}>
                      shadow of v{m.shadow.version}: {m.shadow.verdict ?? "running"}, {m.shadow.compared}/
                      {m.shadow.wanted} compared
                      {m.shadow.agreement_permille != null &&
                        `, agreement ${(m.shadow.agreement_permille / 10).toFixed(1)}%`}
                      , mean |Δ| {m.shadow.mean_abs_diff.toPrecision(3)}
                    </div>
                  )}
                  {m.low_memory_swap_ms != null && (
                    <div class="small muted" data-low-memory-swap={m.low_memory_swap_ms}>
                      last low-memory swap: unavailable {m.low_memory_swap_ms} ms
                    </div>
                  )}
                  {m.canary && (
                    <div class="small" data-canary={m.canary.version}>
                      canary v{m.canary.version}: {m.canary.percent}% of requests
                      {m.canary.key ? ` (sticky by ${m.canary.key})` : ""}
                    </div>
                  )}
                </td>
                <td class="muted" title={m.engine?.reason}>
                  {m.engine?.backend ?? ""}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
        {d.dropped && Object.keys(d.dropped).length > 0 && (
          <p class="muted">
            dropped by the server:{" "}
            {Object.entries(d.dropped)
              .map(([k, n]) => `${k} ${n}`)
              .join(", ")}
          </p>
        )}
      </Section>
      <Section title="Update history" id="history">
        {history.length === 0 ? (
          <p class="muted">nothing yet</p>
        ) : (
          <table>
            <tbody>
              {history.map((h, i) => (
                <tr key={i} data-history>
                  <td class="muted nowrap">{utc(h.at)}</td>
                  <td class={h.tone}>{h.link ? <a href={h.link}>{h.what}</a> : h.what}</td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
      </Section>
      <DeviceTelemetryCharts reports={telemetry.data ?? []} />
      <Section title="Alerts" id="device-alerts">
        {mine.length === 0 ? (
          <p class="muted">none</p>
        ) : (
          <table>
            <tbody>
              {mine.map((a) => (
                <tr key={a.id} data-alert={a.id}>
                  <td>
                    {a.model} v{a.version}
                  </td>
                  <td class={a.cleared_ms ? "muted" : "bad"}>{a.kind.replace(/_/g, " ")}</td>
                  <td>{a.message}</td>
                  <td class="muted">{a.cleared_ms ? "cleared" : `raised ${ago(a.raised_ms / 1000)}`}</td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
      </Section>
      <Samples id={id} models={Object.keys(d.report?.models ?? {})} allowed={may(who, "deployer")} />
    </>
  );
}

function DeviceTelemetryCharts(props: { reports: DeviceTelemetry[] }) {
  const { charts, system } = useMemo(() => {
    const reports = props.reports.slice().sort((a, b) => a.to_ms - b.to_ms);
    const x = reports.map((r) => r.to_ms / 1000);
    const keys = [...new Set(reports.flatMap((r) => r.models.map((m) => `${m.model} v${m.version}`)))];
    const charts = keys.map((k) => {
      const pick = (f: (m: DeviceTelemetry["models"][0]) => number | null) =>
        reports.map((r) => {
          const m = r.models.find((m) => `${m.model} v${m.version}` === k);
          return m ? f(m) : null;
        });
      return {
        key: k,
        x,
        p50: pick((m) => (m.latency_us ? m.latency_us.p50 / 1000 : null)),
        p95: pick((m) => (m.latency_us ? m.latency_us.p95 / 1000 : null)),
        p99: pick((m) => (m.latency_us ? m.latency_us.p99 / 1000 : null)),
        requests: pick((m) => m.requests),
      };
    });
    const system = { x, rss: reports.map((r) => r.system.rss_bytes / (1 << 20)) };
    return { charts, system };
  }, [props.reports]);
  return (
    <Section title="Telemetry, last hour" id="device-telemetry">
      {charts.length === 0 && <p class="muted">no telemetry in the last hour</p>}
      <div class="charts">
        {charts.map((c) => (
          <Chart
            key={c.key}
            title={`${c.key}: latency`}
            unit="ms"
            x={c.x}
            lines={[
              { label: "p50", color: "#0969da", values: c.p50 },
              { label: "p95", color: "#bf8700", values: c.p95 },
              { label: "p99", color: "#bc4c00", values: c.p99 },
            ]}
            bands={[{ upper: 2, lower: 0, fill: "rgba(9,105,218,0.08)" }]}
          />
        ))}
        {charts.map((c) => (
          <Chart
            key={c.key + "r"}
            title={`${c.key}: requests per report`}
            unit="req"
            x={c.x}
            lines={[{ label: "requests", color: "#1a7f37", values: c.requests }]}
          />
        ))}
        {system.x.length > 0 && (
          <Chart
            title="agent memory (RSS)"
            unit="MiB"
            x={system.x}
            lines={[{ label: "rss", color: "#8250df", values: system.rss }]}
          />
        )}
      </div>
      {props.reports.length > 0 && (
        <p class="muted">
          {props.reports.length} reports; each point is one report's percentiles
        </p>
      )}
    </Section>
  );
}

function Samples(props: { id: string; models: string[]; allowed: boolean }) {
  const [error, setError] = useState<string | null>(null);
  if (!props.models.length) return null;
  const download = async (model: string) => {
    setError(null);
    try {
      const samples = await get<unknown[]>(
        `/api/v1/samples?model=${encodeURIComponent(model)}&device=${encodeURIComponent(props.id)}&since_secs=86400`,
      );
      const blob = new Blob([JSON.stringify(samples, null, 1)], { type: "application/json" });
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = `samples-${props.id}-${model}.json`;
      a.click();
      URL.revokeObjectURL(a.href);
    } catch (e) {
      setError(String((e as Error).message ?? e));
    }
  };
  return (
    <Section title="Samples" id="samples">
      <p class="muted">
        The inputs and outputs this device sampled in the last day (deployer role: they are data, not fleet state).
      </p>
      {props.models.map((m) => (
        <button
          key={m}
          data-samples={m}
          disabled={!props.allowed}
          title={props.allowed ? "" : "needs the deployer role"}
          onClick={() => download(m)}
        >
          Download {m} samples
        </button>
      ))}
      <ErrorLine error={error} />
    </Section>
  );
}

export function RolloutTimes(props: { r: Rollout }) {
  const r = props.r;
  return (
    <span class="muted" data-times={r.id}>
      started {utc(r.created)}
      {r.ended ? `, ended ${utc(r.ended)} (${duration(r.ended - r.created)})` : ""}
    </span>
  );
}
