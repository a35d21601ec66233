// Drives Debian's Chromium through playwright-core for e2e/tests/browser.rs: reads a plan (JSON,
// the first argument), runs its steps on one page, and prints one JSON result on stdout.
//
// Plan: {"chromium": "/usr/bin/chromium", "steps": [step…], "timeout_ms"?: default wait}
// Steps:
//   {"goto": url}                      load a page
//   {"fill": selector, "value": text}  type into an input
//   {"click": selector}
//   {"wait": js, "what": text, "timeout_ms"?, "allow_errors"?}
//                                      until the page expression `js` is truthy; fails at once when
//                                      the page recorded an error (window.kiln.errors), unless allowed
//   {"sleep_ms": n}
//   {"snapshot": name}                 keep window.kiln and the rendered transcript under `name`
// Result: {"ok", "browser", "launch_ms", "steps_ms", "snapshots", "console", "page_errors",
//          "failed_requests"} and, when not ok, "error", "step" and "state" (the page's last state).
// Exit code 0 when ok, 1 when a step failed, 2 when Chromium could not be started.

import { chromium } from 'playwright-core';

const plan = JSON.parse(process.argv[2] ?? '{}');
const defaultTimeout = plan.timeout_ms ?? 30000;
const out = { ok: false, steps_ms: [], snapshots: {}, console: [], page_errors: [], failed_requests: [] };

function finish(code) {
  process.stdout.write(JSON.stringify(out) + '\n');
  process.exitCode = code;
}

async function state(page) {
  try {
    return await page.evaluate(() => ({
      kiln: window.kiln ? JSON.parse(JSON.stringify(window.kiln)) : null,
      transcript: [...document.querySelectorAll('#messages li')].map((li) => ({
        role: li.dataset.role,
        created_at: li.dataset.createdAt,
        text: li.textContent,
      })),
      error_text: document.getElementById('error')?.textContent ?? null,
    }));
  } catch (e) {
    return { unreadable: String(e) };
  }
}

const started = Date.now();
let browser;
try {
  browser = await chromium.launch({
    executablePath: plan.chromium ?? '/usr/bin/chromium',
    headless: true,
    timeout: 60000,
    // What this machine's Chromium needs (PLATFORM.md): no sandbox as root, no GPU, and nothing
    // that reaches for the network on its own. playwright gives it a fresh profile directory.
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
} catch (e) {
  out.error = `Chromium did not start (${plan.chromium ?? '/usr/bin/chromium'}; scripts/setup installs it): ${e.message}`;
  finish(2);
  process.exit();
}
out.launch_ms = Date.now() - started;
out.browser = browser.version();

const context = await browser.newContext();
const page = await context.newPage();
page.on('console', (m) => out.console.push({ type: m.type(), text: m.text(), url: page.url() }));
page.on('pageerror', (e) => out.page_errors.push(String(e)));
page.on('requestfailed', (r) => out.failed_requests.push({ method: r.method(), url: r.url(), failure: r.failure()?.errorText ?? null }));

let code = 0;
for (const [i, step] of (plan.steps ?? []).entries()) {
  const t = Date.now();
  try {
    if ('goto' in step) {
      await page.goto(step.goto, { waitUntil: 'load', timeout: defaultTimeout });
    } else if ('fill' in step) {
      await page.fill(step.fill, step.value, { timeout: defaultTimeout });
    } else if ('click' in step) {
      await page.click(step.click, { timeout: defaultTimeout });
    } else if ('wait' in step) {
      const expr = step.allow_errors
        ? step.wait
        : `(() => { if (window.kiln && window.kiln.errors.length) throw new Error('the page failed: ' + window.kiln.errors.join('; ')); return (${step.wait}); })()`;
      await page.waitForFunction(expr, null, { timeout: step.timeout_ms ?? defaultTimeout, polling: 50 });
    } else if ('sleep_ms' in step) {
      await page.waitForTimeout(step.sleep_ms);
    } else if ('snapshot' in step) {
      out.snapshots[step.snapshot] = await state(page);
    } else {
      throw new Error(`unknown step ${JSON.stringify(step)}`);
    }
  } catch (e) {
    const what = step.what ? ` (${step.what})` : '';
    out.error = `step ${i} ${JSON.stringify(step).slice(0, 300)}${what}: ${e.message.split('\n')[0]}`;
    out.step = i;
    out.state = await state(page);
    code = 1;
    break;
  }
  out.steps_ms.push(Date.now() - t);
}
out.ok = code === 0;
await browser.close().catch(() => {});
finish(code);
