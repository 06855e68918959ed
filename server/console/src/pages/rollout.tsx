// Rollouts: the list, a rollout's summary (waves and their progress), and its page (criteria,
// members, failures with reasons, the rollback) with pause, resume, abort and cancel.
import { useRoute } from "preact-iso";
import { post, useLive, type Member, type Rollout } from "../api";
import { Chart } from "../chart";
import { duration, utc } from "../format";
import { Action, ErrorLine, Pill, Section } from "../ui";

const COLORS: Record<string, string> = {
  committed: "#1a7f37",
  updating: "#0969da",
  failed: "#cf222e",
  reverted: "#bc4c00",
};

function stateTone(r: Rollout): string {
  return r.state === "aborted" ? "bad" : r.state === "completed" ? "ok" : r.state === "running" ? "busy" : "muted";
}

/** Per wave: how many committed, updating, failed (sent back since or not), sent back. */
function waveCounts(r: Rollout, w: number) {
  const members = r.members.filter((m) => m.wave === w);
  const count = (s: Member["state"]) => members.filter((m) => m.state === s).length;
  return {
    members,
    committed: count("committed"),
    updating: count("updating"),
    failed: members.filter((m) => m.failure).length,
    reverted: count("reverting") + count("reverted"),
  };
}

function Waves(props: { r: Rollout }) {
  const r = props.r;
  const over = ["completed", "aborted", "cancelled"].includes(r.state);
  return (
    <div class="waves">
      {r.wave_sizes.map((_, w) => {
        const c = waveCounts(r, w);
        const n = Math.max(1, c.members.length);
        const parts = [`${c.committed}/${c.members.length} committed`];
        if (c.updating) parts.push(`${c.updating} updating`);
        if (c.failed) parts.push(`${c.failed} failed`);
        if (c.reverted) parts.push(`${c.reverted} sent back`);
        if (w > r.wave && !over) parts.push("waiting");
        const shadows = c.members.map((m) => m.shadow).filter((s) => s != null);
        if (shadows.length) {
          const passed = shadows.filter((s) => s.verdict === "passed").length;
          const failed = shadows.filter((s) => s.verdict === "failed").length;
          const agreements = shadows.map((s) => s.agreement_permille).filter((a) => a != null);
          let text = `shadow: ${passed} passed, ${failed} failed`;
          if (agreements.length) text += `, lowest agreement ${(Math.min(...agreements) / 10).toFixed(1)}%`;
          parts.push(text);
        }
        return (
          <div class="wave" data-wave={w} key={w}>
            <span>{w === 0 ? "canary" : `wave ${w + 1}`}</span>
            <div class="bar">
              {(["committed", "updating", "failed", "reverted"] as const).map((k) => (
                <i key={k} style={{ width: `${(100 * c[k]) / n}%`, background: COLORS[k] }} />
              ))}
            </div>
            <span>{parts.join(", ")}</span>
          </div>
        );
      })}
    </div>
  );
}

/** A rollout in a few lines, with a link to its page. */
export function RolloutRow(props: { r: Rollout }) {
  const r = props.r;
  return (
    <div class="rollout" data-rollout={r.id}>
      <div>
        <a href={`/dashboard/rollouts/${r.id}`}>
          <strong>
            Rollout {r.id}: {r.spec.model} v{r.spec.version} → {r.spec.group}
          </strong>
        </a>{" "}
        <Pill tone={stateTone(r)}>
          <span data-state={r.state}>{r.state}</span>
        </Pill>
        {r.reason && <span class="bad"> {r.reason}</span>}
        <span class="muted">
          {" "}
          · by {r.by} · {r.members.length} devices · started {utc(r.created)}
          {r.ended ? `, ended ${utc(r.ended)} (${duration(r.ended - r.created)})` : ""}
        </span>
      </div>
      <Waves r={r} />
    </div>
  );
}

export function RolloutsPage() {
  const rollouts = useLive<Rollout[]>("/api/v1/rollouts", 3000);
  const list = (rollouts.data ?? []).slice().reverse();
  return (
    <Section title="Rollouts" id="rollouts">
      <ErrorLine error={rollouts.error} />
      {list.length === 0 ? <p class="muted">none yet</p> : list.map((r) => <RolloutRow key={r.id} r={r} />)}
    </Section>
  );
}

export function RolloutPage() {
  const { params } = useRoute();
  const id = Number(params.id);
  const live = useLive<Rollout>(`/api/v1/rollouts/${id}`, 1500);
  const r = live.data;
  if (!r) return <ErrorLine error={live.error} />;
  const over = ["completed", "aborted", "cancelled"].includes(r.state);
  const act = (action: string) => () => post(`/api/v1/rollouts/${r.id}/${action}`, {});
  const s = r.spec;
  const got = r.members.reduce((n, m) => n + (m.transferred?.received_bytes ?? 0), 0);
  const reused = r.members.reduce((n, m) => n + (m.transferred?.reused_bytes ?? 0), 0);
  const moved = r.members.filter((m) => m.state !== "waiting" && m.state !== "skipped");
  const back = r.members.filter((m) => m.state === "reverting" || m.state === "reverted");
  const t = r.timeline;
  const x = t.map((c) => c.at);
  if (t.length && !over) x.push(Date.now() / 1000);
  const series = (k: string) => {
    const v: (number | null)[] = t.map((c) => c[k] ?? 0);
    if (t.length && !over) v.push(v[v.length - 1]);
    return v;
  };
  return (
    <>
      <Section
        title={`Rollout ${r.id}: ${s.model} v${s.version} → ${s.group}`}
        id="rollout"
        right={
          !over && (
            <div class="row">
              {r.state === "running" && (
                <Action needs="deployer" label="Pause" confirm={`Pause rollout ${r.id}? No further wave starts.`} run={act("pause")} done={live.reload} />
              )}
              {r.state === "paused" && (
                <Action needs="deployer" label="Resume" confirm={`Resume rollout ${r.id}?`} run={act("resume")} done={live.reload} />
              )}
              <Action
                needs="deployer"
                label="Abort"
                danger
                confirm={
                  s.auto_rollback
                    ? `Abort rollout ${r.id}? The ${moved.length} devices it moved go back to the version they served before.`
                    : `Abort rollout ${r.id}? Devices it moved stay where they are (no automatic rollback).`
                }
                run={act("abort")}
                done={live.reload}
              />
              <Action
                needs="deployer"
                label="Cancel"
                confirm={`Cancel rollout ${r.id}? It stops where it is and no device is sent back.`}
                run={act("cancel")}
                done={live.reload}
              />
            </div>
          )
        }
      >
        <p>
          <Pill tone={stateTone(r)}>
            <span data-state={r.state}>{r.state}</span>
          </Pill>
          {r.reason && (
            <span class="bad" data-reason>
              {" "}
              {r.reason}
            </span>
          )}{" "}
          <span class="muted" data-times={r.id}>
            by {r.by} · started {utc(r.created)}
            {r.ended ? `, ended ${utc(r.ended)} (${duration(r.ended - r.created)})` : `, running ${duration(Date.now() / 1000 - r.created)}`}
          </span>
        </p>
        <dl class="criteria">
          <dt>waves</dt>
          <dd>
            {s.waves.join(", ")} (cumulative: {r.wave_sizes.join(", then ")} devices)
          </dd>
          <dt>a wave passes when</dt>
          <dd>
            {s.success_percent}% commit within {duration(s.wave_timeout_secs)}
          </dd>
          <dt>abort when</dt>
          <dd>
            more than {s.max_failures} fail
            {s.max_failure_percent != null ? ` or over ${s.max_failure_percent}%` : ""}
            {s.abort_on_alerts ? ", or a drift alert is raised" : ""}
          </dd>
          <dt>automatic rollback</dt>
          <dd data-auto-rollback={String(s.auto_rollback)}>
            {s.auto_rollback
              ? back.length
                ? `${back.filter((m) => m.state === "reverted").length} of ${back.length} devices sent back`
                : "on (none sent back)"
              : "off"}
          </dd>
        </dl>
        <Waves r={r} />
        {got > 0 && (
          <p class="muted" data-transferred={r.id}>
            {(got / 1e6).toFixed(1)} MB on the devices: {((got - reused) / 1e6).toFixed(1)} MB downloaded,{" "}
            {(reused / 1e6).toFixed(1)} MB reused from what they held ({((100 * reused) / got).toFixed(0)} %)
          </p>
        )}
        <div class="charts">
          <Chart
            title="devices by state"
            unit="devices"
            x={x}
            floor={r.members.length}
            lines={Object.entries(COLORS).map(([k, c]) => ({ label: k, color: c, values: series(k), steps: true }))}
            width={640}
          />
        </div>
      </Section>
      <Section title="Devices" id="members">
        <table>
          <thead>
            <tr>
              <th>Device</th>
              <th>Wave</th>
              <th>From</th>
              <th>State</th>
              <th>Failure</th>
            </tr>
          </thead>
          <tbody>
            {r.members.map((m) => (
              <tr key={m.device} data-member={m.device} data-member-state={m.state}>
                <td>
                  <a href={`/dashboard/devices/${encodeURIComponent(m.device)}`}>{m.device}</a>
                </td>
                <td>{m.wave === 0 ? "canary" : m.wave + 1}</td>
                <td>{m.previous != null ? `v${m.previous}` : "–"}</td>
                <td class={m.failure ? "bad" : m.state === "committed" ? "ok" : ""}>{m.state}</td>
                <td class="bad">{m.failure ?? m.reason ?? ""}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </Section>
    </>
  );
}
