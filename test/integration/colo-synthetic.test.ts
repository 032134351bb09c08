// COLO with the synthetic primary: after every checkpoint (VMSTATE_LOADED received by the
// primary) the receiver's committed image equals the primary's memory and device blob.
import { describe, test } from 'node:test';
import { coloRoundTrip } from '../helpers/synthetic.js';

const cases = [
  { layout: '7.2', channels: 0, workload: 'load' }, { layout: '7.2', channels: 4, workload: 'load' },
  { layout: '10.x', channels: 4, workload: 'load' }, { layout: '10.x', channels: 0, workload: 'idle' },
] as const;

describe('COLO checkpoints from the synthetic primary', () => {
  for (const c of cases) {
    test(`${c.layout}, ${c.channels} channel(s), ${c.workload}: every committed checkpoint equals the primary`, async () => {
      await coloRoundTrip({ multifdChannels: c.channels }, { layout: c.layout, channels: c.channels, checkpoints: 8, workload: c.workload, seed: 11, memory: { ramMiB: 64 } });
    });
  }
});
