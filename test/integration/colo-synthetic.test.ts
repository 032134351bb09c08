// COLO with the synthetic primary: after every checkpoint (VMSTATE_LOADED received by the
// primary) the receiver's committed image equals the primary's memory and device blob.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { SyntheticSource } from '../../src/sender/source.js';
import { compareImage } from '../../src/verify/compare.js';
import { startReceiver } from '../helpers/synthetic.js';

const cases = [
  { layout: '7.2', channels: 0, workload: 'load' }, { layout: '7.2', channels: 4, workload: 'load' },
  { layout: '10.x', channels: 4, workload: 'load' }, { layout: '10.x', channels: 0, workload: 'idle' },
] as const;

describe('COLO checkpoints from the synthetic primary', () => {
  for (const c of cases) {
    test(`${c.layout}, ${c.channels} channel(s), ${c.workload}: every committed checkpoint equals the primary`, async () => {
      const r = await startReceiver({ multifdChannels: c.channels });
      try {
        const mismatches: string[] = [];
        let checked = 0;
        const src: SyntheticSource = new SyntheticSource({
          port: r.port, layout: c.layout, channels: c.channels, colo: true, checkpoints: 8, workload: c.workload, seed: 11,
          memory: { ramMiB: 64 },
          onCheckpoint: async (info) => {
            const img = await r.mig.committedImage();
            assert.ok(img);
            assert.equal(img.checkpoint, info.index + 1);
            const d = compareImage(img, new Map(info.model.blocks.map((b) => [b.idstr, b.host as Uint8Array])));
            if (d) mismatches.push(`checkpoint ${info.index + 1}: ${d}`);
            if (!img.deviceState.equals(src.devices.coloBlob().subarray(0, -1))) mismatches.push(`checkpoint ${info.index + 1}: device blob`);
            checked++;
          },
        });
        const res = await src.run();
        src.close();
        assert.equal(res.checkpoints, 8);
        assert.deepEqual(mismatches, []);
        assert.equal(checked, 8);
        const outcome = await r.mig.done;
        assert.equal(outcome.kind, 'primary-lost');
        const sum = r.mig.summary() as { checkpoints: { count: number } };
        assert.equal(sum.checkpoints.count, 8);
      } finally {
        await r.close();
      }
    });
  }
});
