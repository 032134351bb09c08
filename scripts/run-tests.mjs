#!/usr/bin/env node
// Runs the compiled tests under dist/test with node's test runner. Arguments pick suites
// (unit, property, integration, qemu); default: all. Real-QEMU suites run one file at a time:
// this machine has 2 cores and a TCG guest needs one of them; each runs in a process of its
// own, with its own scratch directory.
//
// A real-QEMU test that skips (its QEMU is not installed) is counted and named at the end in
// a banner that cannot be missed; with COLO_REQUIRE_QEMU=1 (set by .ci/run) a skip fails the
// run, so CI can never pass with the real-QEMU suites left out.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const all = ['unit', 'property', 'integration', 'qemu'];
const suites = process.argv.slice(2).length ? process.argv.slice(2) : all;

function files(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? files(p) : n.endsWith('.test.js') ? [p] : [];
  }).sort();
}

const tmp = mkdtempSync(join(tmpdir(), 'colo-tests-'));
let failed = false;
const skipped = [];
for (const s of suites) {
  const list = files(join(root, 'dist', 'test', s));
  if (list.length === 0) continue;
  const conc = s === 'qemu' || s === 'integration' ? '1' : '2';
  console.log(`\n# suite ${s}: ${list.length} file(s)`);
  // Real-QEMU tests write guest-RAM dumps (256-512 MiB a case) under os.tmpdir(): each file
  // gets a TMPDIR of its own, removed once the file passed (kept, and named, when it failed),
  // so a full run never holds more than one file's worth of dumps.
  const batches = s === 'qemu' ? list.map((f) => [f]) : [list];
  for (const batch of batches) {
    const tap = join(tmp, `${s}-${batches.indexOf(batch)}.tap`);
    const scratch = mkdtempSync(join(tmpdir(), `colo-${s}-`));
    const r = spawnSync(process.execPath, ['--test', `--test-concurrency=${conc}`,
      '--test-reporter=spec', '--test-reporter-destination=stdout', '--test-reporter=tap', `--test-reporter-destination=${tap}`,
      ...batch], { stdio: 'inherit', cwd: root, env: { ...process.env, TMPDIR: scratch } });
    if (r.status !== 0) {
      failed = true;
      console.log(`# ${batch.length === 1 ? batch[0] : `suite ${s}`} failed: its scratch files are kept in ${scratch}`);
    } else {
      rmSync(scratch, { recursive: true, force: true });
    }
    if (s === 'qemu' && existsSync(tap)) {
      // "ok 3 - name # SKIP reason": a skipped test, or a describe() skipped as a whole
      for (const line of readFileSync(tap, 'utf8').split('\n')) {
        const m = /^\s*ok \d+ - (.*?) # SKIP ?(.*)$/.exec(line);
        if (m) skipped.push({ name: m[1], why: m[2] || 'skipped' });
      }
    }
  }
}
rmSync(tmp, { recursive: true, force: true });

if (skipped.length > 0) {
  const reasons = [...new Set(skipped.map((s) => s.why))];
  const bar = '!'.repeat(78);
  console.log(`\n${bar}\n!! ${skipped.length} REAL-QEMU TEST(S) SKIPPED: QEMU compatibility was NOT checked by this run`);
  for (const why of reasons) console.log(`!!   - ${why} (${skipped.filter((s) => s.why === why).length})`);
  console.log('!! install: sudo apt-get install qemu-system-x86 gcc   (QEMU 7.2)');
  console.log('!!          scripts/install-qemu10.sh                  (stock QEMU 10.0.2, if the suite uses it)');
  console.log('!!          scripts/build-qemu10-colo.sh               (QEMU 10.0.2 built for COLO, if the suite uses it)');
  console.log(`!! or run everything as CI does: bash .ci/run\n${bar}`);
  if (process.env.COLO_REQUIRE_QEMU === '1') {
    console.log('COLO_REQUIRE_QEMU=1: a skipped real-QEMU test fails the run');
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
