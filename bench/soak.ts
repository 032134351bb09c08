// npm run soak (= npm run build && node dist/bench/soak.js): a long COLO session into the
// receiver (issue "Hardening"): >= 10,000 checkpoints from the synthetic primary (multifd-4,
// 'load' workload, modest RAM, no pause between checkpoints), with the receiver's RSS, heap and
// event-loop delay sampled along the way and its per-checkpoint timing summary at the end.
//
//   node dist/bench/soak.js [--checkpoints 10000] [--ram-mib 64] [--channels 4] [--layout 7.2|10.x]
//                           [--workload load|idle|PAGES] [--zero-fraction 0.4] [--samples 10] [--json FILE]
//
// The primary runs in a child process (this file with --primary), so the figures are the
// receiver's alone: one process, one IncomingMigration, real loopback sockets through
// src/net/listener.ts. At the end the primary reports a sha256 per RAMBlock of its memory at
// the last checkpoint; the receiver's committed image must match it.
import type { ImageBlock } from '../src/memory/ram-block.js';
import { fork } from 'node:child_process';
import { createHash } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { silentLogger } from '../src/log.js';
import { IncomingMigration } from '../src/migration/incoming.js';
import { listenForMigration } from '../src/net/listener.js';
import { SyntheticSource } from '../src/sender/source.js';
import { defaultRamBlocks, type MemoryModelOptions, type Workload } from '../src/sender/memory-model.js';

const { values: a } = parseArgs({
  options: {
    checkpoints: { type: 'string', default: '10000' },
    'ram-mib': { type: 'string', default: '64' },
    channels: { type: 'string', default: '4' },
    layout: { type: 'string', default: '7.2' },
    workload: { type: 'string', default: 'load' },
    'zero-fraction': { type: 'string', default: '0.4' },
    samples: { type: 'string', default: '10' },
    threads: { type: 'string' },
    json: { type: 'string' },
    primary: { type: 'string' },       // internal: run as the primary, connecting to this port
    help: { type: 'boolean', short: 'h', default: false },
  },
});
if (a.help) {
  process.stdout.write(`Soak: a long COLO session from the synthetic primary into one receiver.

  node dist/bench/soak.js [--checkpoints 10000] [--ram-mib 64] [--channels 4] [--layout 7.2|10.x]
                          [--workload load|idle|PAGES] [--zero-fraction 0.4] [--samples 10] [--threads T] [--json FILE]

Reports RSS and heap at start, after the initial migration and at the end, event-loop delay
p99 per window, checkpoint timings, and checks the final committed image against the primary.
`);
  process.exit(0);
}
const checkpoints = Number(a.checkpoints);
const ramMiB = Number(a['ram-mib']);
const channels = Number(a.channels);
const layout = a.layout as '7.2' | '10.x';
const workload: Workload = a.workload === 'load' || a.workload === 'idle' ? a.workload : { pages: Number(a.workload) };
const zeroFraction = Number(a['zero-fraction']);
/**
 * Guests above 2 GiB: pc.ram in 2 GiB blocks (pc.ram, pc.ram.1, ...), since the synthetic
 * primary holds each block in one Buffer and Node 20's Buffers end at 4 GiB.
 */
function memoryOptions(): MemoryModelOptions {
  if (ramMiB <= 2048) return { ramMiB, zeroFraction };
  const blocks = defaultRamBlocks(1).slice(1);
  for (let at = 0, i = 0; at < ramMiB; at += 2048, i++) blocks.splice(i, 0, { idstr: i === 0 ? 'pc.ram' : `pc.ram.${i}`, usedLength: Math.min(2048, ramMiB - at) * 2 ** 20, writable: true });
  return { blocks, zeroFraction };
}

/** sha256 of an image block read page by page through its table (no dense copy of the guest). */
const shaBlock = (b: ImageBlock): string => {
  const h = createHash('sha256'), zero = new Uint8Array(4096);
  for (let p = 0; p < b.pages; p++) h.update(b.page(p) ?? zero);
  return h.digest('hex');
};
/** sha256 in 256 MiB steps: Hash.update refuses inputs of 2 GiB and more. */
const sha = (b: Uint8Array): string => {
  const h = createHash('sha256');
  for (let at = 0; at < b.length; at += 256 << 20) h.update(b.subarray(at, Math.min(b.length, at + (256 << 20))));
  return h.digest('hex');
};

if (a.primary !== undefined) {
  // ---- the primary (child process)
  const src: SyntheticSource = new SyntheticSource({
    port: Number(a.primary), layout, channels, colo: true, checkpoints, workload, intervalMs: 0, seed: 42,
    memory: memoryOptions(),
    onCheckpoint: (info) => {
      if ((info.index + 1) % 500 === 0) process.send?.({ type: 'progress', checkpoint: info.index + 1 });
      if (info.index === checkpoints - 1) {
        process.send?.({ type: 'final', checkpoint: info.index + 1, hashes: Object.fromEntries(info.model.blocks.map((b) => [b.idstr, sha(b.host)])) });
      }
    },
  });
  const res = await src.run();
  process.send?.({ type: 'done', res });
  process.disconnect?.();
} else {
  // ---- the receiver (this process)
  const mb = (n: number) => Math.round(n / 2 ** 20 * 10) / 10;
  const mem = () => { const m = process.memoryUsage(); return { rssMiB: mb(m.rss), heapUsedMiB: mb(m.heapUsed), heapTotalMiB: mb(m.heapTotal), externalMiB: mb(m.external), arrayBuffersMiB: mb(m.arrayBuffers) }; };
  const mig = new IncomingMigration({
    multifdChannels: channels, log: silentLogger, ioTimeoutMs: 10_000, heartbeatTimeoutMs: 30_000,
    ...(a.threads !== undefined ? { threads: Number(a.threads) } : {}),
  });
  const server = await listenForMigration(mig, { port: 0, log: silentLogger });
  const port = (server.address() as AddressInfo).port;
  const loopAll = monitorEventLoopDelay({ resolution: 10 });
  const loopWin = monitorEventLoopDelay({ resolution: 10 });
  const samples: Record<string, unknown>[] = [];
  const every = Math.max(1, Math.floor(checkpoints / Number(a.samples)));
  const t0 = performance.now();
  let lastT = t0, lastN = 0;
  const sample = (checkpoint: number, label?: string): void => {
    const now = performance.now();
    samples.push({
      checkpoint, ...(label ? { at: label } : {}), seconds: Math.round((now - t0) / 100) / 10, ...mem(),
      loopDelayP99Ms: Math.round(loopWin.percentile(99) / 1e4) / 100, loopDelayMaxMs: Math.round(loopWin.max / 1e4) / 100,
      checkpointsPerSec: now > lastT ? Math.round((checkpoint - lastN) / ((now - lastT) / 1000) * 10) / 10 : 0,
    });
    loopWin.reset();
    lastT = now; lastN = checkpoint;
    console.error(JSON.stringify(samples[samples.length - 1]));
  };
  mig.on('checkpoint', (e: { index: number; initial: boolean }) => {
    if (e.initial) {
      // The initial migration is in: start measuring from the first checkpoint on.
      loopAll.enable(); loopWin.enable();
      sample(0, 'after initial migration');
      return;
    }
    if (e.index % every === 0) sample(e.index);
  });
  sample(0, 'start');
  const child = fork(new URL(import.meta.url).pathname, ['--primary', String(port), '--checkpoints', String(checkpoints), '--ram-mib', String(ramMiB),
    '--channels', String(channels), '--layout', layout, '--workload', String(a.workload), '--zero-fraction', String(zeroFraction)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  let final: { checkpoint: number; hashes: Record<string, string> } | undefined;
  let primaryResult: unknown;
  child.on('message', (m: { type: string; checkpoint?: number; hashes?: Record<string, string>; res?: unknown }) => {
    if (m.type === 'final') final = m as typeof final;
    if (m.type === 'done') primaryResult = m.res;
  });
  const outcome = await mig.done;
  // Before the image is hashed: what the session cost, not the check.
  const memoryAtEnd = mig.memoryStats();
  loopAll.disable();
  await new Promise((r) => { if (child.exitCode !== null) r(undefined); else child.once('exit', r); });
  sample(mig.committedCheckpoint, 'end');
  const img = await mig.committedImage();
  let verified: boolean | string = 'no final hashes from the primary';
  if (img && final) {
    const got = Object.fromEntries(img.blocks.map((b) => [b.idstr, shaBlock(b)]));
    const bad = Object.keys(final.hashes).filter((k) => final!.hashes[k] !== got[k]);
    verified = img.checkpoint === final.checkpoint && bad.length === 0 ? true : `checkpoint ${img.checkpoint} vs ${final.checkpoint}; differing blocks: ${bad.join(', ')}`;
  }
  const summary = mig.summary();
  const s0 = samples.find((s) => s['at'] === 'after initial migration') ?? samples[0]!;
  const s1 = samples[samples.length - 1]!;
  const report = {
    config: { checkpoints, ramMiB, channels, layout, workload: a.workload, zeroFraction, intervalMs: 0 },
    // What the protected VM costs: slab, committed slots, peak and current resident set.
    memory: memoryAtEnd,
    outcome: { kind: outcome.kind, code: outcome.kind === 'completed' ? null : outcome.error?.code ?? null, committedCheckpoint: mig.committedCheckpoint },
    committedImageMatchesPrimary: verified,
    seconds: Math.round((performance.now() - t0) / 100) / 10,
    rss: { startMiB: samples[0]!['rssMiB'], afterInitialMiB: s0['rssMiB'], endMiB: s1['rssMiB'] },
    heapUsed: { startMiB: samples[0]!['heapUsedMiB'], afterInitialMiB: s0['heapUsedMiB'], endMiB: s1['heapUsedMiB'] },
    loopDelayMs: { p50: loopAll.percentile(50) / 1e6, p99: loopAll.percentile(99) / 1e6, max: loopAll.max / 1e6 },
    checkpoints: summary['checkpoints'],
    totals: { bytes: summary['bytes'], pages: summary['pages'], zeroPages: summary['zeroPages'], channels: summary['channels'] },
    samples,
    primary: primaryResult,
  };
  server.close();
  await mig.close();
  if (a.json) writeFileSync(a.json, JSON.stringify(report, null, 2) + '\n');
  console.log(JSON.stringify(report, null, 2));
  process.exit(verified === true && mig.committedCheckpoint >= checkpoints ? 0 : 1);
}
