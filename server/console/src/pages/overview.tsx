// The fleet at a glance: devices by state (counted by the server, however large the fleet),
// rollouts running, active alerts, devices waiting to enrol, and the device list a page at a time.
import { post, useLive, type AlertList, type Enrolment, type FleetSummary, type Rollout } from "../api";
import { ago } from "../format";
import { Action, ErrorLine, Labels, Section, useWho } from "../ui";
import { DevicesTable } from "./device";
import { RolloutRow } from "./rollout";

function Tile(props: { label: string; value: number | string; tone?: string; name: string }) {
  return (
    <div class={`tile ${props.tone ?? ""}`} data-tile={props.name}>
      <div class="value">{props.value}</div>
      <div class="muted">{props.label}</div>
    </div>
  );
}

export function Overview() {
  const who = useWho();
  const fleet = useLive<FleetSummary>("/api/v1/fleet", 2000);
  const rollouts = useLive<Rollout[]>("/api/v1/rollouts", 2000);
  const alerts = useLive<AlertList>("/api/v1/alerts", 5000);
  const enrolments = useLive<Enrolment[]>(who?.enrol ? "/api/v1/enrolments" : null, 5000);
  const f = fleet.data;
  const running = (rollouts.data ?? []).filter((r) => r.state === "running" || r.state === "paused");
  const recent = (rollouts.data ?? []).filter((r) => !running.includes(r)).slice(-3).reverse();
  const pending = (enrolments.data ?? []).filter((e) => e.state === "pending");
  return (
    <>
      <Section title="Fleet" id="fleet">
        <ErrorLine error={fleet.error} />
        {f && (
          <div class="tiles">
            <Tile name="devices" label="devices" value={f.devices} />
            <Tile name="online" label="online" value={f.online} tone="ok" />
            <Tile name="offline" label="offline" value={f.devices - f.online} tone={f.devices - f.online ? "bad" : ""} />
            {Object.entries(f.states).map(([k, n]) => (
              <Tile key={k} name={k} label={k} value={n} tone={k === "failed" ? "bad" : k === "active" ? "ok" : "busy"} />
            ))}
            {f.quarantined > 0 && <Tile name="quarantined" label="quarantined" value={f.quarantined} tone="bad" />}
          </div>
        )}
        {f && Object.keys(f.serving).length > 0 && (
          <table class="serving">
            <thead>
              <tr>
                <th>Model</th>
                <th>Serving (devices per version)</th>
              </tr>
            </thead>
            <tbody>
              {Object.entries(f.serving).map(([model, versions]) => (
                <tr key={model} data-serving-model={model}>
                  <td>
                    <a href={`/dashboard/models/${encodeURIComponent(model)}`}>{model}</a>
                  </td>
                  <td>
                    {Object.entries(versions)
                      .map(([v, n]) => `v${v}: ${n}`)
                      .join(" · ")}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
      </Section>
      <Section title="Rollouts" id="rollouts" right={<a href="/dashboard/rollouts">all rollouts</a>}>
        {running.length === 0 && <p class="muted">none running</p>}
        {running.map((r) => (
          <RolloutRow key={r.id} r={r} />
        ))}
        {recent.length > 0 && <h3>Recent</h3>}
        {recent.map((r) => (
          <RolloutRow key={r.id} r={r} />
        ))}
      </Section>
      <Section title="Alerts" id="alerts">
        {(alerts.data?.alerts.length ?? 0) === 0 ? (
          <p class="muted">no active alerts</p>
        ) : (
          <>
            {alerts.data!.versions.map((v) => (
              <div key={`${v.model}:${v.version}`} class="bad" data-alert-version={`${v.model}:${v.version}`}>
                {v.model} v{v.version}: {v.devices} device(s) alerting:{" "}
                {Object.entries(v.kinds)
                  .map(([k, n]) => `${k.replace(/_/g, " ")} on ${n}`)
                  .join(", ")}
              </div>
            ))}
            <table>
              <tbody>
                {alerts
                  .data!.alerts.slice()
                  .reverse()
                  .slice(0, 20)
                  .map((a) => (
                    <tr key={a.id} data-alert={a.id}>
                      <td>
                        <a href={`/dashboard/devices/${encodeURIComponent(a.device)}`}>{a.device}</a>
                      </td>
                      <td>
                        {a.model} v{a.version}
                      </td>
                      <td class="bad">{a.kind.replace(/_/g, " ")}</td>
                      <td>{a.message}</td>
                      <td class="muted">{ago(a.raised_ms / 1000)}</td>
                    </tr>
                  ))}
              </tbody>
            </table>
          </>
        )}
      </Section>
      {who?.enrol && (
        <Section title="Waiting to enrol" id="enrolments">
          <ErrorLine error={enrolments.error} />
          {pending.length === 0 ? (
            <p class="muted">no device is waiting for a decision</p>
          ) : (
            <table>
              <tbody>
                {pending.map((e) => (
                  <tr key={e.device} data-enrolment={e.device}>
                    <td>{e.device}</td>
                    <td class="muted">claim {e.claim ?? "–"}</td>
                    <td>
                      <Labels labels={e.labels ?? {}} />
                    </td>
                    <td class="actions">
                      <Action
                        needs="admin"
                        name={`accept-${e.device}`}
                        label="Accept"
                        confirm={`Accept ${e.device}? It gets a device certificate and joins the fleet.`}
                        run={() => post(`/api/v1/enrolments/${encodeURIComponent(e.device)}/accept`, {})}
                        done={enrolments.reload}
                      />
                      <Action
                        needs="admin"
                        name={`reject-${e.device}`}
                        label="Reject"
                        danger
                        confirm={`Reject ${e.device}? Its claim is refused from now on.`}
                        run={() => post(`/api/v1/enrolments/${encodeURIComponent(e.device)}/reject`, {})}
                        done={enrolments.reload}
                      />
                    </td>
                  </tr>
                ))}
              </tbody>
            </table>
          )}
        </Section>
      )}
      <DevicesTable />
    </>
  );
}
