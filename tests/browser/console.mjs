// Headless-Chromium test of the web console served by `midcall serve`.
//
// Env: BASE_URL (http://127.0.0.1:PORT), ADMIN_KEY, OUT_DIR (screenshots),
//      TIMEOUT_MS (optional, default 30000).
// Prints one progress line per step on stdout and `console test: ok` at the end;
// on a failure prints the step and the reason on stderr and exits 1.
import { chromium } from 'playwright-core';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const COOKIE = 'midcall_console';
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

function die(msg) {
  process.stderr.write(`console test: FAILED: ${msg}\n`);
  process.exit(1);
}

const BASE_URL = (process.env.BASE_URL || '').replace(/\/+$/, '');
const ADMIN_KEY = process.env.ADMIN_KEY || '';
const OUT_DIR = process.env.OUT_DIR || '';
const TIMEOUT_MS = Number(process.env.TIMEOUT_MS || 30000);
if (!BASE_URL) die('BASE_URL is not set');
if (!ADMIN_KEY) die('ADMIN_KEY is not set');
if (!OUT_DIR) die('OUT_DIR is not set');
if (!Number.isFinite(TIMEOUT_MS) || TIMEOUT_MS <= 0) die(`bad TIMEOUT_MS: ${process.env.TIMEOUT_MS}`);
let base;
try {
  base = new URL(BASE_URL);
} catch {
  die(`BASE_URL is not a URL: ${BASE_URL}`);
}
if (!['127.0.0.1', 'localhost', '[::1]'].includes(base.hostname)) {
  die(`BASE_URL must point at loopback (127.0.0.1), got ${base.hostname}`);
}
mkdirSync(OUT_DIR, { recursive: true });

class StepError extends Error {}
function check(cond, msg) {
  if (!cond) throw new StepError(msg);
}
const path = (page) => decodeURIComponent(new URL(page.url()).pathname);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let current = '';
async function step(name, fn) {
  current = name;
  const t0 = Date.now();
  const r = await fn();
  console.log(`step ${name}: ok (${Date.now() - t0} ms)`);
  return r;
}

// Values that must never appear in a page (the admin key, inbound keys...), comma-separated.
const SECRETS = (process.env.SECRETS || '').split(',').filter((s) => s.length > 0);

async function shot(page, file, fullPage = true) {
  const html = await page.content();
  for (const s of [ADMIN_KEY, ...SECRETS]) {
    check(!html.includes(s), `${path(page)} shows a secret`);
  }
  await page.screenshot({ path: join(OUT_DIR, file), fullPage });
}

async function count(page, sel) {
  return page.locator(sel).count();
}

async function text(page, sel) {
  const n = await count(page, sel);
  check(n >= 1, `no element ${sel} on ${path(page)}`);
  return (await page.locator(sel).first().innerText()).trim();
}

async function hasLogout(page) {
  const n = await count(page, 'form#logout button');
  check(n >= 1, `no form#logout with a button on ${path(page)}`);
}

async function consoleCookie(context) {
  // All cookies of the (fresh) profile, whatever their Path (/ or /console).
  return (await context.cookies()).find((c) => c.name === COOKIE);
}

async function main() {
  const userDataDir = mkdtempSync(join(tmpdir(), 'midcall-chromium-'));
  let context;
  const offHost = [];
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: ARGS,
      viewport: { width: 1280, height: 800 },
      timeout: TIMEOUT_MS,
    });
    // The browser may only talk to the server under test.
    await context.route('**/*', (route) => {
      const u = new URL(route.request().url());
      if (u.origin === base.origin || u.protocol === 'data:' || u.protocol === 'blob:') {
        return route.continue();
      }
      offHost.push(u.href);
      return route.abort('blockedbyclient');
    });
    context.setDefaultTimeout(TIMEOUT_MS);
    context.setDefaultNavigationTimeout(TIMEOUT_MS);
    const page = context.pages()[0] || (await context.newPage());

    await step('a (GET /console redirects to the login page)', async () => {
      await page.goto(BASE_URL + '/console');
      check(path(page) === '/console/login', `expected /console/login, ended on ${path(page)}`);
      check((await count(page, 'form#login-form')) === 1, 'no form#login-form');
      const secret = page.locator('form#login-form input[name=secret]');
      check((await secret.count()) === 1, 'no input[name=secret] in form#login-form');
      check((await secret.getAttribute('type')) === 'password', 'input[name=secret] is not type=password');
      check((await count(page, 'form#login-form button#login')) === 1, 'no button#login in form#login-form');
      await shot(page, 'login.png');
    });

    await step('b (wrong password is refused with 401)', async () => {
      await page.fill('input[name=secret]', ADMIN_KEY + 'x');
      const [resp] = await Promise.all([
        page.waitForResponse((r) => r.request().method() === 'POST' && new URL(r.url()).pathname === '/console/login'),
        page.click('form#login-form button#login'),
      ]);
      check(resp.status() === 401, `POST /console/login with a wrong secret answered ${resp.status()}, want 401`);
      await page.waitForLoadState('load');
      const err = await text(page, '.error');
      check(/wrong/i.test(err), `.error text does not say "wrong": ${JSON.stringify(err)}`);
      check(!(await consoleCookie(context)), `cookie ${COOKIE} was set after a wrong secret`);
    });

    await step('c (right password logs in to /console/agents)', async () => {
      await page.fill('input[name=secret]', ADMIN_KEY);
      await Promise.all([
        page.waitForURL((u) => u.pathname === '/console/agents'),
        page.click('form#login-form button#login'),
      ]);
      await page.waitForLoadState('load');
      check((await count(page, 'h1')) >= 1, 'no h1 on /console/agents');
      check((await count(page, 'table#agents tr.agent')) >= 1, 'table#agents has no tr.agent row');
      const c = await consoleCookie(context);
      check(c, `no cookie ${COOKIE} after login`);
      check(c.httpOnly, `cookie ${COOKIE} is not HttpOnly`);
      check(['Strict', 'Lax'].includes(c.sameSite), `cookie ${COOKIE} has SameSite=${c.sameSite}, want Strict (or Lax)`);
      await hasLogout(page);
      await shot(page, 'agents.png');
    });

    const delivery = await step('d (failed deliveries list and one delivery page)', async () => {
      await page.goto(BASE_URL + '/console/deliveries?status=failed');
      check(path(page) === '/console/deliveries', `expected /console/deliveries, ended on ${path(page)}`);
      const rows = page.locator('table#deliveries tr.delivery');
      const n = await rows.count();
      check(n >= 1, 'table#deliveries has no tr.delivery row');
      for (let i = 0; i < n; i++) {
        const id = await rows.nth(i).getAttribute('data-id');
        check(id, `tr.delivery row ${i} has no data-id`);
      }
      const failed = page.locator('table#deliveries tr.delivery[data-status=failed]');
      check((await failed.count()) >= 1, 'no tr.delivery[data-status=failed] row');
      const row = failed.first();
      const id = await row.getAttribute('data-id');
      await shot(page, 'deliveries.png');
      const link = row.locator('a.delivery-link');
      check((await link.count()) >= 1, `row ${id} has no a.delivery-link`);
      await Promise.all([
        page.waitForURL((u) => decodeURIComponent(u.pathname) === `/console/deliveries/${id}`),
        link.first().click(),
      ]);
      await page.waitForLoadState('load');
      const status = await text(page, '#status');
      check(status === 'failed', `#status is ${JSON.stringify(status)}, want "failed"`);
      const callId = await text(page, '#call-id');
      check(callId, '#call-id is empty');
      check((await count(page, 'table#attempts tr.attempt')) >= 1, 'table#attempts has no tr.attempt row');
      check((await count(page, 'form#replay')) === 1, 'no form#replay');
      const csrf = page.locator('form#replay input[name=csrf]');
      check((await csrf.count()) === 1, 'no input[name=csrf] in form#replay');
      check((await csrf.getAttribute('type')) === 'hidden', 'input[name=csrf] is not type=hidden');
      check(await csrf.inputValue(), 'input[name=csrf] has no value');
      check((await count(page, 'form#replay button#replay-button')) === 1, 'no button#replay-button in form#replay');
      await hasLogout(page);
      await shot(page, 'delivery.png');
      return { id, status, callId, url: page.url() };
    });

    await step('e (replay without the right CSRF token is refused with 403)', async () => {
      const wrong = await page.evaluate(async () => {
        const r = await fetch(location.pathname + '/replay', {
          method: 'POST',
          headers: { 'content-type': 'application/x-www-form-urlencoded' },
          body: 'csrf=wrong',
        });
        return r.status;
      });
      check(wrong === 403, `replay with csrf=wrong answered ${wrong}, want 403`);
      const none = await page.evaluate(async () => (await fetch(location.pathname + '/replay', { method: 'POST' })).status);
      check(none === 403, `replay with no body answered ${none}, want 403`);
      await page.reload();
      const status = await text(page, '#status');
      check(status === delivery.status, `after refused replays #status is ${JSON.stringify(status)}, want ${JSON.stringify(delivery.status)}`);
    });

    await step('f (replay with the form, then the delivery becomes delivered)', async () => {
      const deliveryPath = `/console/deliveries/${delivery.id}`;
      const [resp] = await Promise.all([
        page.waitForResponse((r) => r.request().method() === 'POST' && decodeURIComponent(new URL(r.url()).pathname) === `${deliveryPath}/replay`),
        page.click('form#replay button#replay-button'),
      ]);
      check(resp.status() < 400, `replay POST answered ${resp.status()}`);
      await page.waitForURL((u) => decodeURIComponent(u.pathname) === deliveryPath);
      await page.waitForLoadState('load');
      const deadline = Date.now() + TIMEOUT_MS;
      let status = await text(page, '#status');
      while (status !== 'delivered') {
        check(Date.now() < deadline, `#status still ${JSON.stringify(status)} after ${TIMEOUT_MS} ms, want "delivered"`);
        await sleep(500);
        await page.reload();
        status = await text(page, '#status');
      }
      await shot(page, 'delivered.png');
    });

    await step('g (runs list and one run page)', async () => {
      await page.goto(BASE_URL + '/console/runs');
      check(path(page) === '/console/runs', `expected /console/runs, ended on ${path(page)}`);
      check((await count(page, 'table#runs tr.run')) >= 1, 'table#runs has no tr.run row');
      await hasLogout(page);
      await shot(page, 'runs.png');
      const link = page.locator('table#runs a.run-link').first();
      check((await page.locator('table#runs a.run-link').count()) >= 1, 'no a.run-link in table#runs');
      const href = await link.getAttribute('href');
      await Promise.all([page.waitForURL((u) => u.pathname !== '/console/runs'), link.click()]);
      await page.waitForLoadState('load');
      check((await count(page, 'table#steps')) >= 1, `no table#steps on run page ${path(page)} (link ${href})`);
      await shot(page, 'run.png');
    });

    await step('h (call timeline)', async () => {
      await page.goto(BASE_URL + '/console/calls/' + encodeURIComponent(delivery.callId));
      check(path(page) === `/console/calls/${delivery.callId}`, `expected /console/calls/${delivery.callId}, ended on ${path(page)}`);
      check((await count(page, 'ol#timeline li')) >= 1, 'ol#timeline has no li');
      await shot(page, 'call.png');
    });

    await step('i (phone width 390: no horizontal page scroll)', async () => {
      await page.setViewportSize({ width: 390, height: 844 });
      await page.goto(BASE_URL + '/console/deliveries');
      check(path(page) === '/console/deliveries', `expected /console/deliveries, ended on ${path(page)}`);
      const sw = await page.evaluate(() => document.documentElement.scrollWidth);
      await shot(page, 'deliveries-phone.png');
      check(sw <= 391, `page is ${sw} px wide at a 390 px viewport (horizontal scrolling)`);
    });

    current = 'network';
    check(offHost.length === 0, `the pages asked for other hosts: ${offHost.slice(0, 5).join(', ')}`);
  } catch (e) {
    const msg = e instanceof StepError ? e.message : String((e && e.stack) || e);
    process.stderr.write(`console test: FAILED at step ${current || '(launch)'}: ${msg}\n`);
    if (context) {
      try {
        const p = context.pages()[0];
        if (p) {
          process.stderr.write(`  page: ${p.url()}\n`);
          await p.screenshot({ path: join(OUT_DIR, 'failure.png'), fullPage: true });
          process.stderr.write(`  screenshot: ${join(OUT_DIR, 'failure.png')}\n`);
        }
      } catch {}
    }
    process.exitCode = 1;
  } finally {
    if (context) await context.close().catch(() => {});
    rmSync(userDataDir, { recursive: true, force: true });
  }
  if (!process.exitCode) console.log('console test: ok');
}

await main();
