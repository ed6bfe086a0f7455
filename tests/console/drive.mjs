// Drives the console in headless Chromium (Debian's, through playwright-core)
// for `tests/console.rs`: log in, find the failed event, see its failure,
// replay it to the plugin the test has fixed, see it succeed; see that text a
// sender and a plugin wrote stays text; visit the dead letters and plugins
// pages; compare the plugin's shadow candidate with it. Saves a screenshot
// of each page. Prints one line per step; exits 1 naming the step that
// failed.
//
// Environment: CONSOLE_URL, ADMIN_TOKEN, FAILED_EVENT, HOSTILE_EVENT,
// SHADOW_EVENT, PLUGIN, SCREENSHOTS (a directory), CHROMIUM (the browser's
// path).

import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const [url, token, failed, hostile, shadowed, plugin, shots] = [
  "CONSOLE_URL", "ADMIN_TOKEN", "FAILED_EVENT", "HOSTILE_EVENT", "SHADOW_EVENT", "PLUGIN", "SCREENSHOTS",
].map(env);

let step = "start";
const check = (what, ok, detail = "") => {
  if (!ok) throw new Error(`${what}${detail ? ": " + detail : ""}`);
  console.log(`ok ${what}`);
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("dialog", (d) => {
    problems.push(`a dialog opened: ${d.message()}`);
    d.dismiss();
  });
  const pwned = () => page.evaluate(() => window.__pwned);

  step = "log in";
  await page.goto(url + "/");
  await page.waitForSelector("#login:not([hidden])");
  check("the console asks for the token", true);
  await page.fill("#token", "not-the-token-at-all");
  await page.click("#login button");
  await page.waitForSelector("#login:not([hidden])");
  check("a wrong token is asked for again", await page.isVisible("#login"));
  await page.fill("#token", token);
  await page.click("#login button");
  await page.waitForSelector("tr.event-row");
  check("the events list shows", (await page.locator("tr.event-row").count()) >= 2);
  await page.screenshot({ path: `${shots}/events.png`, fullPage: true });

  step = "live";
  check("the list says it is live", (await page.textContent("#live")) === "live");

  step = "dead letters before";
  await page.click("#nav-dlq");
  await page.waitForSelector("tr.dead-row");
  check("the failed event is in the dead letters", (await page.textContent("#dead")).includes(failed));
  await page.screenshot({ path: `${shots}/dead-letters.png`, fullPage: true });
  await page.click("#nav-events");
  await page.waitForSelector("tr.event-row");

  step = "search";
  await page.fill("#search", failed);
  await page.click(".filters button[type=submit]");
  await page.waitForFunction(
    (key) => [...document.querySelectorAll("tr.event-row .event-key")].map((a) => a.textContent).join() === key,
    failed,
  );
  check("searching by event id finds only that event", true);

  step = "open the event";
  await page.click(`tr.event-row .event-key`);
  await page.waitForSelector("#event-key");
  check("the event page names it", (await page.textContent("#event-key")) === failed);
  const row = page.locator(`tr.delivery-row[data-plugin="${plugin}"]`);
  const rowText = await row.textContent();
  check("its delivery is dead", rowText.includes("dead"), rowText);
  check("the failure kind shows", rowText.includes("plugin-error"), rowText);
  check("the failure message shows", rowText.includes("refused on purpose"), rowText);
  const body = await page.textContent("#body");
  check("the body is shown, pretty-printed", body.includes('\n  "type": "order.created"'), body);
  check("a sender's <script> is shown as text", body.includes("<script>window.__pwned=1</script>"), body);
  check("and does not run", (await pwned()) === undefined);
  await page.screenshot({ path: `${shots}/event-dead.png`, fullPage: true });

  step = "replay";
  await row.locator("button.replay-one").click();
  await page.waitForSelector("#notice:not([hidden])");
  check("replay is confirmed", (await page.textContent("#notice")).startsWith("Replayed 1"));
  // The fixed plugin runs it: reload the event until it says so.
  let status = "";
  for (let i = 0; i < 100 && !status.includes("succeeded"); i++) {
    await page.waitForTimeout(200);
    await page.evaluate(() => window.dispatchEvent(new HashChangeEvent("hashchange")));
    await page.waitForSelector(`tr.delivery-row[data-plugin="${plugin}"]`);
    status = await page.locator(`tr.delivery-row[data-plugin="${plugin}"]`).textContent();
  }
  check("after the replay the delivery succeeded", status.includes("succeeded"), status);
  await page.screenshot({ path: `${shots}/event-replayed.png`, fullPage: true });

  step = "hostile text";
  await page.goto(`${url}/#/event/${encodeURIComponent(hostile)}`);
  // Only the hash changed: the previous event's page shows until the new
  // one renders.
  const shown = (key) => document.querySelector("#event-key")?.textContent === key;
  await page.waitForFunction(shown, hostile, { timeout: 10000 }).catch(() => {});
  check("an event id holding markup is shown as text", (await page.textContent("#event-key")) === hostile);
  const logs = await page.locator(`tr.delivery-row[data-plugin="${plugin}"] pre.logs`).textContent();
  check("a plugin's log line holding markup is shown as text", logs.includes(`misbehave ok "${hostile}"`), logs);
  check("no script a sender or plugin wrote ran", (await pwned()) === undefined);
  check("no image was made of their text", (await page.locator("main img").count()) === 0);

  step = "dead letters";
  await page.click("#nav-dlq");
  await page.waitForSelector("#dead");
  const dead = await page.textContent("#dead");
  check("the replayed delivery left the dead letters", !dead.includes(failed), dead);

  step = "plugins";
  await page.click("#nav-plugins");
  await page.waitForSelector(`tr.plugin-row[data-plugin="${plugin}"]`);
  const pluginRow = await page.locator(`tr.plugin-row[data-plugin="${plugin}"]`).textContent();
  check("the plugin is listed active", pluginRow.includes("active"), pluginRow);
  await page.screenshot({ path: `${shots}/plugins.png`, fullPage: true });

  step = "shadow";
  await page.click(`tr.plugin-row[data-plugin="${plugin}"] a.shadowing`);
  await page.waitForSelector("tr.shadow-row");
  const summary = await page.textContent("#shadow-summary");
  check("the shadow page compares the candidate with the live plugin", summary.includes("1 succeeded live but failed"), summary);
  const run = await page.locator("tr.shadow-row").first().textContent();
  check("a shadow run shows the event and both outcomes", run.includes(shadowed) && run.includes("refused on purpose") && run.includes("ok"), run);
  check("its markup stayed text", (await pwned()) === undefined && (await page.locator("main img").count()) === 0);
  await page.screenshot({ path: `${shots}/shadow.png`, fullPage: true });

  step = "no page errors";
  check("the page raised no errors and opened no dialogs", problems.length === 0, problems.join("; "));
} catch (error) {
  console.error(`failed at step "${step}": ${error.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
