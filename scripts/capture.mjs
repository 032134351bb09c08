#!/usr/bin/env node
// capture.mjs — record small real QEMU migration streams into test/fixtures/captures/.
//
//   npm run build && node scripts/capture.mjs [precopy-plain] [precopy-mfd2] [colo-plain] [colo-mfd2] [--out DIR] [--qemu 7.2|10.0]
//
// --qemu 10.0: stock QEMU 10.0.2 (scripts/install-qemu10.sh) for precopy, the COLO build
// (scripts/build-qemu10-colo.sh) as the COLO primary; default out dir test/fixtures/captures-qemu10
// (kept apart from the 7.2 captures the fuzzer's seeds are described against).
//
// A recording TCP proxy sits between QEMU (the source / COLO primary) and an in-process
// colo-receiver (so the source completes and a COLO primary gets its replies). Every
// connection is recorded on its own: the bytes the source sent (main.bin, multifd-<id>.bin)
// and, for the main connection, the bytes the receiver sent back (main.replies.bin). For each
// recorded chunk the proxy notes how many reply bytes it had already seen on the main
// connection: index.json keeps these "gates", so a replayer can hold back bytes that QEMU only
// sent after a reply (a COLO primary waits for CHECKPOINT_REPLY before the RAM part).
// Streams larger than 64 KiB are stored gzipped (.bin.gz).
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { gzipSync } from 'node:zlib';
import { setTimeout as sleep } from 'node:timers/promises';

const root = new URL('..', import.meta.url).pathname;
const dist = (p) => new URL(`../dist/src/${p}`, import.meta.url).href;
const { ColoPrimary, ensureShim, PRIMARY_TRACE_EVENTS, QemuProcess, qemuBinaryFor, qemuVersion, shimEnv, startPrecopySource } = await import(dist('harness/index.js'));
const { IncomingMigration } = await import(dist('migration/incoming.js'));
const { listenForMigration } = await import(dist('net/listener.js'));
const { imageBlockBytes } = await import(dist('memory/ram-block.js'));
const { silentLogger } = await import(dist('log.js'));

const QEVM = 0x5145564d, MULTIFD = 0x11223344;
const args = process.argv.slice(2);
let out = null;
let flavour = '7.2';
const which = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--out') out = resolve(args[++i]);
  else if (args[i] === '--qemu') flavour = args[++i];
  else which.push(args[i]);
}
if (!['7.2', '10.0'].includes(flavour)) { console.error('--qemu must be 7.2 or 10.0'); process.exit(1); }
out ??= join(root, flavour === '7.2' ? 'test/fixtures/captures' : 'test/fixtures/captures-qemu10');
const precopyBinary = qemuBinaryFor(flavour);
const coloBinary = qemuBinaryFor(flavour === '7.2' ? '7.2' : '10.0-colo');
const ALL = ['precopy-plain', 'precopy-mfd2', 'colo-plain', 'colo-mfd2'];
const runs = which.length ? which : ALL;
for (const w of runs) if (!ALL.includes(w)) { console.error(`unknown capture ${w}; one of ${ALL.join(', ')}`); process.exit(1); }

/** One proxied connection: what the source sent, in chunks, each with the main-channel reply bytes seen before it. */
class Recorded {
  constructor(n) { this.n = n; this.chunks = []; this.bytes = 0; this.gates = []; this.replies = []; }
  get head() { return this.chunks.length ? Buffer.concat(this.chunks.slice(0, 4)) : Buffer.alloc(0); }
  get role() {
    const h = this.head;
    if (h.length < 4) return 'unknown';
    const m = h.readUInt32BE(0);
    return m === QEVM ? 'main' : m === MULTIFD ? (h.length >= 25 ? `multifd-${h[24]}` : 'multifd-?') : 'unknown';
  }
}

/** The recording proxy: 127.0.0.1:<port> -> 127.0.0.1:<upstream>. */
async function startProxy(upstream) {
  const conns = [];
  let mainReplies = 0;
  const server = net.createServer((client) => {
    const rec = new Recorded(conns.length);
    conns.push(rec);
    const up = net.connect(upstream, '127.0.0.1');
    client.setNoDelay(true); up.setNoDelay(true);
    client.on('data', (c) => {
      // The gate: reply bytes the main connection had delivered to the source before this chunk.
      const gate = mainReplies;
      const last = rec.gates[rec.gates.length - 1];
      if (!last || last[1] !== gate) rec.gates.push([rec.bytes, gate]);
      rec.chunks.push(Buffer.from(c));
      rec.bytes += c.length;
      up.write(c);
    });
    up.on('data', (c) => {
      rec.replies.push(Buffer.from(c));
      if (rec.role === 'main') mainReplies += c.length;
      client.write(c);
    });
    client.on('end', () => up.end());
    up.on('end', () => client.end());
    client.on('error', () => up.destroy());
    up.on('error', () => client.destroy());
    client.on('close', () => up.destroy());
    up.on('close', () => client.destroy());
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return { server, port: server.address().port, conns };
}

async function startReceiver(opts) {
  const mig = new IncomingMigration({ threads: 2, log: silentLogger, ioTimeoutMs: 60_000, ...opts });
  const server = await listenForMigration(mig, { port: 0, log: silentLogger });
  return { mig, server, port: server.address().port };
}

const sha = (b) => createHash('sha256').update(b).digest('hex');

function save(name, conns, meta) {
  const dir = join(out, name);
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const files = [];
  const write = (base, data) => {
    const gz = data.length > 64 * 1024;
    const file = gz ? `${base}.gz` : base;
    writeFileSync(join(dir, file), gz ? gzipSync(data, { level: 9 }) : data);
    return file;
  };
  for (const c of conns) {
    const role = c.role;
    if (role === 'unknown') continue;
    const data = Buffer.concat(c.chunks);
    const entry = { role, file: write(`${role}.bin`, data), bytes: data.length, sha256: sha(data), gates: c.gates };
    if (role === 'main') {
      const rep = Buffer.concat(c.replies);
      entry.replies = { file: write('main.replies.bin', rep), bytes: rep.length, sha256: sha(rep) };
    }
    files.push(entry);
  }
  files.sort((a, b) => (a.role === 'main' ? -1 : b.role === 'main' ? 1 : a.role.localeCompare(b.role, 'en', { numeric: true })));
  writeFileSync(join(dir, 'index.json'), JSON.stringify({ name, qemu: qemuVersion(meta.kind === 'colo' ? coloBinary : precopyBinary), ...meta, connections: files }, null, 2) + '\n');
  console.log(`${name}: ${files.map((f) => `${f.file} ${f.bytes} B`).join(', ')}`);
}

function commandLine(proc, env) {
  return { argv: ['qemu-system-x86_64', ...proc.argv.slice(1)].map((a) => a.replace(/\/tmp\/[^,]*\//g, '$RUNDIR/')), env };
}

async function precopy(name, multifd) {
  const dir = mkdtempSync(join(tmpdir(), `capture-${name}-`));
  // Loader files of random data: known non-zero bytes in a paused guest's RAM.
  const a = randomBytes(192 * 1024), b = randomBytes(256 * 1024);
  writeFileSync(join(dir, 'a.bin'), a);
  writeFileSync(join(dir, 'b.bin'), b);
  const recv = await startReceiver({ multifdChannels: multifd ?? 0 });
  const proxy = await startProxy(recv.port);
  const src = await startPrecopySource({
    runDir: dir, memMiB: 32,
    loaderFiles: [{ path: join(dir, 'a.bin'), addr: 0x100000 }, { path: join(dir, 'b.bin'), addr: 0x1400000 }],
    ...(multifd ? { multifd: { channels: multifd } } : {}),
    binary: precopyBinary,
  });
  try {
    await src.stop();
    await src.migrate(`tcp:127.0.0.1:${proxy.port}`);
    await src.waitMigrationDone(120_000);
    const o = await recv.mig.done;
    if (o.kind !== 'completed') throw new Error(`receiver: ${JSON.stringify(o)}`);
    await sleep(200);
    const mem = await (await import('node:fs/promises')).readFile(await src.pmemsave(0, 32 * 1024 * 1024, join(dir, 'source.mem')));
    const img = await recv.mig.committedImage();
    const ram = imageBlockBytes(img.blocks.find((x) => x.idstr === 'pc.ram'));
    // As test/qemu/precopy.test.ts: below VGA and from 1 MiB up.
    if (!ram.subarray(0, 0xa0000).equals(mem.subarray(0, 0xa0000)) || !ram.subarray(0x100000).equals(mem.subarray(0x100000, ram.length))) {
      throw new Error('received pc.ram differs from the source');
    }
    save(name, proxy.conns, {
      kind: 'precopy', multifdChannels: multifd ?? 0, colo: false,
      command: commandLine(src.proc, {}),
      loaderFiles: [{ addr: '0x100000', bytes: a.length, sha256: sha(a) }, { addr: '0x1400000', bytes: b.length, sha256: sha(b) }],
      pcRamSha256: sha(ram),
      blocks: img.blocks.map((x) => ({ idstr: x.idstr, usedLength: x.usedLength })),
      qmp: { capabilities: { multifd: !!multifd }, parameters: { ...(multifd ? { 'multifd-channels': multifd, 'multifd-compression': 'none' } : {}), 'max-bandwidth': 2 ** 40 } },
    });
  } finally {
    await src.kill().catch(() => undefined);
    proxy.server.close();
    recv.server.close();
    await recv.mig.close().catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * A COLO session from a real 7.2 primary. The guest is SeaBIOS alone (no kernel: it finds no
 * boot device and idles), with loader files of random data in RAM: the harness's Linux guest
 * makes a 55 MB initial migration (its kernel image sits in RAM), too big for a fixture. The
 * primary runs as the harness runs it (TCG, qemu64, the colo shim with TLB flush and NODELAY,
 * colo_* trace to count checkpoints); checkpoints carry the pages the BIOS and devices dirty.
 */
async function colo(name, checkpoints, memMiB, multifd) {
  const dir = mkdtempSync(join(tmpdir(), `capture-${name}-`));
  const a = randomBytes(128 * 1024);
  writeFileSync(join(dir, 'a.bin'), a);
  const shim = await ensureShim();
  const env = shimEnv({ shim, tlbFlush: true, nodelay: true });
  const recv = await startReceiver({ multifdChannels: multifd, heartbeatTimeoutMs: 0 });
  const proxy = await startProxy(recv.port);
  const proc = QemuProcess.start({
    runDir: dir, role: 'primary', cpu: 'qemu64', memMiB,
    devices: [`loader,file=${join(dir, 'a.bin')},addr=0x200000,force-raw=on`],
    trace: { events: PRIMARY_TRACE_EVENTS }, msgTimestamp: true, env, binary: coloBinary,
  });
  const primary = new ColoPrimary(proc, { guest: { kernel: '', initrd: '' }, runDir: dir, checkpointDelayMs: 300, ...(multifd ? { multifd: { channels: multifd } } : {}) }, 0, 0);
  try {
    await primary.migrate(`tcp:127.0.0.1:${proxy.port}`, { parameters: { 'max-bandwidth': 10_000_000_000 } });
    await primary.waitColo(120_000);
    await primary.waitCheckpoints(checkpoints, 120_000);
    // Stop between checkpoints: kill right after a VMSTATE_LOADED went back.
    await primary.kill();
    const o = await recv.mig.done;
    const img = await recv.mig.committedImage();
    save(name, proxy.conns, {
      kind: 'colo', multifdChannels: multifd, colo: true,
      command: commandLine(proc, { LD_PRELOAD: '.build/colo-shim.so', COLO_SHIM_TLBFLUSH: '1', COLO_SHIM_NODELAY: '1' }),
      loaderFiles: [{ addr: '0x200000', bytes: a.length, sha256: sha(a) }],
      qmp: {
        capabilities: { 'x-colo': true, multifd: !!multifd },
        parameters: { 'x-checkpoint-delay': 300, 'max-bandwidth': 10_000_000_000, ...(multifd ? { 'multifd-channels': multifd, 'multifd-compression': 'none' } : {}) },
      },
      receiverOutcome: { kind: o.kind, code: o.error?.code ?? null, committedCheckpoint: img?.checkpoint ?? -1 },
      blocks: img?.blocks.map((x) => ({ idstr: x.idstr, usedLength: x.usedLength })) ?? [],
    });
  } finally {
    await proc.kill().catch(() => undefined);
    proxy.server.close();
    recv.server.close();
    await recv.mig.close().catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  }
}

for (const w of runs) {
  if (w === 'precopy-plain') await precopy(w, undefined);
  else if (w === 'precopy-mfd2') await precopy(w, 2);
  else if (w === 'colo-plain') await colo(w, Number(process.env.CAPTURE_CHECKPOINTS ?? 4), Number(process.env.CAPTURE_MEM_MIB ?? 32), 0);
  else if (w === 'colo-mfd2') await colo(w, Number(process.env.CAPTURE_CHECKPOINTS ?? 4), Number(process.env.CAPTURE_MEM_MIB ?? 32), 2);
}
process.exit(0);
