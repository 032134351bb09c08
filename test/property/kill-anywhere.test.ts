// Kill the synthetic primary at a random byte inside a checkpoint (>= 100 cases): the
// receiver must end COLO as "primary lost" and hold exactly the previous checkpoint's memory
// and device blob. For some cases the failover stream (spec §4.7.5) is decoded back by a
// second receiver and must equal the committed image.
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { once } from 'node:events';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import type { CommittedImage } from '../../src/migration/committed-image.js';
import { imageStream } from '../../src/restore/image-stream.js';
import { SyntheticSource, type SyntheticSourceOptions } from '../../src/sender/source.js';
import { compareImage } from '../../src/verify/compare.js';
import { startReceiver } from '../helpers/synthetic.js';

const RUNS = Number(process.env.FUZZ_RUNS ?? 102);
const CHECKPOINTS = 3;
// `threads`: multifd read by a reader thread per connection (COLO_READER_THREADS=1; the default
// from 4 cores on), so that a cut inside a packet also lands on a reader thread.
const configs = [
  { layout: '7.2', channels: 0, threads: false }, { layout: '7.2', channels: 4, threads: false },
  { layout: '10.x', channels: 4, threads: false }, { layout: '7.2', channels: 4, threads: true },
] as const;

function options(c: (typeof configs)[number], port: number): SyntheticSourceOptions {
  return { port, layout: c.layout, channels: c.channels, colo: true, checkpoints: CHECKPOINTS, seed: 5, memory: { ramMiB: 16 }, workload: { pages: 400 } };
}

/** Bytes of each checkpoint of an uncut run (deterministic for a seed). */
async function checkpointSizes(c: (typeof configs)[number]): Promise<number[]> {
  const r = await startReceiver({ multifdChannels: c.channels });
  const sizes: number[] = [];
  try {
    const src = new SyntheticSource({ ...options(c, r.port), onCheckpoint: (i) => { sizes.push(i.bytes); } });
    await src.run();
    src.close();
    await r.mig.done;
  } finally { await r.close(); }
  assert.equal(sizes.length, CHECKPOINTS);
  return sizes;
}

async function decodeBack(img: CommittedImage): Promise<CommittedImage> {
  const r = await startReceiver({ multifdChannels: 0, expectVmdesc: false });
  try {
    const s = connect(r.port, '127.0.0.1');
    await once(s, 'connect');
    for (const chunk of imageStream(img)) if (!s.write(chunk)) await once(s, 'drain');
    s.end();
    const o = await r.mig.done;
    assert.equal(o.kind, 'completed', JSON.stringify(o));
    const back = await r.mig.committedImage();
    assert.ok(back);
    return back;
  } finally { await r.close(); }
}

describe('kill the primary anywhere inside a checkpoint', () => {
  for (const c of configs) {
    test(`${c.layout}, ${c.channels} channel(s)${c.threads ? ', reader threads' : ''}: the previous checkpoint survives exactly`, async (t) => {
      const before = process.env.COLO_READER_THREADS;
      process.env.COLO_READER_THREADS = c.threads ? '1' : '0';
      t.after(() => { if (before === undefined) delete process.env.COLO_READER_THREADS; else process.env.COLO_READER_THREADS = before; });
      const sizes = await checkpointSizes(c);
      let n = 0;
      await fc.assert(fc.asyncProperty(
        fc.integer({ min: 0, max: CHECKPOINTS - 1 }).chain((k) => fc.tuple(fc.constant(k), fc.integer({ min: 0, max: sizes[k]! - 1 }))),
        async ([k, byteOffset]) => {
          const r = await startReceiver({ multifdChannels: c.channels });
          try {
            const mem: Map<string, Uint8Array>[] = [];
            const blobs: Buffer[] = [];
            const src: SyntheticSource = new SyntheticSource({
              ...options(c, r.port), killAt: { checkpoint: k, byteOffset },
              onBeforeCheckpoint: (i) => {
                if (i === 0) { // state of the initial migration: committed checkpoint 0
                  mem.push(new Map(src.model.blocks.map((b) => [b.idstr, Buffer.from(b.host)])));
                  blobs.push(src.devices.coloBlob());
                }
              },
              onCheckpoint: (info) => {
                mem.push(new Map(info.model.blocks.map((b) => [b.idstr, Buffer.from(b.host)])));
                blobs.push(src.devices.coloBlob());
              },
            });
            const res = await src.run();
            src.close();
            assert.equal(res.killed, true);
            const o = await r.mig.done;
            assert.equal(o.kind, 'primary-lost', JSON.stringify(o));
            const img = await r.mig.committedImage();
            assert.ok(img);
            assert.equal(img.checkpoint, k, 'holds the checkpoint before the cut one');
            assert.equal(compareImage(img, mem[k]!), null);
            assert.ok(img.deviceState.equals(blobs[k]!.subarray(0, -1)), 'device blob of the committed checkpoint');
            if (n++ % 10 === 0) {
              const back = await decodeBack(img);
              assert.equal(compareImage(back, mem[k]!), null, 'failover stream decodes to the committed image');
              assert.ok(back.deviceState.equals(img.deviceState));
            }
          } finally { await r.close(); }
        }), { numRuns: Math.ceil(RUNS / configs.length) });
    });
  }
});
