// npm run bench:throughput [-- --ram-mib 512 --channels 1,2,4,8 --layout 7.2 --repeat 3]
//
// The receiver's precopy throughput over loopback beside a ceiling measured in the same run.
// Streams are produced once by the QEMU-exact synthetic source and captured per connection;
// a separate process then replays them at full speed, so the sender's own cost is not in
// the figure. The ceiling replays the same bytes into a sink that only copies every socket
// chunk into a SharedArrayBuffer: what any receiver on this machine and Node pays for the
// bytes to arrive. Reported: GB/s and pages/s of the receiver, and its ratio to the ceiling.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { availableParallelism, cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer, type Server, type Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { silentLogger } from '../src/log.js';
import { IncomingMigration } from '../src/migration/incoming.js';
import type { Compression } from '../src/migration/multifd-packet.js';
import { listenForMigration } from '../src/net/listener.js';
import { SyntheticSource } from '../src/sender/source.js';

const { values: o } = parseArgs({
  options: {
    'ram-mib': { type: 'string', default: '512' },
    channels: { type: 'string', default: '1,2,4,8' },
    layout: { type: 'string', default: '7.2' },
    repeat: { type: 'string', default: '3' },
    compression: { type: 'string', default: 'none' },
    out: { type: 'string' },
  },
});
const ramMiB = Number(o['ram-mib']);
const channelList = String(o.channels).split(',').map(Number);
const repeat = Number(o.repeat);
const layout = String(o.layout) as '7.2' | '10.x';
const compression = String(o.compression) as Compression;

/** Records every byte of every connection, in connection order. */
async function capture(channels: number): Promise<Buffer[]> {
  const conns: { chunks: Buffer[] }[] = [];
  const server: Server = createServer((s: Socket) => {
    const c = { chunks: [] as Buffer[] };
    conns.push(c);
    s.on('data', (d: Buffer) => c.chunks.push(d));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as { port: number }).port;
  const src = new SyntheticSource({ port, channels, layout, iterations: 2, seed: 3, memory: { ramMiB }, compression } as ConstructorParameters<typeof SyntheticSource>[0]);
  await src.run();
  src.close();
  await new Promise((r) => setTimeout(r, 200));
  server.close();
  return conns.map((c) => Buffer.concat(c.chunks));
}

/** A child process that connects once per stream and writes them all at full speed. */
async function replay(port: number, files: string[]): Promise<void> {
  const code = `
    const net = require('node:net'), fs = require('node:fs');
    const files = ${JSON.stringify(files)};
    for (const f of files) {
      const buf = fs.readFileSync(f);
      const s = net.connect(${port}, '127.0.0.1', () => { s.setNoDelay(true); s.end(buf); });
      s.on('error', () => {});
    }`;
  const child = spawn(process.execPath, ['-e', code], { stdio: 'inherit' });
  await once(child, 'exit');
}

interface Run { seconds: number; bytes: number; pages: number }

async function runReceiver(files: string[], channels: number): Promise<Run> {
  const mig = new IncomingMigration({ multifdChannels: channels, log: silentLogger, compression });
  const server = await listenForMigration(mig, { port: 0, log: silentLogger });
  const port = (server.address() as { port: number }).port;
  const t0 = performance.now();
  const child = replay(port, files);
  const outcome = await mig.done;
  const seconds = (performance.now() - t0) / 1000;
  await child;
  server.close();
  const s = mig.summary() as { bytes: number; pages: number; zeroPages: number };
  await mig.pool.close();
  if (outcome.kind !== 'completed') throw new Error(`receiver: ${JSON.stringify(outcome)}`);
  return { seconds, bytes: s.bytes, pages: s.pages + s.zeroPages };
}

/** The ceiling: the same connections, every chunk copied into a SharedArrayBuffer, nothing parsed. */
async function runCeiling(files: string[], total: number): Promise<number> {
  const sab = new Uint8Array(new SharedArrayBuffer(64 << 20));
  let got = 0, ended = 0, at = 0;
  let done!: () => void;
  const finished = new Promise<void>((r) => { done = r; });
  const server = createServer((s) => {
    s.on('data', (d: Buffer) => {
      if (at + d.length > sab.length) at = 0;
      d.copy(sab, at);
      at += d.length;
      got += d.length;
    });
    s.on('end', () => { if (++ended === files.length) done(); });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const t0 = performance.now();
  const child = replay((server.address() as { port: number }).port, files);
  await finished;
  const seconds = (performance.now() - t0) / 1000;
  await child;
  server.close();
  if (got !== total) throw new Error(`ceiling sink got ${got} of ${total} bytes`);
  return seconds;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

const dir = await mkdtemp(join(tmpdir(), 'colo-bench-'));
const rows: string[] = [];
const results: unknown[] = [];
console.log(`# bench:throughput — node ${process.version}, ${availableParallelism()} CPUs (${cpus()[0]?.model ?? '?'}), guest ${ramMiB} MiB, layout ${layout}, compression ${compression}, median of ${repeat}`);
rows.push('| channels | stream MB | receiver GB/s | pages/s | ceiling GB/s | receiver / ceiling |', '|---|---|---|---|---|---|');
for (const ch of channelList) {
  const streams = await capture(ch);
  const files: string[] = [];
  for (const [i, b] of streams.entries()) { const f = join(dir, `ch${ch}-${i}.bin`); await writeFile(f, b); files.push(f); }
  const total = streams.reduce((s, b) => s + b.length, 0);
  const rec: Run[] = [], ceil: number[] = [];
  for (let r = 0; r < repeat; r++) {
    ceil.push(await runCeiling(files, total));
    rec.push(await runReceiver(files, ch));
  }
  const secs = median(rec.map((r) => r.seconds)), cs = median(ceil);
  const gbs = total / secs / 1e9, cgbs = total / cs / 1e9;
  const pps = rec[0]!.pages / secs;
  rows.push(`| ${ch} | ${(total / 1e6).toFixed(0)} | ${gbs.toFixed(2)} | ${(pps / 1e6).toFixed(2)} M | ${cgbs.toFixed(2)} | ${(gbs / cgbs).toFixed(2)} |`);
  results.push({ channels: ch, streamBytes: total, receiverSeconds: rec.map((r) => r.seconds), ceilingSeconds: ceil, gbPerSec: gbs, pagesPerSec: pps, ceilingGbPerSec: cgbs, ratio: gbs / cgbs });
  console.log(rows[rows.length - 1]);
}
console.log('\n' + rows.join('\n'));
if (o.out) {
  await mkdir(join(o.out, '..'), { recursive: true }).catch(() => undefined);
  await writeFile(o.out, JSON.stringify({ node: process.version, cpus: availableParallelism(), ramMiB, layout, compression, results }, null, 2));
}
await rm(dir, { recursive: true, force: true });
