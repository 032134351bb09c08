// npm run bench:colo [-- --primary qemu|synthetic --modes plain,multifd4 --workloads idle,load
//                        --checkpoints 100 --warmup 10 --ram-mib 512 --interval-ms 600
//                        --secondaries ours,qemu --nodelay-variant --qemu 7.2|10.0|PATH --out bench/results]
//
// COLO checkpoint latency with a real QEMU 7.2 (or, with --qemu 10.0, 10.0.2 built with COLO) primary (TCG, the project's shim, the test guest),
// checkpointing into our receiver (`colo-receiver listen`, a CLI child) and, in the same run and
// cell by cell interleaved, into QEMU's own C secondary (`-incoming`; multifd with the shim's
// cache redirect). Every checkpoint is timed on the secondary's clock (our CSV / QEMU's trace)
// and on the primary's (its trace). Writes <out>/<date>-colo.{json,md,svg[,png]}.
// `--primary synthetic` runs the same cells against the synthetic QEMU-exact primary (ours only).
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import { cpus, loadavg, release } from 'node:os';
import { join, relative, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { ensureGuest, ensureShim, haveQemu, makePki, projectRoot, qemuBinaryFor, qemuMissing, qemuVersion, qemuVersionNumbers } from '../src/harness/index.js';
import { cellName, cleanupAll, runCell, type CellResult, type CellSpec, type Secondary, type Workload } from './lib/cells.js';
import { snapshotReceiver } from './lib/receiver.js';
import { markdown, summarize, writeReport, type RunInfo } from './lib/report.js';
import { ms } from './lib/stats.js';

const USAGE = `bench:colo options:
  --primary qemu|synthetic   (default qemu)
  --modes LIST               plain,multifd4 (multifdN = N channels)
  --workloads LIST           idle,load
  --secondaries LIST         ours,qemu (qemu = QEMU's own C secondary)
  --qemu 7.2|10.0|PATH       real QEMU for the primary and the C secondary (default 7.2, or $QEMU):
                             10.0 = 10.0.2 built by scripts/build-qemu10-colo.sh (the C secondary
                             then has the seed's multifd semantics built in, x-colo set, no shim
                             cache redirect); PATH = a binary (a 10.x one is treated like 10.0)
  --checkpoints N            measured checkpoints per cell (default 100)
  --warmup N                 checkpoints before measuring (default 10; load starts halfway)
  --ram-mib N                guest RAM (default 512)
  --interval-ms N            x-checkpoint-delay (default 600)
  --upload-mbps N            load: upload rate into the guest (default 40)
  --nodelay-variant          also run the stock no-TCP_NODELAY cells (reported separately)
  --tls                      also run each of our cells over TLS (tls-creds-x509, TLS 1.2), right
                             after its plaintext twin; reported in a TLS section
  --disk                     disk cells instead (ours only): uploads land on an ext4 disk, synced
                             per file, with replication over NBD (README "Disks") and without it
                             (same disk, not replicated: what replication adds to the pause)
  --split-cores              pin the primary (and this harness) to CPU 0 and the secondary to the
                             other CPUs, as if on two hosts (COLO's deployment): neither side's
                             threads wait for the other's. Default: all share every CPU
  --retries N                run a failed cell again up to N times (default 1)
  --receiver-env K=V[,K=V]   extra environment for our receiver (e.g. GLIBC_TUNABLES=glibc.malloc.hugetlb=1)
  --out DIR                  default bench/results
  --tag NAME                 file name suffix (default colo, or colo-synthetic)
  --render FILE.json         only rewrite the .md and charts of an earlier run from its JSON`;

const { values: o } = parseArgs({
  options: {
    primary: { type: 'string', default: 'qemu' },
    modes: { type: 'string', default: 'plain,multifd4' },
    workloads: { type: 'string', default: 'idle,load' },
    secondaries: { type: 'string', default: 'ours,qemu' },
    qemu: { type: 'string', default: '7.2' },
    checkpoints: { type: 'string', default: '100' },
    warmup: { type: 'string', default: '10' },
    'ram-mib': { type: 'string', default: '512' },
    'interval-ms': { type: 'string', default: '600' },
    'upload-mbps': { type: 'string', default: '40' },
    'nodelay-variant': { type: 'boolean', default: false },
    tls: { type: 'boolean', default: false },
    'split-cores': { type: 'boolean', default: false },
    disk: { type: 'boolean', default: false },
    retries: { type: 'string', default: '1' },
    'receiver-env': { type: 'string' },
    out: { type: 'string', default: 'bench/results' },
    tag: { type: 'string' },
    render: { type: 'string' },
    help: { type: 'boolean', short: 'h', default: false },
  },
});
if (o.help) { console.log(USAGE); process.exit(0); }
if (o.render) {
  const file = resolve(String(o.render));
  const j = JSON.parse(readFileSync(file, 'utf8')) as { info: RunInfo; cells: CellResult[] };
  const charts = writeReport(file.replace(/\.json$/, ''), j.info, j.cells, true);
  console.log(`rewrote ${file.replace(/\.json$/, '')}.md and ${[charts.svg, charts.png, charts.sizeSvg, charts.sizePng].filter(Boolean).join(', ')}`);
  process.exit(0);
}

function fail(msg: string): never { console.error(`bench:colo: ${msg}\n\n${USAGE}`); process.exit(1); }
const num = (k: string, v: string | undefined, min: number) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) fail(`--${k} must be an integer >= ${min}`);
  return n;
};
const primaryKind = o.primary === 'synthetic' ? 'synthetic' : o.primary === 'qemu' ? 'qemu' : fail('--primary must be qemu or synthetic');
const modes = String(o.modes).split(',').map((m) => {
  const t = m.trim();
  if (t === 'plain') return 0;
  const mm = /^multifd-?(\d+)$/.exec(t);
  if (!mm || Number(mm[1]) < 1 || Number(mm[1]) > 16) fail(`unknown mode ${t} (plain, multifdN)`);
  return Number(mm[1]);
});
const workloads = String(o.workloads).split(',').map((w) => w.trim()).map((w) => (w === 'idle' || w === 'load' ? w : fail(`unknown workload ${w}`))) as Workload[];
let secondaries = String(o.secondaries).split(',').map((s) => s.trim()).map((s) => (s === 'ours' || s === 'qemu' ? s : fail(`unknown secondary ${s}`))) as Secondary[];
const checkpoints = num('checkpoints', o.checkpoints, 1);
const warmup = num('warmup', o.warmup, 2);
const ramMiB = num('ram-mib', o['ram-mib'], 64);
const intervalMs = num('interval-ms', o['interval-ms'], 0);
const uploadMBps = Number(o['upload-mbps']);
const nodelayVariant = Boolean(o['nodelay-variant']);
const retries = num('retries', o.retries, 0);
const nCpu = cpus().length;
if (o['split-cores'] && nCpu < 2) fail('--split-cores needs at least 2 CPUs');
const splitCores = o['split-cores'] ? { primary: '0', secondary: nCpu === 2 ? '1' : `1-${nCpu - 1}` } : undefined;
const receiverEnv: Record<string, string> = {};
for (const kv of String(o['receiver-env'] ?? '').split(',').filter(Boolean)) {
  const i = kv.indexOf('=');
  if (i < 1) fail(`--receiver-env wants K=V, got ${kv}`);
  receiverEnv[kv.slice(0, i)] = kv.slice(i + 1);
}
const root = projectRoot();
const outDir = resolve(root, String(o.out));

if (primaryKind === 'synthetic' && secondaries.includes('qemu')) {
  console.log("note: --primary synthetic: QEMU's own secondary cannot load the synthetic device state; running ours only (C column: NOTES.md's figures)");
  secondaries = secondaries.filter((s) => s !== 'qemu');
}
if (secondaries.length === 0) fail('no secondary to run');
const qemuOpt = String(o.qemu);
const qemuBin = qemuOpt === '7.2' ? qemuBinaryFor('7.2') : qemuOpt === '10.0' ? qemuBinaryFor('10.0-colo') : resolve(qemuOpt);
if (primaryKind === 'qemu') {
  const missing = qemuOpt === '7.2' ? qemuMissing('7.2') : qemuOpt === '10.0' ? qemuMissing('10.0-colo') : (haveQemu(qemuBin) ? false : `${qemuBin} is not a runnable QEMU`);
  if (missing) fail(missing);
}
const qemuMajor = qemuVersionNumbers(qemuBin)?.[0] ?? 7;
const qemuCfg = { binary: qemuBin, colo10: qemuMajor >= 10 };

const now = new Date();
const date = now.toISOString().slice(0, 10);
const tag = o.tag ?? (primaryKind === 'synthetic' ? 'colo-synthetic' : o.disk ? 'colo-disk' : 'colo');
const runDir = join(outDir, 'tmp', `${tag}-${now.toISOString().replace(/[:.]/g, '-')}`);
mkdirSync(runDir, { recursive: true });
const log = (m: string) => console.log(`[bench:colo ${new Date().toISOString().slice(11, 19)}] ${m}`);

process.on('SIGINT', () => { void cleanupAll().finally(() => process.exit(130)); });
process.on('SIGTERM', () => { void cleanupAll().finally(() => process.exit(143)); });

// The receiver under test: this tree's build, copied so a rebuild during the run cannot mix builds.
const receiverCli = snapshotReceiver(join(runDir, 'receiver-build'));
const git = (args: string[]) => { try { return execFileSync('git', args, { cwd: root, encoding: 'utf8' }).trim(); } catch { return ''; } };
const build = {
  gitHead: git(['rev-parse', '--short', 'HEAD']),
  uncommitted: git(['status', '--porcelain', '--', 'src', 'workers']).split('\n').filter(Boolean).length,
};

const loadStart = loadavg().map((x) => Math.round(x * 100) / 100);
const info: RunInfo = {
  date, startedAt: now.toISOString(), finishedAt: '',
  command: `npm run bench:colo -- ${process.argv.slice(2).join(' ')}`.trim(),
  primary: primaryKind,
  machine: {
    cpus: cpus().length, cpuModel: cpus()[0]?.model ?? '?', accelerator: primaryKind === 'qemu' ? 'tcg' : 'none (synthetic)',
    qemuVersion: qemuVersion(qemuBin), guestRamMiB: ramMiB, node: process.version, kernel: release(),
    loadavgStart: loadStart, loadavgEnd: [],
  },
  config: { modes, workloads, secondaries, checkpoints, warmup, intervalMs, uploadMBps, nodelayVariant, qemu: qemuOpt, qemuBinary: qemuBin, ...(splitCores ? { splitCores } : {}), ...(Object.keys(receiverEnv).length ? { receiverEnv } : {}) },
  build,
};

log(`${info.machine.cpus} CPUs, load average ${loadStart.join(' ')}, ${info.machine.qemuVersion ?? 'no QEMU'}, Node ${process.version}`);
const guest = primaryKind === 'qemu' ? await ensureGuest() : undefined;
if (primaryKind === 'qemu') await ensureShim();
const pki = o.tls ? makePki() : undefined;

// Cell order: mode, workload, then ours and QEMU's back to back so both see the same machine load.
const specs: CellSpec[] = [];
for (const nodelay of nodelayVariant && primaryKind === 'qemu' ? [true, false] : [true]) {
  for (const channels of modes) for (const workload of workloads) for (const secondary of secondaries) {
    if (o.disk) {
      if (secondary !== 'ours' || primaryKind !== 'qemu') continue;
      for (const disk of ['local', 'replicated'] as const) specs.push({ primary: primaryKind, channels, workload, secondary, nodelay, disk });
    } else {
      specs.push({ primary: primaryKind, channels, workload, secondary, nodelay });
      if (o.tls && secondary === 'ours' && primaryKind === 'qemu') specs.push({ primary: primaryKind, channels, workload, secondary, nodelay, tls: true });
    }
  }
}
log(`${specs.length} cells: ${specs.map(cellName).join(', ')}; raw runs in ${relative(root, runDir)}`);

const results: CellResult[] = [];
const base = join(outDir, `${date}-${tag}`);

function write(final: boolean) {
  info.finishedAt = new Date().toISOString();
  info.machine.loadavgEnd = loadavg().map((x) => Math.round(x * 100) / 100);
  return writeReport(base, info, results, final);
}

for (const [i, spec] of specs.entries()) {
  log(`cell ${i + 1}/${specs.length}: ${cellName(spec)} (load average ${loadavg()[0]!.toFixed(2)})`);
  const cfg = { ramMiB, intervalMs, warmup, checkpoints, uploadMBps, ...(guest ? { guest } : {}), ...(pki ? { pki } : {}), runDir, receiverCli, receiverEnv, qemu: qemuCfg, ...(splitCores ? { splitCores } : {}), log };
  let r = await runCell(spec, cfg);
  for (let k = 0; k < retries && !r.ok; k++) {
    log(`  ${r.name} failed (${r.error}); running it again`);
    const again = await runCell(spec, { ...cfg, runDir: join(runDir, `retry${k + 1}`) });
    again.retriedAfter = [...(r.retriedAfter ?? []), r.error ?? 'failed'];
    r = again;
  }
  results.push(r);
  const s = summarize(r);
  const t = s.metrics.transferMs, p = s.metrics.primarySendToReceivedMs;
  log(`  ${r.name}: ${r.ok ? 'ok' : `FAILED: ${r.error}`}; ${s.n} checkpoints, ${s.n ? s.mbPerCheckpoint.mean.toFixed(2) : '–'} MB/ckpt` +
    `${t ? `, transfer mean ${ms(t.mean)} p99 ${ms(t.p99)}` : ''}${p ? `, primary SEND→RECEIVED mean ${ms(p.mean)} p99 ${ms(p.p99)}` : ''}` +
    `${r.uploadMBps !== undefined ? `, upload ${r.uploadMBps} MB/s` : ''}` +
    `${s.metrics.primaryRequestToLoadedMs ? `, pause (primary REQUEST→LOADED) mean ${ms(s.metrics.primaryRequestToLoadedMs.mean)} p99 ${ms(s.metrics.primaryRequestToLoadedMs.p99)}` : ''}` +
    `${r.diskStats ? `, disk ${JSON.stringify(r.diskStats)}` : ''} (${r.wallSeconds} s)`);
  write(false);
}
const charts = write(true);
log(`wrote ${relative(root, base)}.{json,md} and ${[charts.svg, charts.png, charts.sizeSvg, charts.sizePng].filter(Boolean).join(', ')}`);
console.log('\n' + markdown(info, results, charts).split('## Cells')[0]);
process.exit(results.every((r) => r.ok) ? 0 : 2);
