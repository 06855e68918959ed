// How long the console's overview takes to be usable: from navigation until the fleet's count
// (`DEVICES`) and the first page of the device table are on screen. Loads it `RUNS` times in a
// fresh browser context each (no cache) and prints each time and the median, as JSON on the
// last line. Started by tests/src/bin/bench-console.rs.
//   CONSOLE_URL, TOKEN (optional), DEVICES, RUNS
import { launch } from "./browser.mjs";

const base = process.env.CONSOLE_URL;
const devices = process.env.DEVICES;
const runs = Number(process.env.RUNS || 5);

const browser = await launch();
const times = [];
try {
  for (let i = 0; i < runs; i++) {
    const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
    const page = await context.newPage();
    page.setDefaultTimeout(60_000);
    const hash = process.env.TOKEN ? `#token=${process.env.TOKEN}` : "";
    const start = Date.now();
    await page.goto(`${base}/dashboard${hash}`);
    await page.locator('[data-tile="devices"] .value', { hasText: devices }).waitFor();
    await page.locator("tr[data-device]").nth(Math.min(49, Number(devices) - 1)).waitFor();
    await page.locator(`[data-total="${devices}"]`).waitFor();
    const ms = Date.now() - start;
    times.push(ms);
    console.log(`load ${i + 1}: ${ms} ms`);
    await context.close();
  }
} finally {
  await browser.close();
}
const sorted = times.slice().sort((a, b) => a - b);
console.log(JSON.stringify({ devices: Number(devices), times, median_ms: sorted[Math.floor(sorted.length / 2)] }));
