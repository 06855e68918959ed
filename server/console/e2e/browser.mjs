// What the console's browser scripts share: Debian's Chromium started as the machine allows
// (headless, no sandbox as root, no background network traffic on a closed network), and an
// action clicked through its confirmation dialog.
import { chromium } from "playwright-core";

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/** Clicks the action's button, then its dialog's confirmation; throws the API's refusal. */
export async function act(page, name) {
  await page.locator(`button[data-action="${name}"]`).click();
  const dialog = page.locator(`dialog[data-confirm="${name}"]`);
  await dialog.waitFor();
  await dialog.locator("button[data-confirm-yes]").click();
  // Closed, or the API's refusal shown in the dialog.
  const error = dialog.locator("[data-error]");
  await Promise.race([dialog.waitFor({ state: "hidden" }), error.waitFor()]);
  if (await error.isVisible()) throw new Error(`${name}: ${await error.textContent()}`);
}
