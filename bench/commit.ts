// node dist/bench/commit.js [--ram-mib 512] [--dirty 6000,12000,25000] [--rounds 300]
//
// The COLO commit (colo_flush_ram_cache by page table) measured on its own: a guest of
// --ram-mib, each round a checkpoint of about --dirty pages (runs and scattered pages, 12 %
// of them zero, as the synthetic 'load' model writes) placed through RAMBlock.slotFor /
// zeroPage exactly as the channels do, then commit() + releaseDeferred() timed. The page
// bytes are not written: the commit never reads them. Reported: p50 / p99 / max per size.
import { availableParallelism } from 'node:os';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { WRITE_BOTH, WRITE_CACHE } from '../src/memory/page-writer.js';
import { RAMBlockList } from '../src/memory/ram-block.js';
import { chunkSlotBitsFor, Slab } from '../src/memory/slab.js';
import { Prng } from '../src/sender/prng.js';
import { printUsageAndExit } from './usage.js';

const { values: o } = parseArgs({
  options: {
    help: { type: 'boolean', short: 'h', default: false },
    'ram-mib': { type: 'string', default: '512' },
    dirty: { type: 'string', default: '6000,12000,25000' },
    rounds: { type: 'string', default: '300' },
  },
});
if (o.help) printUsageAndExit(import.meta.url);
const pages = Number(o['ram-mib']) * 256;
const rounds = Number(o.rounds);
const rnd = new Prng(7);

const list = new RAMBlockList(new Slab({ chunkSlotBits: chunkSlotBitsFor(pages) }));
const ram = list.add('pc.ram', pages * 4096);
ram.enableColo();
// The initial migration: 60 % of the pages non-zero.
for (let p = 0; p < pages; p++) if (!rnd.chance(0.4)) ram.slotFor(p, WRITE_BOTH);

const pct = (xs: number[], q: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(q * xs.length))]!;
console.log(`# bench:commit — node ${process.version}, ${availableParallelism()} CPUs, guest ${o['ram-mib']} MiB, ${rounds} rounds per size`);
console.log('| dirty pages | commit p50 ms | p99 ms | max ms | slab MiB |');
console.log('|---:|---:|---:|---:|---:|');
for (const target of String(o.dirty).split(',').map(Number)) {
  const times: number[] = [];
  let n = 0;
  for (let r = 0; r < rounds + 20; r++) {
    let placed = 0;
    while (placed < target) {
      const start = rnd.int(pages), run = 1 + rnd.int(32);
      for (let p = start; p < Math.min(pages, start + run) && placed < target; p++, placed++) {
        if (rnd.chance(0.12)) ram.zeroPage(p, WRITE_CACHE); else ram.slotFor(p, WRITE_CACHE);
      }
    }
    const t0 = performance.now();
    n = ram.commit();
    list.slab.releaseDeferred();
    const dt = performance.now() - t0;
    list.slab.trim(2 * target);
    if (r >= 20) times.push(dt);   // the first rounds warm the JIT up
  }
  console.log(`| ${n} | ${pct(times, 0.5).toFixed(3)} | ${pct(times, 0.99).toFixed(3)} | ${Math.max(...times).toFixed(3)} | ${(list.slab.bytes / 2 ** 20).toFixed(0)} |`);
}
