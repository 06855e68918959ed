// Enrolment decisions from the console: devices held for an operator are listed on the
// overview; one is accepted and one rejected there, each after a confirmation.
// Started by tests/tests/enrolment.rs with:
//   CONSOLE_URL, TOKEN (optional: an admin's), ACCEPT and REJECT (device ids waiting)
import { act, launch } from "./browser.mjs";

const base = process.env.CONSOLE_URL;
const step = (what) => console.log(`console: ${what}`);
const browser = await launch();


try {
  const page = await browser.newPage();
  page.setDefaultTimeout(60_000);
  const hash = process.env.TOKEN ? `#token=${process.env.TOKEN}` : "";
  await page.goto(`${base}/dashboard${hash}`);
  for (const d of [process.env.ACCEPT, process.env.REJECT]) {
    await page.locator(`tr[data-enrolment="${d}"]`).waitFor();
  }
  step("both devices wait for a decision on the overview");
  if (process.env.SCREENSHOTS) {
    await page.screenshot({ path: `${process.env.SCREENSHOTS}/enrolment.png`, fullPage: true });
  }
  await act(page, `accept-${process.env.ACCEPT}`);
  await page.locator(`tr[data-enrolment="${process.env.ACCEPT}"]`).waitFor({ state: "detached" });
  step(`${process.env.ACCEPT} accepted`);
  await act(page, `reject-${process.env.REJECT}`);
  await page.locator(`tr[data-enrolment="${process.env.REJECT}"]`).waitFor({ state: "detached" });
  step(`${process.env.REJECT} rejected`);
  console.log("console: ok");
} catch (e) {
  console.error(`console: FAILED: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
