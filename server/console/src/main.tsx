// The operator console: a single-page app under /dashboard, reading and acting only through the
// operator API with the token of this tab's session.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { LocationProvider, Route, Router } from "preact-iso";
import { get, setToken, token, unauthorized, type Whoami } from "./api";
import { LinkState, WhoContext } from "./ui";
import { Overview } from "./pages/overview";
import { DevicePage, DevicesPage } from "./pages/device";
import { ModelPage, ModelsPage } from "./pages/model";
import { RolloutPage, RolloutsPage } from "./pages/rollout";
import "./style.css";

// A link may carry the token (`/dashboard#token=…`): it moves to this tab's session storage and
// out of the address bar.
const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromHash) {
  setToken(fromHash);
  history.replaceState(null, "", location.pathname + location.search);
}

function Login(props: { onToken: () => void; error: string | null }) {
  const [value, setValue] = useState("");
  return (
    <main class="login">
      <section>
        <h2>Sign in</h2>
        <p class="muted">This server needs an API token (its token file names each token and its role).</p>
        <form
          onSubmit={(e) => {
            e.preventDefault();
            setToken(value.trim());
            unauthorized.value = false;
            props.onToken();
          }}
        >
          <input
            name="token"
            type="password"
            autocomplete="off"
            placeholder="API token"
            value={value}
            onInput={(e) => setValue((e.target as HTMLInputElement).value)}
          />
          <button class="primary" type="submit">
            Sign in
          </button>
        </form>
        {props.error && <p class="bad">{props.error}</p>}
      </section>
    </main>
  );
}

function NotFound() {
  return (
    <p>
      No such page. <a href="/dashboard">Overview</a>
    </p>
  );
}

function App() {
  const [who, setWho] = useState<Whoami | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [attempt, setAttempt] = useState(0);
  useEffect(() => {
    get<Whoami>("/api/v1/whoami")
      .then((w) => {
        setWho(w);
        setError(null);
      })
      .catch((e) => {
        setWho(null);
        setError(token() ? String(e.message ?? e) : null);
      });
  }, [attempt]);

  if (unauthorized.value || (!who && error)) {
    return <Login onToken={() => setAttempt((a) => a + 1)} error={error} />;
  }
  if (!who) return <p class="muted">loading…</p>;
  return (
    <WhoContext.Provider value={who}>
    <LocationProvider scope="/dashboard">
      <header>
        <h1>
          <a href="/dashboard">modelcast</a>
        </h1>
        <nav>
          <a href="/dashboard">Overview</a>
          <a href="/dashboard/devices">Devices</a>
          <a href="/dashboard/models">Models</a>
          <a href="/dashboard/rollouts">Rollouts</a>
        </nav>
        <LinkState />
        <span class="who" data-role={who.role}>
          {who.name ?? "open API"} · {who.role}
          {who.tokens && (
            <button
              class="link-button"
              onClick={() => {
                setToken(null);
                unauthorized.value = true;
              }}
            >
              sign out
            </button>
          )}
        </span>
      </header>
      <main>
        <Router>
          <Route path="/dashboard" component={Overview} />
          <Route path="/dashboard/devices" component={DevicesPage} />
          <Route path="/dashboard/devices/:id" component={DevicePage} />
          <Route path="/dashboard/models" component={ModelsPage} />
          <Route path="/dashboard/models/:name" component={ModelPage} />
          <Route path="/dashboard/rollouts" component={RolloutsPage} />
          <Route path="/dashboard/rollouts/:id" component={RolloutPage} />
          <Route default component={NotFound} />
        </Router>
      </main>
    </LocationProvider>
    </WhoContext.Provider>
  );
}

render(<App />, document.getElementById("app")!);
