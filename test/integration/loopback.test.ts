// The synthetic QEMU-exact source migrates into the receiver over real loopback sockets with
// a real piscina pool; guest memory is compared byte for byte with the source's model.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { precopyRoundTrip } from '../helpers/synthetic.js';

const cases = [
  { layout: '7.2', channels: 0 }, { layout: '7.2', channels: 1 }, { layout: '7.2', channels: 4 }, { layout: '7.2', channels: 8 },
  { layout: '10.x', channels: 1 }, { layout: '10.x', channels: 4 }, { layout: '10.x', channels: 8 },
] as const;

describe('precopy over loopback', () => {
  for (const c of cases) {
    test(`${c.layout} layout, ${c.channels} multifd channel(s): RAM equals the source byte for byte`, async () => {
      const { mig, src, img } = await precopyRoundTrip({ multifdChannels: c.channels },
        { layout: c.layout, channels: c.channels, iterations: 3, seed: 7 + c.channels, memory: { ramMiB: 32 } });
      assert.ok(img.deviceState.equals(src.devices.coloBlob().subarray(0, -1)), 'device sections kept verbatim');
      const s = mig.summary() as { channels: { pages: number }[]; syncScheme: string };
      assert.equal(s.channels.length, 1 + c.channels);
      if (c.channels > 0) assert.equal(s.syncScheme, c.layout === '7.2' ? 'per-section' : 'per-round');
    });
  }
});

// The CLI's default path: no --multifd-channels, the receiver learns the count at the first
// barrier (a 1.5 s quiet window). 0 channels crashed the barrier's round check.
describe('precopy over loopback, channel count learned', () => {
  for (const c of [{ layout: '7.2', channels: 0 }, { layout: '7.2', channels: 4 }, { layout: '10.x', channels: 0 }, { layout: '10.x', channels: 4 }] as const) {
    test(`${c.layout} layout, ${c.channels} channel(s), no count given: byte-exact, count learned`, async () => {
      const { mig } = await precopyRoundTrip({},
        { layout: c.layout, channels: c.channels, iterations: 2, seed: 31 + c.channels, memory: { ramMiB: 16 } });
      assert.equal(mig.channels.length, c.channels);
    });
  }
});

// The learning window (1.5 s) is longer than a short --io-timeout: the barrier's silence timer
// must not fire while the count is still being learned (a real QEMU plain precopy into
// `listen --io-timeout 1500` failed so).
test('7.2 layout, 0 channels learned with an io timeout shorter than the learning window', async () => {
  const { mig } = await precopyRoundTrip({ ioTimeoutMs: 300 }, { layout: '7.2', channels: 0, iterations: 2, seed: 41, memory: { ramMiB: 8 } });
  assert.equal(mig.channels.length, 0);
});

// Reader threads (one per multifd connection) are the default from 4 cores on, main-thread reads
// below that (READER_THREADS_MIN_CORES): both are forced here, whatever this machine has, and
// must stay byte-exact.
for (const forced of ['1', '0'] as const) {
  describe(`precopy over loopback, multifd ${forced === '1' ? 'read by a thread per connection' : 'read on the main thread'} (COLO_READER_THREADS=${forced})`, () => {
    for (const c of [{ layout: '7.2', channels: 1 }, { layout: '7.2', channels: 4 }, { layout: '10.x', channels: 8 }] as const) {
      test(`${c.layout} layout, ${c.channels} channel(s): byte-exact, payloads straight into page slots`, async () => {
        const before = process.env.COLO_READER_THREADS;
        process.env.COLO_READER_THREADS = forced;
        try {
          const { mig } = await precopyRoundTrip({ multifdChannels: c.channels },
            { layout: c.layout, channels: c.channels, iterations: 3, seed: 11, memory: { ramMiB: 32 } });
          const s = mig.summary() as { channels: { directPages?: number; packets?: number; threadPackets?: number }[] };
          const mf = s.channels.slice(1);
          assert.ok(mf.every((ch) => (ch.directPages ?? 0) > 0), 'payloads read straight into page slots');
          if (forced === '1') assert.ok(mf.every((ch) => (ch.threadPackets ?? 0) > 0 && ch.threadPackets! > ch.packets! / 2), `packets read whole by reader threads: ${JSON.stringify(mf)}`);
          else assert.ok(mf.every((ch) => ch.threadPackets === 0), 'no reader thread');
        } finally {
          if (before === undefined) delete process.env.COLO_READER_THREADS; else process.env.COLO_READER_THREADS = before;
        }
      });
    }
  });
}
