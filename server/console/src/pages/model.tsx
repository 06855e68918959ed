// Models: the registry's list, and one model's page (versions, where each serves, its rollouts,
// its telemetry per version side by side), with deploy, rollout, promote and retire.
import { useEffect, useMemo, useState } from "preact/hooks";
import { useLocation, useRoute } from "preact-iso";
import {
  get,
  post,
  useLive,
  type ModelEntry,
  type Rollout,
  type TelemetryAnswer,
  type VersionHistory,
} from "../api";
import { Chart, type Line } from "../chart";
import { bytes, ms, utc } from "../format";
import { Action, ErrorLine, Pill, Section, useWho } from "../ui";
import { may } from "../api";
import { RolloutRow } from "./rollout";

export function ModelsPage() {
  const models = useLive<ModelEntry[]>("/api/v1/models", 5000);
  const names = useMemo(() => {
    const by = new Map<string, ModelEntry[]>();
    for (const e of models.data ?? []) {
      const list = by.get(e.manifest.name) ?? [];
      list.push(e);
      by.set(e.manifest.name, list);
    }
    return [...by.entries()];
  }, [models.data]);
  return (
    <Section title="Models" id="models">
      <ErrorLine error={models.error} />
      <table>
        <thead>
          <tr>
            <th>Model</th>
            <th>Versions</th>
            <th>Production</th>
            <th>Newest</th>
          </tr>
        </thead>
        <tbody>
          {names.map(([name, list]) => {
            const prod = list.filter((e) => e.stage === "production").map((e) => `v${e.manifest.version}`);
            const newest = list.reduce((a, b) => (a.manifest.version > b.manifest.version ? a : b));
            return (
              <tr key={name} data-model-row={name}>
                <td>
                  <a href={`/dashboard/models/${encodeURIComponent(name)}`}>{name}</a>
                </td>
                <td>{list.length}</td>
                <td>{prod.join(", ") || "–"}</td>
                <td>
                  v{newest.manifest.version}, {newest.published_by}, {utc(newest.published_at)}
                </td>
              </tr>
            );
          })}
        </tbody>
      </table>
    </Section>
  );
}

const PALETTE = ["#0969da", "#bc4c00", "#1a7f37", "#8250df", "#bf3989"];

export function ModelPage() {
  const { params } = useRoute();
  const name = params.name;
  const who = useWho();
  const history = useLive<VersionHistory[]>(`/api/v1/models/${encodeURIComponent(name)}`, 5000);
  const rollouts = useLive<Rollout[]>("/api/v1/rollouts", 3000);
  const versions = (history.data ?? []).slice().sort((a, b) => b.manifest.version - a.manifest.version);
  const mine = (rollouts.data ?? []).filter((r) => r.spec.model === name).reverse();
  return (
    <>
      <Section title={`Model ${name}`} id="model">
        <ErrorLine error={history.error} />
        <table>
          <thead>
            <tr>
              <th>Version</th>
              <th>Stage</th>
              <th>Serving on</th>
              <th>Format</th>
              <th>Size</th>
              <th>Published</th>
              <th>Lineage and metadata</th>
              <th></th>
            </tr>
          </thead>
          <tbody>
            {versions.map((v) => {
              const m = v.manifest;
              const stage = v.stage ?? "candidate";
              return (
                <tr key={m.version} data-version={m.version}>
                  <td>v{m.version}</td>
                  <td data-stage={stage}>
                    <Pill tone={stage === "production" ? "ok" : stage === "retired" ? "muted" : "busy"}>{stage}</Pill>
                  </td>
                  <td data-serving-count={v.devices.length} title={v.devices.join(", ")}>
                    {v.devices.length} device{v.devices.length === 1 ? "" : "s"}
                    {v.devices.length > 0 && v.devices.length <= 5 && (
                      <div class="muted small">
                        {v.devices.map((d, i) => (
                          <>
                            {i > 0 && ", "}
                            <a href={`/dashboard/devices/${encodeURIComponent(d)}`}>{d}</a>
                          </>
                        ))}
                      </div>
                    )}
                  </td>
                  <td>{[m.model_format, ...(m.forms ?? []).map((f) => f.model_format)].join(" + ")}</td>
                  <td>{[m.size, ...(m.forms ?? []).map((f) => f.size)].map(bytes).join(" + ")}</td>
                  <td>
                    {v.published_by}
                    <div class="muted small">{utc(v.published_at)}</div>
                  </td>
                  <td class="small">
                    {Object.entries(m.metadata).map(([k, val]) => (
                      <div key={k}>
                        <span class="muted">{k}</span> {val}
                      </div>
                    ))}
                  </td>
                  <td class="actions">
                    {stage !== "production" && stage !== "retired" && (
                      <Action
                        needs="deployer"
                        name={`promote-${m.version}`}
                        label="Promote"
                        confirm={`Promote ${name} v${m.version} to production (the production version before it goes back to candidate)?`}
                        run={() => post(`/api/v1/models/${encodeURIComponent(name)}/${m.version}/promote`, {})}
                        done={history.reload}
                      />
                    )}
                    {stage !== "retired" && (
                      <Action
                        needs="deployer"
                        name={`retire-${m.version}`}
                        label="Retire"
                        danger
                        confirm={`Retire ${name} v${m.version}? No new deployment or rollout may name it.`}
                        run={() => post(`/api/v1/models/${encodeURIComponent(name)}/${m.version}/retire`, {})}
                        done={history.reload}
                      />
                    )}
                  </td>
                </tr>
              );
            })}
          </tbody>
        </table>
      </Section>
      {may(who, "deployer") && versions.length > 0 && (
        <div class="two">
          <DeployForm name={name} versions={versions.filter((v) => v.stage !== "retired").map((v) => v.manifest.version)} />
          <RolloutForm name={name} versions={versions.filter((v) => v.stage !== "retired").map((v) => v.manifest.version)} />
        </div>
      )}
      <Section title="Rollouts" id="model-rollouts">
        {mine.length === 0 ? <p class="muted">none</p> : mine.map((r) => <RolloutRow key={r.id} r={r} />)}
      </Section>
      <VersionTelemetry name={name} />
    </>
  );
}

function VersionSelect(props: { name: string; versions: number[]; value: string; set: (v: string) => void }) {
  return (
    <label>
      version
      <select name={props.name} value={props.value} onChange={(e) => props.set((e.target as HTMLSelectElement).value)}>
        {props.versions.map((v) => (
          <option key={v} value={v}>
            v{v}
          </option>
        ))}
      </select>
    </label>
  );
}

function DeployForm(props: { name: string; versions: number[] }) {
  const [version, setVersion] = useState(String(props.versions[0] ?? ""));
  const [group, setGroup] = useState("*");
  return (
    <Section title="Deploy" id="deploy">
      <p class="muted">Every device of the group is told to serve this version now.</p>
      <div class="form">
        <VersionSelect name="deploy-version" versions={props.versions} value={version} set={setVersion} />
        <label>
          group
          <input name="deploy-group" value={group} onInput={(e) => setGroup((e.target as HTMLInputElement).value)} />
        </label>
        <Action
          needs="deployer"
          name="deploy"
          label="Deploy"
          confirm={`Deploy ${props.name} v${version} to every device of ${group}?`}
          run={() => post("/api/v1/deployments", { model: props.name, version: Number(version), group })}
        />
      </div>
    </Section>
  );
}

function RolloutForm(props: { name: string; versions: number[] }) {
  const [version, setVersion] = useState(String(props.versions[0] ?? ""));
  const [group, setGroup] = useState("*");
  const [waves, setWaves] = useState("1, 100%");
  const [maxFailures, setMaxFailures] = useState("0");
  const [timeout, setTimeoutSecs] = useState("3600");
  const [probation, setProbation] = useState("");
  const [autoRollback, setAutoRollback] = useState(true);
  const [onAlerts, setOnAlerts] = useState(false);
  const { route } = useLocation();
  const spec = () => ({
    model: props.name,
    version: Number(version),
    group,
    waves: waves
      .split(",")
      .map((w) => w.trim())
      .filter(Boolean),
    max_failures: Number(maxFailures),
    wave_timeout_secs: Number(timeout),
    auto_rollback: autoRollback,
    abort_on_alerts: onAlerts,
    ...(probation ? { probation: { seconds: Number(probation) } } : {}),
  });
  const input = (name: string, value: string, set: (v: string) => void) => (
    <input name={name} value={value} onInput={(e) => set((e.target as HTMLInputElement).value)} />
  );
  return (
    <Section title="Start a rollout" id="start-rollout">
      <p class="muted">Waves move the group a share at a time; a wave that fails its criteria aborts the rollout.</p>
      <div class="form">
        <VersionSelect name="rollout-version" versions={props.versions} value={version} set={setVersion} />
        <label>group {input("rollout-group", group, setGroup)}</label>
        <label>waves (counts or shares) {input("rollout-waves", waves, setWaves)}</label>
        <label>failures allowed {input("rollout-max-failures", maxFailures, setMaxFailures)}</label>
        <label>wave timeout, s {input("rollout-timeout", timeout, setTimeoutSecs)}</label>
        <label>probation, s (empty: the devices' own) {input("rollout-probation", probation, setProbation)}</label>
        <label class="check">
          <input type="checkbox" checked={autoRollback} onChange={(e) => setAutoRollback((e.target as HTMLInputElement).checked)} />
          roll the moved devices back on abort
        </label>
        <label class="check">
          <input type="checkbox" checked={onAlerts} onChange={(e) => setOnAlerts((e.target as HTMLInputElement).checked)} />
          abort on drift alerts
        </label>
        <Action
          needs="deployer"
          name="start-rollout"
          label="Start rollout"
          confirm={`Roll ${props.name} v${version} out to ${group} in waves ${waves}?`}
          run={async () => {
            const r = await post<Rollout>("/api/v1/rollouts", spec());
            route(`/dashboard/rollouts/${r.id}`);
          }}
        />
      </div>
    </Section>
  );
}

/** The windows a model's telemetry can be charted over, with the step of each. */
const WINDOWS: [string, number, number][] = [
  ["15 min", 900, 10],
  ["1 hour", 3600, 30],
  ["6 hours", 21600, 180],
  ["24 hours", 86400, 720],
];

/** Latency, errors and requests of the model's versions over a window, one line per version. */
function VersionTelemetry(props: { name: string }) {
  const [w, setW] = useState(1);
  const [label, since, step] = WINDOWS[w];
  const query = `since_secs=${since}&step_secs=${step}`;
  const all = useLive<TelemetryAnswer>(
    `/api/v1/telemetry?model=${encodeURIComponent(props.name)}&${query}`,
    Math.max(5000, step * 500),
  );
  const [per, setPer] = useState<[number, TelemetryAnswer][]>([]);
  const versions = useMemo(
    () =>
      Object.keys(all.data?.versions ?? {})
        .map(Number)
        .sort((a, b) => a - b)
        .slice(-5),
    [all.data],
  );
  useEffect(() => {
    let stopped = false;
    Promise.all(
      versions.map((v) =>
        get<TelemetryAnswer>(
          `/api/v1/telemetry?model=${encodeURIComponent(props.name)}&version=${v}&${query}`,
        ).then((a) => [v, a] as [number, TelemetryAnswer]),
      ),
    )
      .then((p) => !stopped && setPer(p))
      .catch(() => {});
    return () => {
      stopped = true;
    };
  }, [versions.join(","), all.data?.to_ms, query]);
  const a = all.data;
  const pick = (
    <select name="telemetry-window" value={w} onChange={(e) => setW(Number((e.target as HTMLSelectElement).value))}>
      {WINDOWS.map(([l], i) => (
        <option key={l} value={i}>
          last {l}
        </option>
      ))}
    </select>
  );
  if (!a || a.points === 0)
    return (
      <Section title="Telemetry per version" id="model-telemetry" right={pick}>
        <p class="muted">no telemetry in the last {label}</p>
      </Section>
    );
  const x = a.series.map((s) => s.at_ms / 1000);
  // Each version's answer was asked a moment apart, so its steps may be shifted by less than
  // a step: each goes to the nearest step of the whole model's.
  const align = (va: TelemetryAnswer, f: (s: TelemetryAnswer["series"][0]) => number | null) => {
    const out: (number | null)[] = a.series.map(() => null);
    const first = a.series[0]?.at_ms ?? 0;
    for (const s of va.series) {
      const i = Math.round((s.at_ms - first) / a.step_ms);
      if (i >= 0 && i < out.length) out[i] = f(s);
    }
    return out;
  };
  const lat = (q: "p50" | "p95" | "p99") => (s: TelemetryAnswer["series"][0]) =>
    s.requests && s.latency_us ? s.latency_us[q] / 1000 : null;
  const latency: Line[] = [];
  const bands = [];
  for (const [i, [v, va]] of per.entries()) {
    const color = PALETTE[i % PALETTE.length];
    bands.push({ upper: latency.length + 1, lower: latency.length, fill: color + "22" });
    latency.push({ label: `v${v} p50`, color, values: align(va, lat("p50")) });
    latency.push({ label: `v${v} p99`, color, values: align(va, lat("p99")), dash: true });
  }
  const errors: Line[] = per.map(([v, va], i) => ({
    label: `v${v}`,
    color: PALETTE[i % PALETTE.length],
    values: align(va, (s) => (s.requests ? 100 * s.error_rate : null)),
  }));
  const requests: Line[] = per.map(([v, va], i) => ({
    label: `v${v}`,
    color: PALETTE[i % PALETTE.length],
    values: align(va, (s) => s.requests),
  }));
  return (
    <Section title="Telemetry per version" id="model-telemetry" right={pick}>
      <p class="muted">
        {a.devices} devices reporting · {a.totals.requests} requests · one point per {a.step_ms / 1000} s; the band
        spans p50 to p99
      </p>
      <div class="charts">
        <Chart title="latency" unit="ms" x={x} lines={latency} bands={bands} width={560} />
        <Chart title="error rate" unit="%" x={x} lines={errors} />
        <Chart title={`requests per ${a.step_ms / 1000} s`} unit="req" x={x} lines={requests} />
      </div>
      <table>
        <thead>
          <tr>
            <th>Version</th>
            <th>Requests</th>
            <th>Errors</th>
            <th>Error rate</th>
            <th>p50</th>
            <th>p95</th>
            <th>p99</th>
            <th>NaN/Inf</th>
          </tr>
        </thead>
        <tbody>
          {Object.entries(a.versions).map(([v, t]) => (
            <tr key={v} data-version-telemetry={v}>
              <td>v{v}</td>
              <td>{t.requests}</td>
              <td>{t.errors}</td>
              <td>{(100 * t.error_rate).toFixed(2)} %</td>
              <td>{ms(t.latency_us?.p50)}</td>
              <td>{ms(t.latency_us?.p95)}</td>
              <td>{ms(t.latency_us?.p99)}</td>
              <td>{t.non_finite}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </Section>
  );
}
