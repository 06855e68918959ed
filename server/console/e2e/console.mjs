// The console in a real browser (Debian's Chromium driven by playwright-core), as an operator
// uses it: sign in with a token, start a rollout from the model page, follow it live, abort it,
// see the canary sent back on its device page; a viewer sees the actions disabled and is refused
// if it forces the call; the page says when the server stops answering.
//
// Started by tests/tests/console.rs, which sets up the fleet and passes:
//   CONSOLE_URL       the server's base URL
//   DEPLOYER_TOKEN    a deployer's token (named alice)
//   VIEWER_TOKEN      a viewer's token (named bob)
//   MODEL, DEVICES    the model published as v1 (serving everywhere) and v2, and the devices
//   SCREENSHOTS       optional: a folder for a screenshot of each page
// Every wait is bounded; the first that fails ends the script with a non-zero status.
import { act, launch } from "./browser.mjs";

const base = process.env.CONSOLE_URL;
const model = process.env.MODEL;
const devices = process.env.DEVICES.split(",");
const shots = process.env.SCREENSHOTS || "";
const WAIT = 60_000;

const step = (what) => console.log(`console: ${what}`);

const browser = await launch();

async function shot(page, name) {
  if (!shots) return;
  await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
  step(`screenshot ${shots}/${name}.png`);
}

async function signIn(token) {
  const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on("pageerror", (e) => console.error(`console: page error: ${e.message}`));
  await page.goto(`${base}/dashboard`);
  await page.locator('input[name="token"]').fill(token);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("header .who").waitFor();
  return page;
}

try {
  // A deployer signs in: the overview counts the fleet.
  let page = await signIn(process.env.DEPLOYER_TOKEN);
  await page.locator('[data-role="deployer"]').waitFor();
  await page.locator('[data-tile="devices"] .value', { hasText: String(devices.length) }).waitFor();
  await page.locator('[data-tile="online"] .value', { hasText: String(devices.length) }).waitFor();
  for (const d of devices) await page.locator(`tr[data-device="${d}"]`).waitFor();
  await page.locator(`[data-serving-model="${model}"]`, { hasText: `v1: ${devices.length}` }).waitFor();
  step("overview: every device online, serving v1");
  await shot(page, "overview");

  // The model page: both versions, v1 serving everywhere; a rollout of v2 started from it.
  await page.locator(`[data-serving-model="${model}"] a`).click();
  await page.locator('tr[data-version="2"] [data-stage="candidate"]').waitFor();
  await page.locator(`tr[data-version="1"] [data-serving-count="${devices.length}"]`).waitFor();
  await page.locator('select[name="rollout-version"]').selectOption("2");
  await page.locator('input[name="rollout-group"]').fill("hw=jetson");
  await page.locator('input[name="rollout-waves"]').fill("1, 100%");
  // The canary stays on probation until the operator acts.
  await page.locator('input[name="rollout-probation"]').fill("600");
  await act(page, "start-rollout");
  await page.waitForURL(/\/dashboard\/rollouts\/\d+$/);
  const id = page.url().split("/").pop();
  step(`rollout ${id} started from the model page`);

  // Followed live: the canary moves to v2 without a reload.
  await page.locator('[data-state="running"]').first().waitFor();
  const canary = page.locator('tr[data-member-state="updating"]');
  await canary.waitFor();
  const canaryId = await canary.getAttribute("data-member");
  await page.locator('[data-wave="0"]', { hasText: "1 updating" }).waitFor();
  step(`the canary ${canaryId} is on probation with v2, seen live`);
  await shot(page, "rollout");

  // Aborted from the page: the canary goes back to v1.
  await act(page, "abort");
  await page.locator('[data-state="aborted"]').first().waitFor();
  await page.locator(`tr[data-member="${canaryId}"][data-member-state="reverted"]`).waitFor();
  await page.locator('[data-auto-rollback="true"]', { hasText: "1 of 1 devices sent back" }).waitFor();
  step("aborted; the canary was sent back");

  // The canary's page: serving v1 again, the rollout in its history.
  await page.locator(`tr[data-member="${canaryId}"] a`).click();
  await page.locator(`[data-slots="${model}"] [data-serving="1"]`).waitFor();
  await page.locator("tr[data-history]", { hasText: `rollout ${id}: ${model} v2` }).first().waitFor();
  await page.locator("tr[data-history]", { hasText: "back to v1" }).first().waitFor();
  step(`${canaryId}'s page: serving v1, the rollback in its history`);
  await shot(page, "device");
  // The model's page: telemetry of the traffic that went on meanwhile, over the last 15 minutes.
  await page.goto(`${base}/dashboard/models/${model}`);
  await page.locator('select[name="telemetry-window"]').selectOption({ label: "last 15 min" });
  await page.locator('tr[data-version-telemetry="1"]').waitFor();
  step("the model's page charts its versions' telemetry");
  await shot(page, "model");

  // Staleness: with the server out of reach, the page says since when its data is.
  await page.route("**/api/**", (route) => route.abort("connectionrefused"));
  await page.locator('[data-link="stale"]').waitFor({ timeout: 20_000 });
  await page.unroute("**/api/**");
  await page.locator('[data-link="live"]').waitFor({ timeout: 20_000 });
  step("out of reach: the page said so, and went live again");
  await page.context().close();

  // A viewer: the same pages, every action disabled; forcing the call is refused.
  page = await signIn(process.env.VIEWER_TOKEN);
  await page.locator('[data-role="viewer"]').waitFor();
  await page.goto(`${base}/dashboard/models/${model}`);
  await page.locator('button[data-action="promote-2"]').waitFor();
  if (!(await page.locator('button[data-action="promote-2"]').isDisabled())) throw new Error("a viewer may click promote");
  if (await page.locator("#start-rollout").count()) throw new Error("a viewer is offered the rollout form");
  const forced = await page.evaluate(async ({ token, model }) => {
    const r = await fetch(`/api/v1/models/${encodeURIComponent(model)}/2/promote`, {
      method: "POST",
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: "{}",
    });
    return r.status;
  }, { token: process.env.VIEWER_TOKEN, model });
  if (forced !== 403) throw new Error(`a viewer forcing promote got ${forced}, not 403`);
  await page.goto(`${base}/dashboard/rollouts/${id}`);
  await page.locator('[data-state="aborted"]').first().waitFor();
  step("viewer: actions disabled, a forced call refused with 403");
  await page.context().close();
  console.log("console: ok");
} catch (e) {
  console.error(`console: FAILED: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
