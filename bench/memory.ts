// node dist/bench/memory.js [--mem-mib 2048] [--channels 0] [--colo] [--no-huge-pages]
//
// Memory of the receiver for a real QEMU 7.2 precopy of a stopped guest (almost every page
// zero; issue 15 measured 4.26 GB VmHWM with --colo for 2 GiB before the page table): the
// `colo-receiver listen` CLI as a user runs it, its --stats-json memory figures (VmHWM of the
// process that holds the guest, slab bytes, AnonHugePages) printed as JSON.
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { startPrecopySource } from '../src/harness/index.js';
import { ReceiverChild } from './lib/receiver.js';
import { printUsageAndExit } from './usage.js';

const { values: o } = parseArgs({
  options: {
    help: { type: 'boolean', short: 'h', default: false },
    'mem-mib': { type: 'string', default: '2048' },
    channels: { type: 'string', default: '0' },
    colo: { type: 'boolean', default: false },
    'no-huge-pages': { type: 'boolean', default: false },
  },
});
if (o.help) printUsageAndExit(import.meta.url);
const memMiB = Number(o['mem-mib']);
const channels = Number(o.channels);
const dir = await mkdtemp(join(tmpdir(), 'colo-memory-'));
const args = ['--stats-json', join(dir, 'stats.json'), '--multifd-channels', String(channels), '--heartbeat-timeout', '0',
  ...(o.colo ? ['--colo'] : []), ...(o['no-huge-pages'] ? ['--no-huge-pages'] : [])];
const recv = ReceiverChild.start(args, join(dir, 'receiver.log'));
const port = await recv.port();
const src = await startPrecopySource({ runDir: dir, memMiB, ...(channels > 0 ? { multifd: { channels } } : {}) });
try {
  await src.stop();
  const t0 = Date.now();
  await src.migrate(`tcp:127.0.0.1:${port}`, { parameters: { 'max-bandwidth': 10_000_000_000 } });
  await src.waitMigrationDone(600_000);
  const ms = Date.now() - t0;
  // With --colo the receiver holds the image as committed checkpoint 0 until the peer is gone.
  await src.kill();
  const code = await recv.wait(60_000);
  const stats = JSON.parse(await readFile(join(dir, 'stats.json'), 'utf8')) as { outcome: string; pages: number; zeroPages: number; memory: Record<string, number> };
  const mib = (n: number | undefined) => Math.round((n ?? 0) / 2 ** 20 * 10) / 10;
  console.log(JSON.stringify({
    guestMiB: memMiB, channels, colo: o.colo, hugePages: !o['no-huge-pages'], exit: code, outcome: stats.outcome, migrateMs: ms,
    pages: stats.pages, zeroPages: stats.zeroPages,
    vmHWMMiB: mib(stats.memory.vmHWMBytes), vmRSSMiB: mib(stats.memory.vmRSSBytes), anonHugePagesMiB: mib(stats.memory.anonHugePagesBytes),
    slabMiB: mib(stats.memory.slabBytes), peakSlabMiB: mib(stats.memory.peakSlabBytes), committedSlots: stats.memory.committedSlots,
  }));
} finally {
  await src.kill();
  recv.kill();
}
