// The bench:colo report: markdown tables in the seed's layout and charts (hand-written SVG,
// rasterized with rsvg-convert when it is installed).
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { basename } from 'node:path';
import { cellName, modeName, type CellResult, type CellSpec } from './cells.js';
import { dist, ms, ratio, sum, type Dist } from './stats.js';
import type { CheckpointTimes } from './traces.js';

export interface RunInfo {
  date: string;
  startedAt: string;
  finishedAt: string;
  command: string;
  primary: 'qemu' | 'synthetic';
  machine: {
    cpus: number;
    cpuModel: string;
    accelerator: string;
    qemuVersion: string | null;
    guestRamMiB: number;
    node: string;
    kernel: string;
    loadavgStart: number[];
    loadavgEnd: number[];
  };
  config: { modes: number[]; workloads: string[]; secondaries: string[]; checkpoints: number; warmup: number; intervalMs: number; uploadMBps: number; nodelayVariant: boolean; receiverEnv?: Record<string, string>; qemu?: string; qemuBinary?: string; splitCores?: { primary: string; secondary: string } };
  /** The receiver build measured: git HEAD and how many files under src/ and workers/ differed from it. */
  build?: { gitHead: string; uncommitted: number };
}

/** The seed's table (its C secondary, 10 GbE, 6 GB Windows guest, SMB upload), ms. */
export const SEED = {
  plain: { idleMean: 4.50, idleP99: 10.33, loadMean: 24.30, loadP99: 78.05 },
  multifd4: { idleMean: 6.48, idleP99: 10.41, loadMean: 14.12, loadP99: 31.27 },
};
/** QEMU 7.2's C secondary as measured for ../shared/qemu/NOTES.md on this machine kind (memory transfer, ms). */
export const NOTES_C = {
  plain: { idleMean: 1.14, idleP99: 2.21, loadMean: 15.28, loadP99: 35.49 },
  multifd4: { idleMean: 1.11, idleP99: 2.32, loadMean: 7.48, loadP99: 18.90 },
};

type Metric = keyof CheckpointTimes;

export const METRICS: { key: Metric; label: string; def: string }[] = [
  { key: 'transferMs', label: 'transfer (secondary clock)', def: 'VMSTATE_SEND received → RAM part loaded, every multifd channel synced (ours: CSV; QEMU: its trace, `receive vmstate-send` → `ram_load_complete`)' },
  { key: 'blobMs', label: 'blob', def: 'RAM loaded → device-state blob in (QEMU: → `send vmstate-received`)' },
  { key: 'flushMs', label: 'flush', def: 'cache → guest-RAM copy of the checkpoint\'s dirty pages (QEMU: `colo_flush_ram_cache_begin` → `_end`)' },
  { key: 'pauseMs', label: 'pause (secondary clock)', def: 'CHECKPOINT_REQUEST received → VMSTATE_LOADED sent' },
  { key: 'primarySendToSizeMs', label: 'primary SEND→SIZE', def: 'primary trace: `send vmstate-send` → `send vmstate-size` (the primary has written the whole RAM part; TCP back-pressure from a slow reader shows here)' },
  { key: 'primarySendToReceivedMs', label: 'primary SEND→RECEIVED', def: 'primary trace: `send vmstate-send` → `receive vmstate-received` (one clock, same for both secondaries)' },
  { key: 'primarySendToLoadedMs', label: 'primary SEND→LOADED', def: 'primary trace: `send vmstate-send` → `receive vmstate-loaded`' },
  { key: 'primaryRequestToLoadedMs', label: 'primary REQUEST→LOADED', def: 'primary trace: `send checkpoint-request` → `receive vmstate-loaded` (the primary\'s VM is stopped for about this long; synthetic primary: its own clock)' },
  { key: 'primaryRequestToReplyMs', label: 'primary REQUEST→REPLY', def: 'primary trace: `send checkpoint-request` → `receive checkpoint-reply` (how fast the secondary answers)' },
  { key: 'memoryTransferMs', label: 'memory transfer (NOTES)', def: 'QEMU only, across both traces: primary `send vmstate-send` → secondary `ram_load_complete` (NOTES.md\'s definition)' },
  { key: 'sendToFlushedMs', label: 'primary SEND→secondary flushed', def: 'QEMU only, across both traces: primary `send vmstate-send` → secondary `colo_flush_ram_cache_end` (harness `memoryTransferMs()`)' },
];

const MiB4K = 4096;

export interface CellSummary {
  name: string;
  spec: CellSpec;
  ok: boolean;
  error?: string;
  n: number;
  /** Dirty pages × 4 KiB per checkpoint (the primary's bitmap sync), MB. */
  mbPerCheckpoint: Dist;
  /** Page payload the receiver got per checkpoint, MB (ours only). */
  payloadMB?: Dist;
  /** Sum of bytes / sum of transfer time, GB/s (load cells: what the secondary achieved while receiving). */
  transferGBps?: number;
  metrics: Partial<Record<Metric, Dist>>;
  uploadMBps?: number;
  loadavgStart: number[];
  loadavgEnd: number[];
  pairing?: { paired: number; mismatched: number };
}

export function summarize(c: CellResult): CellSummary {
  const cp = c.checkpoints;
  const metrics: Partial<Record<Metric, Dist>> = {};
  for (const m of METRICS) {
    const d = dist(cp.map((x) => x[m.key] as number | undefined));
    if (d.n > 0) metrics[m.key] = d;
  }
  const mb = cp.map((x) => (x.dirtyPages ?? NaN) * MiB4K / 1e6);
  const s: CellSummary = {
    name: c.name, spec: { primary: c.primary, channels: c.channels, workload: c.workload, secondary: c.secondary, nodelay: c.nodelay, ...(c.tls ? { tls: true } : {}) },
    ok: c.ok, n: cp.length, mbPerCheckpoint: dist(mb), metrics, loadavgStart: c.loadavgStart, loadavgEnd: c.loadavgEnd,
  };
  if (c.error) s.error = c.error;
  if (c.uploadMBps !== undefined) s.uploadMBps = c.uploadMBps;
  if (c.pairing) s.pairing = c.pairing;
  if (cp.some((x) => x.payloadBytes !== undefined)) s.payloadMB = dist(cp.map((x) => x.payloadBytes === undefined ? undefined : x.payloadBytes / 1e6));
  const tt = sum(cp.map((x) => x.transferMs ?? 0));
  const bytes = sum(cp.map((x) => (x.dirtyPages ?? 0) * MiB4K));
  if (tt > 0 && bytes > 0) s.transferGBps = bytes / 1e9 / (tt / 1000);
  return s;
}

function find(ss: CellSummary[], channels: number, workload: string, secondary: string, nodelay: boolean): CellSummary | undefined {
  // the TLS cells have a section of their own; the main tables compare plaintext cells
  return ss.find((s) => s.spec.channels === channels && s.spec.workload === workload && s.spec.secondary === secondary && s.spec.nodelay === nodelay && !s.spec.tls && s.n > 0);
}

function seedRow(channels: number): { idleMean: number; idleP99: number; loadMean: number; loadP99: number } | undefined {
  return channels === 0 ? SEED.plain : channels === 4 ? SEED.multifd4 : undefined;
}
function notesRow(channels: number) {
  return channels === 0 ? NOTES_C.plain : channels === 4 ? NOTES_C.multifd4 : undefined;
}

/** The seed's layout: rows per mode, columns idle mean / p99, load mean / p99; seed, C, ours, ratios. */
function seedTable(ss: CellSummary[], modes: number[], metric: Metric, nodelay: boolean, withSeed: boolean, cOrNotes: 'run' | 'notes', cLabel = 'QEMU 7.2 C secondary'): string[] {
  const rows = ['| | idle mean | idle p99 | load mean | load p99 |', '|---|---:|---:|---:|---:|'];
  const get = (ch: number, sec: string, w: string) => find(ss, ch, w, sec, nodelay)?.metrics[metric];
  const cells = (d: (w: string) => Dist | undefined) => [d('idle')?.mean, d('idle')?.p99, d('load')?.mean, d('load')?.p99];
  const fmt = (xs: (number | undefined)[]) => xs.map((x) => (x === undefined ? '–' : ms(x))).join(' | ');
  const ratioCells = (a: (number | undefined)[], b: (number | undefined)[]) => a.map((x, i) => ratio(x, b[i])).join(' | ');
  const perMode: Record<number, { c: (number | undefined)[]; o: (number | undefined)[] }> = {};
  for (const ch of modes) {
    const m = modeName(ch);
    const seed = seedRow(ch);
    if (withSeed && seed) rows.push(`| **${m}** — seed (C; 10 GbE, 6 GB Windows guest) | ${seed.idleMean.toFixed(2)} | ${seed.idleP99.toFixed(2)} | ${seed.loadMean.toFixed(2)} | ${seed.loadP99.toFixed(2)} |`);
    let c: (number | undefined)[];
    if (cOrNotes === 'run') {
      c = cells((w) => get(ch, 'qemu', w));
      rows.push(`| **${m}** — ${cLabel} | ${fmt(c)} |`);
    } else {
      const n = notesRow(ch);
      c = n ? [n.idleMean, n.idleP99, n.loadMean, n.loadP99] : [undefined, undefined, undefined, undefined];
      rows.push(`| **${m}** — QEMU 7.2 C secondary (NOTES.md, real primary; not this run) | ${fmt(c)} |`);
    }
    const o = cells((w) => get(ch, 'ours', w));
    rows.push(`| **${m}** — ours (colo-receiver) | ${fmt(o)} |`);
    rows.push(`| ${m} — ours / C | ${ratioCells(o, c)} |`);
    perMode[ch] = { c, o };
  }
  const mf = modes.find((x) => x > 0), pl = modes.includes(0) ? 0 : undefined;
  if (mf !== undefined && pl !== undefined) {
    const name = `${modeName(mf)} / plain`;
    const seedM = seedRow(mf), seedP = seedRow(pl);
    if (withSeed && seedM && seedP) rows.push(`| ${name} — seed | | | ${ratio(seedM.loadMean, seedP.loadMean)} | ${ratio(seedM.loadP99, seedP.loadP99)} |`);
    const cm = perMode[mf]!, cp = perMode[pl]!;
    rows.push(`| ${name} — C | | | ${ratio(cm.c[2], cp.c[2])} | ${ratio(cm.c[3], cp.c[3])} |`);
    rows.push(`| ${name} — ours | | | ${ratio(cm.o[2], cp.o[2])} | ${ratio(cm.o[3], cp.o[3])} |`);
  }
  return rows;
}

function distCells(d: Dist | undefined): string {
  return d ? `${ms(d.mean)} | ${ms(d.p50)} | ${ms(d.p99)} | ${ms(d.max)}` : '– | – | – | –';
}

export interface ChartFiles { svg: string; png?: string; sizeSvg?: string; sizePng?: string }

/**
 * Writes <base>.json, .md, .svg (transfer CDFs), -size.svg (transfer vs checkpoint size) and,
 * when `rasterize` and rsvg-convert is available, the .png of both. Returns the chart names.
 */
export function writeReport(base: string, info: RunInfo, results: CellResult[], rasterize: boolean): ChartFiles {
  writeFileSync(`${base}.json`, JSON.stringify({ info, summaries: results.map(summarize), cells: results }, null, 1) + '\n');
  writeFileSync(`${base}.svg`, svgChart(info, results));
  const charts: ChartFiles = { svg: `${basename(base)}.svg` };
  const hasLoad = results.some((r) => r.workload === 'load' && r.checkpoints.length > 0);
  if (hasLoad) {
    writeFileSync(`${base}-size.svg`, svgSizeChart(info, results));
    charts.sizeSvg = `${basename(base)}-size.svg`;
  }
  if (rasterize) {
    const png = (svg: string, out: string) => {
      try {
        execFileSync('rsvg-convert', ['-f', 'png', '-o', out, svg], { stdio: 'ignore', timeout: 60_000 });
        return true;
      } catch { return false; }       // no rasterizer: SVG only
    };
    if (png(`${base}.svg`, `${base}.png`)) charts.png = `${basename(base)}.png`;
    if (hasLoad && png(`${base}-size.svg`, `${base}-size.png`)) charts.sizePng = `${basename(base)}-size.png`;
  }
  writeFileSync(`${base}.md`, markdown(info, results, charts));
  return charts;
}

export function markdown(info: RunInfo, results: CellResult[], chartFiles: ChartFiles): string {
  const ss = results.map(summarize);
  const mc = info.machine;
  const highLoad = Math.max(mc.loadavgStart[0] ?? 0, mc.loadavgEnd[0] ?? 0, ...ss.map((s) => Math.max(s.loadavgStart[0] ?? 0, s.loadavgEnd[0] ?? 0))) > mc.cpus;
  const L: string[] = [];
  const synth = info.primary === 'synthetic';
  const qv = /version (\d+\.\d+(?:\.\d+)?)/.exec(mc.qemuVersion ?? '')?.[1] ?? '7.2';
  const q10 = Number(qv.split('.')[0]) >= 10;
  const cLabel = q10 ? `QEMU ${qv} C secondary (seed semantics, built)` : 'QEMU 7.2 C secondary';
  L.push(`# COLO checkpoint latency — ${synth ? 'synthetic primary' : `real QEMU ${qv} primary`}, ${info.date}`, '');
  L.push(`Command: \`${info.command}\``, '');
  if (info.build) L.push(`- Receiver build: git ${info.build.gitHead || '?'}${info.build.uncommitted ? ` + ${info.build.uncommitted} uncommitted file(s) under src/ or workers/` : ''} (dist snapshot taken at the start of the run)`);
  L.push(`- Machine: ${mc.cpus} CPUs (${mc.cpuModel}), Linux ${mc.kernel}, Node ${mc.node}`);
  L.push(`- Primary: ${synth ? 'synthetic QEMU-exact 7.2 COLO primary (in the bench process; workload model calibrated to the real runs)' : `${mc.qemuVersion ?? 'QEMU ?'}, accelerator **${mc.accelerator}**, \`-cpu qemu64\`, 1 vCPU, guest RAM **${mc.guestRamMiB} MiB**, test guest (Debian cloud kernel + busybox), project shim (TLB flush${results.some((r) => r.nodelay) ? ', TCP_NODELAY' : ''})`}`);
  L.push(`- Checkpoints every ${info.config.intervalMs} ms (x-checkpoint-delay); ${info.config.warmup} warm-up then **${info.config.checkpoints} measured** per cell; load = host upload into the guest at ${info.config.uploadMBps} MB/s target over user-net hostfwd${synth ? ' (synthetic: lognormal ~25 MB/checkpoint; idle ~60 pages)' : ''}`);
  L.push(`- Load average (1/5/15 min) at start ${mc.loadavgStart.join(' / ')}, at end ${mc.loadavgEnd.join(' / ')}; per cell below.${highLoad ? ` **The machine was loaded (load average above the CPU count at times: other engineers' jobs share these ${mc.cpus} cores); tails (p99/max) are inflated by that, for both secondaries alike — they ran interleaved, cell by cell.**` : ''}`);
  L.push(`- Secondaries: **ours** = \`colo-receiver listen\` as a CLI child (\`--multifd-channels N --stats-json --checkpoints-csv\`${info.config.receiverEnv ? `, environment ${Object.entries(info.config.receiverEnv).map(([k, v]) => `\`${k}=${v}\``).join(' ')}` : ''}); ${synth ? "QEMU's own secondary cannot load a synthetic device state, so the C column is NOTES.md's real-primary figure (not this run)" : (q10 ? `**C** = \`qemu-system-x86_64 -incoming\` ${qv} built by scripts/build-qemu10-colo.sh (diskless COLO secondary, x-colo set; multifd with the seed's semantics in C, native/qemu-10.0.2-colo.patch; no shim cache redirect)` : '**C** = `qemu-system-x86_64 -incoming` 7.2 (diskless COLO secondary; multifd with the shim\'s cache redirect, which stands in for the seed\'s C fix)')}.`);
  if (info.config.splitCores) L.push(`- **Split cores** (\`--split-cores\`): the primary and this harness pinned to CPU ${info.config.splitCores.primary}, each secondary to CPU ${info.config.splitCores.secondary}, as if on two hosts.`);
  L.push(`- TCP_NODELAY: ${results.some((r) => r.nodelay) ? 'on for QEMU\'s sockets via the shim in the main tables (as in NOTES.md); ours always sets it on its side' : 'off'}${info.config.nodelayVariant ? '; the stock no-NODELAY variant is reported separately below' : ''}.`);
  L.push(`- Times in ms; percentiles nearest-rank (p99 of 100 = the 99th smallest).`, '');

  const modes = info.config.modes;
  L.push('## Transfer time per checkpoint — the seed\'s table', '');
  L.push(`Transfer = each secondary's own clock, the same definition on both: VMSTATE_SEND received → RAM part loaded with every multifd channel synced (ours: \`--checkpoints-csv\` transfer_ms; QEMU: its trace, \`receive vmstate-send\` → \`ram_load_complete\`).`, '');
  L.push(...seedTable(ss, modes, 'transferMs', true, true, synth ? 'notes' : 'run', cLabel), '');
  if (!synth) {
    L.push('### The same from the primary\'s clock: VMSTATE_SEND → VMSTATE_RECEIVED', '');
    L.push('One clock (the primary\'s trace) for both secondaries: RAM part and device-state blob on the wire and read by the secondary.', '');
    L.push(...seedTable(ss, modes, 'primarySendToReceivedMs', true, false, 'run', cLabel), '');
    L.push('### Whole checkpoint from the primary\'s clock: CHECKPOINT_REQUEST → VMSTATE_LOADED (the primary\'s VM is stopped about this long)', '');
    L.push(...seedTable(ss, modes, 'primaryRequestToLoadedMs', true, false, 'run', cLabel), '');
    if (ss.some((s) => s.spec.secondary === 'qemu' && s.metrics.memoryTransferMs)) {
      L.push('### QEMU\'s secondary, NOTES.md\'s definition (primary sends VMSTATE_SEND → secondary `ram_load_complete`) beside NOTES.md\'s figures', '');
      L.push('| | idle mean | idle p99 | load mean | load p99 |', '|---|---:|---:|---:|---:|');
      for (const ch of modes) {
        const n = notesRow(ch);
        const d = (w: string) => find(ss, ch, w, 'qemu', true)?.metrics.memoryTransferMs;
        L.push(`| ${modeName(ch)} — this run | ${ms(d('idle')?.mean)} | ${ms(d('idle')?.p99)} | ${ms(d('load')?.mean)} | ${ms(d('load')?.p99)} |`);
        if (n) L.push(`| ${modeName(ch)} — NOTES.md | ${n.idleMean.toFixed(2)} | ${n.idleP99.toFixed(2)} | ${n.loadMean.toFixed(2)} | ${n.loadP99.toFixed(2)} |`);
      }
      L.push('');
    }
  }
  if (ss.some((s) => s.spec.tls)) {
    L.push('## TLS (ours, every channel over TLS 1.2: tls-creds-x509 on the primary, --tls-creds)', '');
    L.push('Each TLS cell ran right after its plaintext twin. Means in ms; the primary\'s clock for the whole checkpoint (REQUEST→LOADED, its VM stopped).', '');
    L.push('| cell | transfer plain | transfer TLS | TLS / plain | p99 plain | p99 TLS | pause (primary) plain | pause TLS | +ms per checkpoint | MB/ckpt plain / TLS | transfer ms/MB plain / TLS (ckpts ≥ 1 MB) |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
    // the cells move different amounts (the upload rate varies): per MB is the fairer figure
    const perMb = (name: string | undefined) => {
      const v = (results.find((x) => x.name === name)?.checkpoints ?? []).filter((c) => c.transferMs !== undefined && (c.dirtyPages ?? 0) * MiB4K >= 1e6)
        .map((c) => c.transferMs! / ((c.dirtyPages! * MiB4K) / 1e6));
      return v.length ? (sum(v) / v.length).toFixed(2) : '–';
    };
    for (const t of ss.filter((s) => s.spec.tls && s.n > 0)) {
      const p = ss.find((s) => !s.spec.tls && s.spec.secondary === t.spec.secondary && s.spec.channels === t.spec.channels && s.spec.workload === t.spec.workload && s.spec.nodelay === t.spec.nodelay && s.n > 0);
      const a = p?.metrics.transferMs, b = t.metrics.transferMs;
      const pa = p?.metrics.primaryRequestToLoadedMs, pb = t.metrics.primaryRequestToLoadedMs;
      L.push(`| ${t.name} | ${ms(a?.mean)} | ${ms(b?.mean)} | ${a && b ? (b.mean / a.mean).toFixed(2) + '×' : '–'} | ${ms(a?.p99)} | ${ms(b?.p99)} | ${ms(pa?.mean)} | ${ms(pb?.mean)} | ${pa && pb ? (pb.mean - pa.mean).toFixed(2) : '–'} | ${p ? p.mbPerCheckpoint.mean.toFixed(1) : '–'} / ${t.mbPerCheckpoint.mean.toFixed(1)} | ${perMb(p?.name)} / ${perMb(t.name)} |`);
    }
    L.push('');
  }
  if (info.config.nodelayVariant && results.some((r) => !r.nodelay)) {
    L.push('## Stock QEMU 7.2 sockets (no TCP_NODELAY on the primary, nor on QEMU\'s secondary)', '');
    L.push('Ours sets TCP_NODELAY on its own sockets whatever the primary does.', '');
    for (const [metric, label] of [['transferMs', 'transfer (secondary clock)'], ['primarySendToReceivedMs', 'primary SEND→RECEIVED'], ['primaryRequestToLoadedMs', 'primary REQUEST→LOADED']] as const) {
      L.push(`### ${label}, stock`, '');
      L.push(...seedTable(ss, modes, metric, false, false, 'run', cLabel), '');
    }
  }
  if (ss.some((s) => s.spec.workload === 'load' && s.n > 0)) {
    L.push('### Load, per megabyte', '');
    L.push(synth
      ? 'Transfer time (secondary clock) per MB of dirty pages, mean over checkpoints ≥ 1 MB, and the throughput while transferring. With the synthetic primary this includes the JavaScript sender\'s own time to produce the pages (it runs in the benchmark process, on the same 2 cores).'
      : 'The upload reaches a different rate in each cell (the guest is TCG on a shared 2-core machine, and QEMU\'s secondary runs its own copy of the guest, which takes CPU from the primary), so the load cells do not all move the same MB per checkpoint. Normalised: transfer time (secondary clock) per MB of dirty pages, mean over checkpoints ≥ 1 MB, and the throughput while transferring.', '');
    L.push('| | MB/ckpt (C) | MB/ckpt (ours) | ms/MB C | ms/MB ours | ours / C | GB/s C | GB/s ours |', '|---|---:|---:|---:|---:|---:|---:|---:|');
    for (const nodelay of [true, false]) {
      for (const ch of modes) {
        const c = find(ss, ch, 'load', 'qemu', nodelay), o = find(ss, ch, 'load', 'ours', nodelay);
        if (!c && !o) continue;
        const per = (name: string | undefined) => {
          const r = results.find((x) => x.name === name);
          const v = (r?.checkpoints ?? []).filter((t) => t.transferMs !== undefined && (t.dirtyPages ?? 0) * MiB4K >= 1e6)
            .map((t) => t.transferMs! / ((t.dirtyPages! * MiB4K) / 1e6));
          return v.length ? sum(v) / v.length : undefined;
        };
        const pc = per(c?.name), po = per(o?.name);
        const f2 = (x: number | undefined) => (x === undefined ? '–' : x.toFixed(2));
        L.push(`| ${modeName(ch)}${nodelay ? '' : ' (stock, no NODELAY)'} | ${f2(c?.mbPerCheckpoint.mean)} | ${f2(o?.mbPerCheckpoint.mean)} | ${f2(pc)} | ${f2(po)} | ${ratio(po, pc)} | ${f2(c?.transferGBps)} | ${f2(o?.transferGBps)} |`);
      }
    }
    L.push('');
  }
  L.push(`![transfer-time CDF per cell](${chartFiles.png ?? chartFiles.svg})`, '');
  L.push(`Chart: ${chartFiles.svg}${chartFiles.png ? ` (PNG: ${chartFiles.png})` : ''} — CDF of the transfer time per cell${synth ? ' (ours; the synthetic primary has no trace, so no dashed primary-clock lines)' : ', ours beside QEMU\'s; solid = secondary\'s own clock, dashed = primary SEND→RECEIVED'}.`, '');
  if (chartFiles.sizeSvg) {
    L.push(`![transfer time vs checkpoint size](${chartFiles.sizePng ?? chartFiles.sizeSvg})`, '');
    L.push(`Chart: ${chartFiles.sizeSvg}${chartFiles.sizePng ? ` (PNG: ${chartFiles.sizePng})` : ''} — transfer time (secondary clock) against the checkpoint's dirty MB, load cells.`, '');
  }

  L.push('## Cells', '');
  L.push('| cell | ok | measured | MB/ckpt mean (p99) | ours payload MB mean | GB/s while transferring | upload MB/s | load avg start → end | note |', '|---|---|---:|---:|---:|---:|---:|---|---|');
  for (const s of ss) {
    const retried = results.find((r) => r.name === s.name)?.retriedAfter;
    const note = [s.error ?? '', retried ? `ran again after: ${retried.join('; ')}` : '', s.pairing && s.pairing.mismatched > 0 ? `${s.pairing.mismatched} checkpoints disagree with the primary on the page count` : ''].filter(Boolean).join('; ');
    L.push(`| ${s.name} | ${s.ok ? 'yes' : '**no**'} | ${s.n} | ${s.n ? `${s.mbPerCheckpoint.mean.toFixed(2)} (${s.mbPerCheckpoint.p99.toFixed(2)})` : '–'} | ${s.payloadMB ? s.payloadMB.mean.toFixed(2) : '–'} | ${s.transferGBps !== undefined ? s.transferGBps.toFixed(2) : '–'} | ${s.uploadMBps ?? '–'} | ${s.loadavgStart[0]} → ${s.loadavgEnd[0]} | ${note.replace(/\|/g, '/').replace(/\n/g, ' ').slice(0, 300)} |`);
  }
  L.push('', 'MB/ckpt = pages the primary\'s bitmap sync found dirty × 4 KiB (zero pages included; the same count for both secondaries). GB/s while transferring = those bytes / transfer time (DESIGN.md limits here: Node socket → SAB 4.7 GB/s over 4 connections, C→C loopback 6.8 GB/s; the TCG primary is the sender).', '');

  if (results.some((r) => r.sched)) {
    L.push('## CPU per measured checkpoint (from /proc/PID/task/*/schedstat)', '');
    L.push('CPU = time on a CPU, wait = time runnable but waiting for one (both summed over the process\'s threads, divided by the checkpoints in the measured window). On this shared 2-core machine a high wait means the process was ready but other work held the cores.', '');
    L.push('| cell | secondary CPU ms | secondary wait ms | secondary busiest threads (CPU/wait ms) | primary CPU ms | primary wait ms |', '|---|---:|---:|---|---:|---:|');
    for (const r of results) {
      const sc = r.sched?.secondary, pr = r.sched?.primary;
      if (!sc) continue;
      const th = sc.threads.slice(0, 3).map((t) => `${t.comm} ${t.runMs.toFixed(1)}/${t.waitMs.toFixed(1)}`).join(', ');
      L.push(`| ${r.name} | ${sc.runMs.toFixed(2)} | ${sc.waitMs.toFixed(2)} | ${th} | ${pr ? pr.runMs.toFixed(2) : '–'} | ${pr ? pr.waitMs.toFixed(2) : '–'} |`);
    }
    L.push('');
  }
  if (results.some((r) => r.memory)) {
    L.push('## Secondary memory at the end of the measured window (/proc/PID/status)', '');
    L.push('VmHWM = peak resident set, VmRSS = resident now, AnonHugePages = of it in transparent huge pages (smaps_rollup). QEMU\'s secondary holds guest RAM, a full COLO cache and runs the guest; ours holds committed pages plus the checkpoint in progress.', '');
    L.push('| cell | VmHWM MiB | VmRSS MiB | AnonHugePages MiB |', '|---|---:|---:|---:|');
    for (const r of results) if (r.memory) L.push(`| ${r.name} | ${r.memory.vmHWMMiB} | ${r.memory.vmRSSMiB} | ${r.memory.anonHugePagesMiB} |`);
    L.push('');
  }
  L.push('## Every timing, per cell (mean | p50 | p99 | max, ms)', '');
  for (const m of METRICS) {
    if (!ss.some((s) => s.metrics[m.key])) continue;
    L.push(`### ${m.label}`, '', m.def, '', '| cell | n | mean | p50 | p99 | max |', '|---|---:|---:|---:|---:|---:|');
    for (const s of ss) {
      const d = s.metrics[m.key];
      if (d) L.push(`| ${s.name} | ${d.n} | ${distCells(d)} |`);
    }
    L.push('');
  }
  return L.join('\n') + '\n';
}

// ---------------------------------------------------------------------------------- chart

const COLORS: Record<string, string> = { ours: '#1f6fd1', qemu: '#e07b00' };

function escapeXml(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

function niceStep(range: number): number {
  const raw = range / 5;
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * p) return m * p;
  return 10 * p;
}

/** CDFs of the transfer time, one panel per (mode, workload), ours beside QEMU's. */
export function svgChart(info: RunInfo, results: CellResult[], nodelay = true): string {
  const modes = info.config.modes;
  const workloads = info.config.workloads;
  const W = 460, H = 300, pad = { l: 56, r: 16, t: 34, b: 42 };
  const cols = workloads.length, rows = modes.length;
  const totalW = cols * W, totalH = rows * H + 50;
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${totalW}" height="${totalH}" viewBox="0 0 ${totalW} ${totalH}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">`);
  out.push(`<rect width="100%" height="100%" fill="white"/>`);
  const qv = /version (\S+)/.exec(info.machine.qemuVersion ?? '')?.[1] ?? '?';
  out.push(`<text x="${totalW / 2}" y="20" text-anchor="middle" font-size="15" font-weight="bold">${escapeXml(`COLO transfer time per checkpoint (CDF) — ${info.primary === 'synthetic' ? 'synthetic primary' : `QEMU ${qv} TCG primary`}, ${info.machine.guestRamMiB} MiB, ${info.config.intervalMs} ms, ${info.date}`)}</text>`);
  out.push(`<text x="${totalW / 2}" y="38" text-anchor="middle" fill="#444">${escapeXml('solid: secondary\'s own clock (VMSTATE_SEND → RAM loaded); dashed: primary\'s clock (trace VMSTATE_SEND → RECEIVED)')}</text>`);
  modes.forEach((ch, r) => workloads.forEach((w, c) => {
    const x0 = c * W, y0 = 50 + r * H;
    const px = x0 + pad.l, py = y0 + pad.t, pw = W - pad.l - pad.r, ph = H - pad.t - pad.b;
    const cells = results.filter((x) => x.channels === ch && x.workload === w && x.nodelay === nodelay && x.checkpoints.length > 0);
    const series: { label: string; color: string; dash: boolean; xs: number[] }[] = [];
    for (const cell of cells) {
      const lab = cell.secondary === 'ours' ? 'ours' : 'QEMU C';
      const own = cell.checkpoints.map((t) => t.transferMs).filter((v): v is number => v !== undefined);
      if (own.length) series.push({ label: `${lab}, own clock`, color: COLORS[cell.secondary]!, dash: false, xs: own });
      const pri = cell.checkpoints.map((t) => t.primarySendToReceivedMs).filter((v): v is number => v !== undefined);
      if (pri.length) series.push({ label: `${lab}, primary clock`, color: COLORS[cell.secondary]!, dash: true, xs: pri });
    }
    out.push(`<g>`);
    out.push(`<text x="${x0 + W / 2}" y="${y0 + 20}" text-anchor="middle" font-weight="bold">${escapeXml(`${modeName(ch)}, ${w}`)}</text>`);
    out.push(`<rect x="${px}" y="${py}" width="${pw}" height="${ph}" fill="none" stroke="#888"/>`);
    if (series.length === 0) {
      out.push(`<text x="${px + pw / 2}" y="${py + ph / 2}" text-anchor="middle" fill="#888">no data</text></g>`);
      return;
    }
    const p99s = series.map((s) => { const v = [...s.xs].sort((a, b) => a - b); return v[Math.min(v.length - 1, Math.ceil(0.99 * v.length) - 1)]!; });
    const maxAll = Math.max(...series.map((s) => Math.max(...s.xs)));
    let xmax = Math.min(maxAll, Math.max(...p99s) * 1.4);
    const step = niceStep(xmax);
    xmax = Math.ceil(xmax / step) * step;
    const clipped = maxAll > xmax;
    const X = (v: number) => px + Math.min(1, v / xmax) * pw;
    const Y = (f: number) => py + ph - f * ph;
    for (let v = 0; v <= xmax + 1e-9; v += step) {
      out.push(`<line x1="${X(v).toFixed(1)}" y1="${py}" x2="${X(v).toFixed(1)}" y2="${py + ph}" stroke="#eee"/>`);
      out.push(`<text x="${X(v).toFixed(1)}" y="${py + ph + 15}" text-anchor="middle" fill="#333">${+v.toFixed(3)}</text>`);
    }
    for (const f of [0, 0.25, 0.5, 0.75, 0.9, 0.99, 1]) {
      out.push(`<line x1="${px}" y1="${Y(f).toFixed(1)}" x2="${px + pw}" y2="${Y(f).toFixed(1)}" stroke="${f === 0.99 ? '#fbb' : '#eee'}"/>`);
      if (f < 1) out.push(`<text x="${px - 5}" y="${(Y(f) + 4).toFixed(1)}" text-anchor="end" fill="#333">${f}</text>`);
    }
    out.push(`<text x="${px + pw / 2}" y="${py + ph + 32}" text-anchor="middle" fill="#333">ms${clipped ? ` (axis cut at ${xmax}; max ${maxAll.toFixed(1)})` : ''}</text>`);
    series.forEach((s, i) => {
      const v = [...s.xs].sort((a, b) => a - b);
      const pts: string[] = [`${X(v[0]!).toFixed(1)},${Y(0).toFixed(1)}`];
      v.forEach((x, k) => {
        pts.push(`${X(x).toFixed(1)},${Y(k / v.length).toFixed(1)}`, `${X(x).toFixed(1)},${Y((k + 1) / v.length).toFixed(1)}`);
      });
      out.push(`<polyline fill="none" stroke="${s.color}" stroke-width="1.8"${s.dash ? ' stroke-dasharray="5,3"' : ''} points="${pts.join(' ')}"/>`);
      const ly = py + ph - 8 - (series.length - 1 - i) * 15;
      const mean = v.reduce((a, b) => a + b, 0) / v.length;
      out.push(`<line x1="${px + pw - 210}" y1="${ly - 4}" x2="${px + pw - 190}" y2="${ly - 4}" stroke="${s.color}" stroke-width="2"${s.dash ? ' stroke-dasharray="5,3"' : ''}/>`);
      out.push(`<text x="${px + pw - 186}" y="${ly}" font-size="10.5" fill="#222">${escapeXml(`${s.label}: mean ${ms(mean)}`)}</text>`);
    });
    out.push(`</g>`);
  }));
  out.push('</svg>');
  return out.join('\n') + '\n';
}

/** Transfer time against checkpoint size (load cells), one panel per mode, ours beside QEMU's. */
export function svgSizeChart(info: RunInfo, results: CellResult[], nodelay = true): string {
  const modes = info.config.modes;
  const W = 460, H = 320, pad = { l: 56, r: 16, t: 34, b: 42 };
  const totalW = modes.length * W, totalH = H + 50;
  const cells = results.filter((r) => r.workload === 'load' && r.nodelay === nodelay && r.checkpoints.length > 0);
  const pts = (r: CellResult) => r.checkpoints.filter((t) => t.transferMs !== undefined && t.dirtyPages !== undefined)
    .map((t) => [t.dirtyPages! * MiB4K / 1e6, t.transferMs!] as const);
  const all = cells.flatMap(pts);
  const xmaxRaw = Math.max(1, ...all.map((p) => p[0]));
  const ys = all.map((p) => p[1]).sort((a, b) => a - b);
  const ymaxRaw = Math.max(1, ys[Math.min(ys.length - 1, Math.ceil(0.99 * ys.length) - 1)] ?? 1) * 1.2;
  const xs = niceStep(xmaxRaw), xmax = Math.ceil(xmaxRaw / xs) * xs;
  const yst = niceStep(ymaxRaw), ymax = Math.ceil(ymaxRaw / yst) * yst;
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${totalW}" height="${totalH}" viewBox="0 0 ${totalW} ${totalH}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">`);
  out.push(`<rect width="100%" height="100%" fill="white"/>`);
  out.push(`<text x="${totalW / 2}" y="20" text-anchor="middle" font-size="15" font-weight="bold">${escapeXml(`Transfer time vs checkpoint size under load — ${info.date}`)}</text>`);
  out.push(`<text x="${totalW / 2}" y="38" text-anchor="middle" fill="#444">${escapeXml(`x: dirty MB in the checkpoint (primary bitmap sync); y: VMSTATE_SEND → RAM loaded, secondary clock (axis cut at ${ymax} ms)`)}</text>`);
  modes.forEach((ch, c) => {
    const x0 = c * W, y0 = 50;
    const px = x0 + pad.l, py = y0 + pad.t, pw = W - pad.l - pad.r, ph = H - pad.t - pad.b;
    const X = (v: number) => px + Math.min(1, v / xmax) * pw;
    const Y = (v: number) => py + ph - Math.min(1, v / ymax) * ph;
    out.push(`<text x="${x0 + W / 2}" y="${y0 + 20}" text-anchor="middle" font-weight="bold">${escapeXml(`${modeName(ch)}, load`)}</text>`);
    out.push(`<rect x="${px}" y="${py}" width="${pw}" height="${ph}" fill="none" stroke="#888"/>`);
    for (let v = 0; v <= xmax + 1e-9; v += xs) {
      out.push(`<line x1="${X(v).toFixed(1)}" y1="${py}" x2="${X(v).toFixed(1)}" y2="${py + ph}" stroke="#eee"/>`);
      out.push(`<text x="${X(v).toFixed(1)}" y="${py + ph + 15}" text-anchor="middle" fill="#333">${+v.toFixed(3)}</text>`);
    }
    for (let v = 0; v <= ymax + 1e-9; v += yst) {
      out.push(`<line x1="${px}" y1="${Y(v).toFixed(1)}" x2="${px + pw}" y2="${Y(v).toFixed(1)}" stroke="#eee"/>`);
      out.push(`<text x="${px - 5}" y="${(Y(v) + 4).toFixed(1)}" text-anchor="end" fill="#333">${+v.toFixed(3)}</text>`);
    }
    out.push(`<text x="${px + pw / 2}" y="${py + ph + 32}" text-anchor="middle" fill="#333">MB per checkpoint</text>`);
    const here = cells.filter((r) => r.channels === ch);
    here.forEach((r, i) => {
      const color = COLORS[r.secondary]!;
      for (const [x, y] of pts(r)) out.push(`<circle cx="${X(x).toFixed(1)}" cy="${Y(y).toFixed(1)}" r="2.3" fill="${color}" fill-opacity="0.55"/>`);
      const ly = py + 14 + i * 15;
      const s = summarize(r);
      out.push(`<circle cx="${px + 12}" cy="${ly - 4}" r="4" fill="${color}"/>`);
      out.push(`<text x="${px + 20}" y="${ly}" font-size="10.5" fill="#222">${escapeXml(`${r.secondary === 'ours' ? 'ours' : 'QEMU C'}: ${s.transferGBps !== undefined ? s.transferGBps.toFixed(2) : '?'} GB/s, ${s.mbPerCheckpoint.mean.toFixed(1)} MB/ckpt`)}</text>`);
    });
  });
  out.push('</svg>');
  return out.join('\n') + '\n';
}

export { cellName };
