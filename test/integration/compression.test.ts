// multifd-compression zlib and zstd end to end: the QEMU-exact synthetic source compresses
// each channel as one endless stream (spec §2.5), the receiver decodes it on one thread per
// channel; guest memory (precopy) and every committed checkpoint (COLO) are compared byte
// for byte with the source's model, with the 7.2 and the 10.x packet layouts.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { MigrationError } from '../../src/errors.js';
import type { MultiFDEncoder } from '../../src/sender/multifd-builder.js';
import { ZlibEncoder, ZstdEncoder } from '../../src/sender/multifd-compress.js';
import { SyntheticSource } from '../../src/sender/source.js';
import { compareImage } from '../../src/verify/compare.js';
import { coloRoundTrip, precopyRoundTrip, startReceiver } from '../helpers/synthetic.js';

const methods = ['zlib', 'zstd'] as const;
const layouts = ['7.2', '10.x'] as const;

describe('multifd compression, precopy over loopback', () => {
  for (const compression of methods) {
    for (const layout of layouts) {
      test(`${compression}, ${layout} layout, 4 channels: RAM equals the source byte for byte`, async () => {
        const { mig } = await precopyRoundTrip({ multifdChannels: 4, compression },
          { layout, channels: 4, compression, iterations: 3, seed: 21, memory: { ramMiB: 32 } });
        const s = mig.summary() as { pages: number; channels: { bytes: number; pages: number }[] };
        const mf = s.channels.slice(1);
        assert.ok(mf.every((c) => c.pages > 0), 'every channel carried pages');
        const wire = mf.reduce((a, c) => a + c.bytes, 0), plain = mf.reduce((a, c) => a + c.pages, 0) * 4096;
        assert.ok(wire < plain, `payloads are compressed (${wire} wire bytes for ${plain} page bytes)`);
      });
    }
  }
});

describe('multifd compression, COLO checkpoints from the synthetic primary', () => {
  for (const compression of methods) {
    for (const layout of layouts) {
      test(`${compression}, ${layout} layout, 4 channels: 5 committed checkpoints equal the primary`, async () => {
        await coloRoundTrip({ multifdChannels: 4, compression },
          { layout, channels: 4, compression, checkpoints: 5, workload: 'load', seed: 23, memory: { ramMiB: 64 } });
      });
    }
  }
});

/** Wraps a channel's real encoder; while `armed.on`, the next payload of any channel is spoilt. */
function spoiling(inner: MultiFDEncoder, armed: { on: boolean }): MultiFDEncoder {
  return {
    methodFlag: inner.methodFlag,
    encode(pages) {
      const p = inner.encode(pages);
      // 0xff...: zlib reads BTYPE 11 (invalid block type), zstd a reserved block type
      if (armed.on) { armed.on = false; p.fill(0xff, 0, Math.min(p.length, 16)); }
      return p;
    },
  };
}

describe('multifd compression, a corrupt payload fails the migration with ERR_DECOMPRESS', () => {
  for (const compression of methods) {
    test(`${compression}: precopy fails`, async () => {
      const r = await startReceiver({ multifdChannels: 4, compression });
      try {
        const armed = { on: false };
        let packets = 0;
        const src = new SyntheticSource({
          port: r.port, layout: '7.2', channels: 4, iterations: 2, seed: 5, memory: { ramMiB: 16 },
          encoders: () => {
            const e = spoiling(compression === 'zlib' ? new ZlibEncoder() : new ZstdEncoder(), armed);
            return { methodFlag: e.methodFlag, encode: (pages) => { if (++packets === 5) armed.on = true; return e.encode(pages); } };
          },
        });
        await src.run().catch(() => undefined);
        src.close();
        const outcome = await r.mig.done;
        assert.equal(outcome.kind, 'failed');
        assert.ok(outcome.kind === 'failed' && outcome.error instanceof MigrationError);
        assert.equal(outcome.error.code, 'ERR_DECOMPRESS');
        assert.match(outcome.error.channel ?? '', /^multifd\/\d$/);
      } finally {
        await r.close();
      }
    });

    test(`${compression}: in COLO the checkpoint is refused and the previous one stays committed`, async () => {
      const r = await startReceiver({ multifdChannels: 4, compression });
      try {
        const armed = { on: false };
        let kept: Buffer[] = [];
        const src: SyntheticSource = new SyntheticSource({
          port: r.port, layout: '10.x', channels: 4, colo: true, checkpoints: 4, workload: 'load', seed: 29, memory: { ramMiB: 32 },
          encoders: () => spoiling(compression === 'zlib' ? new ZlibEncoder() : new ZstdEncoder(), armed),
          onCheckpoint: (info) => { kept = info.model.snapshot(); },
          onBeforeCheckpoint: (i) => { if (i === 2) armed.on = true; },
        });
        await src.run().catch(() => undefined);
        src.close();
        const outcome = await r.mig.done;
        assert.equal(outcome.kind, 'failed', JSON.stringify(outcome));
        assert.equal(outcome.kind === 'failed' ? outcome.error.code : '', 'ERR_DECOMPRESS');
        const img = await r.mig.committedImage();
        assert.ok(img);
        assert.equal(img.checkpoint, 2, 'checkpoints 1 and 2 committed, 3 refused');
        assert.equal(compareImage(img, new Map(src.model.blocks.map((b, i) => [b.idstr, kept[i]! as Uint8Array]))), null);
      } finally {
        await r.close();
      }
    });
  }
});
