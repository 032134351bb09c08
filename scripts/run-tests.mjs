#!/usr/bin/env node
// Runs the compiled tests under dist/test with node's test runner. Arguments pick suites
// (unit, property, integration, qemu); default: all. Real-QEMU suites run one file at a time:
// this machine has 2 cores and a TCG guest needs one of them.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
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

let failed = false;
for (const s of suites) {
  const list = files(join(root, 'dist', 'test', s));
  if (list.length === 0) continue;
  const conc = s === 'qemu' || s === 'integration' ? '1' : '2';
  console.log(`\n# suite ${s}: ${list.length} file(s)`);
  const r = spawnSync(process.execPath, ['--test', `--test-concurrency=${conc}`, ...list], { stdio: 'inherit', cwd: root });
  if (r.status !== 0) failed = true;
}
process.exit(failed ? 1 : 0);
