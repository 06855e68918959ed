// Pieces every page uses: actions with a confirmation, role checks, the link indicator.
import type { ComponentChildren } from "preact";
import { createContext } from "preact";
import { useContext, useEffect, useRef, useState } from "preact/hooks";
import { link, may, type Role, type Whoami } from "./api";
import { ago } from "./format";

/** Who this tab's token is. */
export const WhoContext = createContext<Whoami | null>(null);

export function useWho(): Whoami | null {
  return useContext(WhoContext);
}

/**
 * A button for an action that changes the fleet: disabled (and saying why) when the token's role
 * may not do it; else it asks for confirmation in a dialog, runs `run`, and shows the error the
 * API gave, if any.
 */
export function Action(props: {
  needs: Role;
  label: string;
  /** What the dialog asks. */
  confirm: string;
  run: () => Promise<unknown>;
  danger?: boolean;
  done?: () => void;
  name?: string;
}) {
  const who = useWho();
  const { needs, label, confirm, run, danger, done, name } = props;
  const dialog = useRef<HTMLDialogElement>(null);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const allowed = may(who, needs);
  const go = async () => {
    setBusy(true);
    setError(null);
    try {
      await run();
      dialog.current?.close();
      done?.();
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    } finally {
      setBusy(false);
    }
  };
  return (
    <>
      <button
        class={danger ? "danger" : ""}
        data-action={name ?? label.toLowerCase()}
        disabled={!allowed}
        title={allowed ? "" : `needs the ${needs} role; this token is a ${who?.role ?? "?"}`}
        onClick={() => {
          setError(null);
          dialog.current?.showModal();
        }}
      >
        {label}
      </button>
      <dialog ref={dialog} data-confirm={name ?? label.toLowerCase()}>
        <p>{confirm}</p>
        {error && (
          <p class="bad" data-error>
            {error}
          </p>
        )}
        <div class="row">
          <button class={danger ? "danger" : "primary"} data-confirm-yes disabled={busy} onClick={go}>
            {busy ? "…" : label}
          </button>
          <button data-confirm-no onClick={() => dialog.current?.close()}>
            Cancel
          </button>
        </div>
      </dialog>
    </>
  );
}

export function Section(props: { title: string; children: ComponentChildren; id?: string; right?: ComponentChildren }) {
  return (
    <section id={props.id}>
      <div class="section-head">
        <h2>{props.title}</h2>
        {props.right}
      </div>
      {props.children}
    </section>
  );
}

/** How fresh the page is: "live", or since when the server has not answered. */
export function LinkState() {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const t = window.setInterval(() => setNow(Date.now()), 1000);
    return () => window.clearInterval(t);
  }, []);
  const l = link.value;
  if (l.failing_since == null && l.ok_at > 0 && now - l.ok_at < 10_000) {
    return (
      <span class="link ok" data-link="live">
        ● live
      </span>
    );
  }
  if (l.ok_at === 0 && l.failing_since == null) return <span class="link muted">connecting…</span>;
  return (
    <span class="link bad" data-link="stale" title={l.error ?? ""}>
      ● server unreachable: data from {l.ok_at ? ago(l.ok_at / 1000, now) : "never"}
    </span>
  );
}

export function Pill(props: { tone: string; children: ComponentChildren; title?: string }) {
  return (
    <span class={`pill ${props.tone}`} title={props.title}>
      {props.children}
    </span>
  );
}

export function Labels(props: { labels: Record<string, string> }) {
  return (
    <>
      {Object.entries(props.labels).map(([k, v]) => (
        <span class="label" key={k}>
          {k}={v}
        </span>
      ))}
    </>
  );
}

export function ErrorLine(props: { error: string | null }) {
  return props.error ? <p class="bad">{props.error}</p> : null;
}
