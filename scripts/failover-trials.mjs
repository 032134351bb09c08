#!/usr/bin/env node
// Failover trials with real QEMU 7.2 or 10.0.2 (not part of `npm test`; run `npm run build` first):
//
//   node scripts/failover-trials.mjs [--trials N] [--seed S] [--channels C] [--qemu 7.2|10.0|PATH] [--keep]
//
// --qemu picks the QEMU of the primary and of the destination: 7.2 (default: the system's or
// $QEMU), 10.0 (QEMU 10.0.2 built with COLO working by scripts/build-qemu10-colo.sh; stock
// 10.0 cannot run COLO), or a binary path.
//
// Each trial is a fresh COLO pair: a primary (multifd C channels, default 4; 600 ms
// checkpoints; upload workload of 3 MiB files with known sha256) checkpoints into
// `colo-receiver listen --on-failover resume=tcp:...`, a fresh `qemu-system-x86_64 -incoming`
// waits. The primary is SIGKILLed, cycling the kill moment: between checkpoints, during the
// RAM part of a checkpoint, around VMSTATE_SIZE / the device-state blob. A trial is "resumed
// intact" when the receiver exits 0, the destination runs the guest on from the committed
// checkpoint (heartbeat continues, no reboot, no oops) and every file confirmed before the
// committed checkpoint (one checkpoint of margin) reads back from it with its sha256.
// The trial logic is test/helpers/failover-trial.ts (shared with test/qemu/failover.test.ts).
//
// failover-to-running = primary SIGKILL -> destination query-status "running";
// delivered = the receiver's own failover time (decision -> destination has loaded the stream).
// Exit status 0 when every trial resumed intact.
import { parseArgs } from 'node:util';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const helper = new URL('../dist/test/helpers/failover-trial.js', import.meta.url);
if (!existsSync(fileURLToPath(helper))) {
  console.error('dist/test/helpers/failover-trial.js not found: run `npm run build` first');
  process.exit(2);
}
const { runFailoverTrial, describeTrial, KILL_MOMENTS } = await import(helper.href);
const { ensureGuest, haveQemu, qemuBinaryFor, qemuMissing, qemuVersion } = await import(new URL('../dist/src/harness/index.js', import.meta.url).href);

const { values: o } = parseArgs({
  options: {
    trials: { type: 'string', default: '10' },
    seed: { type: 'string' },
    channels: { type: 'string', default: '4' },
    qemu: { type: 'string', default: '7.2' },
    keep: { type: 'boolean', default: false },
    disk: { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
  },
});
if (o.help) {
  console.log('usage: node scripts/failover-trials.mjs [--trials N] [--seed S] [--channels C] [--qemu 7.2|10.0|PATH] [--keep] [--disk]');
  console.log('  --disk  the VM gets a replicated ext4 disk (quorum + replication + NBD to the receiver);');
  console.log('          uploads are synced files on it; checks add e2fsck of the committed image');
  process.exit(0);
}
// 10.0 means the COLO-capable build: stock 10.0 completes a plain migration instead of COLO
const flavour = o.qemu === '10.0' || o.qemu === '10.0-colo' ? '10.0-colo' : o.qemu === '7.2' ? '7.2' : null;
const binary = flavour ? qemuBinaryFor(flavour) : o.qemu;
if (flavour ? qemuMissing(flavour) : !haveQemu(binary)) {
  console.error(flavour ? qemuMissing(flavour) : `${binary}: not a runnable QEMU`);
  process.exit(2);
}
const trials = Number(o.trials);
const channels = Number(o.channels);
if (!Number.isInteger(trials) || trials < 1) { console.error('--trials must be a positive integer'); process.exit(1); }
const seed = o.seed !== undefined ? Number(o.seed) >>> 0 : (Date.now() & 0x7fffffff);

/** mulberry32: a small seeded PRNG, so a run's kill delays can be replayed with --seed. */
function prng(s) {
  let a = s >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const random = prng(seed);

const pad = (s, n) => String(s).padEnd(n);
const lpad = (s, n) => String(s).padStart(n);
const ms = (x) => (x === null || x === undefined || !Number.isFinite(x) ? '-' : x.toFixed(0));
function median(xs) {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}
function shortPhase(p) {
  return p.replace(/ before the kill/g, '').replace(/^in checkpoint (\d+): last /, 'cp $1: ').replace(/^between checkpoints: checkpoint (\d+) loaded/, 'idle after cp $1, loaded')
    .replace(/ \((RAM part|blob) in flight\)/, '');
}

console.log(`failover trials: ${trials}, multifd ${channels} channels, seed ${seed}, ${qemuVersion(binary)} (${binary})`);
const guest = await ensureGuest();
const results = [];
const t0 = Date.now();
for (let i = 0; i < trials; i++) {
  const moment = KILL_MOMENTS[i % KILL_MOMENTS.length];
  let r;
  try {
    r = await runFailoverTrial({ moment, guest, channels, random, keepDir: o.keep, binary, disk: o.disk });
  } catch (e) {
    r = { moment, error: e instanceof Error ? e.message : String(e), intact: false, problems: [String(e)] };
  }
  results.push(r);
  console.log(`[${i + 1}/${trials}] ${r.error ? `${moment}: setup failed: ${r.error}` : describeTrial(r)}${!r.intact && r.dir ? ` (run dir ${r.dir})` : ''}`);
}

console.log('');
const head = `${lpad('#', 3)}  ${pad('moment', 8)} ${pad('kill trigger', 16)} ${pad('primary at the kill', 36)} ${pad('receiver', 22)} ${lpad('files', 7)} ${pad('HB p->d', 9)} ${lpad('MB', 4)} ${lpad('deliv', 6)} ${lpad('->run', 6)}  result`;
console.log(head);
console.log('-'.repeat(head.length));
results.forEach((r, i) => {
  if (r.error) {
    console.log(`${lpad(i + 1, 3)}  ${pad(r.moment, 8)} setup failed: ${r.error.slice(0, 120)}`);
    return;
  }
  const trig = (/^([\d.]+) ms after (?:Send|Receive) '([a-z-]+)'/.exec(r.trigger) ?? []).slice(1).join(' ms > ') || r.trigger.slice(0, 16);
  const said = /holding committed checkpoint (\d+)/.exec(r.receiverSaid)?.[1] ?? '?';
  const recv = `${r.discarded !== null ? `disc ${r.discarded}, ` : ''}hold ${said}${said !== String(r.committed) ? ` (sent ${r.committed})` : ''}`;
  console.log(`${lpad(i + 1, 3)}  ${pad(r.moment, 8)} ${pad(trig, 16)} ${pad(shortPhase(r.primaryPhase).slice(0, 36), 36)} ${pad(recv, 22)} ${lpad(`${r.files.verified}/${r.files.eligible}`, 7)} ${pad(`${r.hb.primaryLast}->${r.hb.destFirst}`, 9)} ${lpad(((r.failoverBytes ?? 0) / 1e6).toFixed(0), 4)} ${lpad(ms(r.deliveredMs), 6)} ${lpad(ms(r.failoverToRunningMs), 6)}  ${r.intact ? 'intact' : 'NOT INTACT'}${r.anomalies.length ? ' (receiver anomaly)' : ''}`);
});

const intact = results.filter((r) => r.intact);
const toRun = results.map((r) => r.failoverToRunningMs).filter((x) => typeof x === 'number');
const deliv = results.map((r) => r.deliveredMs).filter((x) => typeof x === 'number');
const discarded = results.filter((r) => r.discarded !== null && r.discarded !== undefined).length;
const files = results.reduce((s, r) => s + (r.files?.verified ?? 0), 0);
const eligible = results.reduce((s, r) => s + (r.files?.eligible ?? 0), 0);
console.log('');
console.log(`trials run:            ${results.length} (${KILL_MOMENTS.map((m) => `${m} ${results.filter((r) => r.moment === m).length}`).join(', ')}), ${((Date.now() - t0) / 1000).toFixed(0)} s`);
console.log(`resumed intact:        ${intact.length}/${results.length}`);
console.log(`checkpoint discarded:  ${discarded} trial(s) (receiver: "checkpoint N discarded")`);
console.log(`files verified:        ${files}/${eligible} by sha256 in the resumed guests`);
console.log(`failover-to-running:   median ${ms(median(toRun))} ms, max ${ms(toRun.length ? Math.max(...toRun) : NaN)} ms (SIGKILL -> query-status running, n=${toRun.length})`);
console.log(`receiver delivered:    median ${ms(median(deliv))} ms, max ${ms(deliv.length ? Math.max(...deliv) : NaN)} ms (failover decision -> destination loaded the image)`);
results.forEach((r, i) => { for (const a of r.anomalies ?? []) console.log(`receiver anomaly, trial ${i + 1} (${r.moment}): ${a}`); });
for (const r of results.filter((x) => !x.intact)) console.log(`NOT INTACT (${r.moment}): ${r.problems.join('; ')}`);
// exit explicitly: the upload workload leaves short ack timers behind
process.exit(intact.length === results.length ? 0 : 1);
