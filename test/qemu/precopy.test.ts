// Real QEMU 7.2 (Debian, -accel tcg) migrates into `colo-receiver listen` (with and without
// --multifd-channels); the received
// pc.ram must equal the stopped source's memory byte for byte (issue "Receive a real QEMU
// live migration"). Random data sits in guest RAM at two addresses through loader devices.
import { randomBytes } from 'node:crypto';
import { after, describe, test } from 'node:test';
import { haveQemu } from '../../src/harness/index.js';
import { precopyIntoReceiver } from '../helpers/qemu-precopy.js';

const skip = haveQemu() ? false : 'qemu-system-x86_64 not installed (apt-get install qemu-system-x86)';
const cleanups: (() => unknown)[] = [];
after(async () => { for (const c of cleanups.reverse()) await c(); });

/** `scale` 4 for 8 channels, so that every channel carries pages (see precopy-qemu10.test.ts). */
const data = (scale = 1) => [randomBytes(scale * 3 * 1024 * 1024 + 4096), randomBytes(scale * 5 * 1024 * 1024)] as const;

describe('real QEMU 7.2 precopy into colo-receiver', { skip, timeout: 300_000 }, () => {
  test('plain migration: pc.ram equals the source byte for byte', async () => { await precopyIntoReceiver('plain', ...data(), cleanups); });
  test('multifd with 4 channels: pc.ram equals the source byte for byte', async () => { await precopyIntoReceiver('mfd4', ...data(), cleanups, { channels: 4 }); });
  test('multifd with 8 channels: pc.ram equals the source byte for byte', async () => { await precopyIntoReceiver('mfd8', ...data(4), cleanups, { channels: 8 }); });
});

// The CLI's default path: no --multifd-channels, the receiver learns the count (0 for plain).
describe('real QEMU 7.2 precopy into colo-receiver without --multifd-channels', { skip, timeout: 600_000 }, () => {
  const learned = { noChannelOption: true };
  test('plain: pc.ram equals the source byte for byte', async () => { await precopyIntoReceiver('plain-learn', ...data(), cleanups, undefined, learned); });
  test('multifd 4 channels: pc.ram equals the source byte for byte', async () => { await precopyIntoReceiver('mfd4-learn', ...data(), cleanups, { channels: 4 }, learned); });
  test('multifd 8 channels: pc.ram equals the source byte for byte', async () => { await precopyIntoReceiver('mfd8-learn', ...data(4), cleanups, { channels: 8 }, learned); });
  test('multifd 4 channels, zlib: pc.ram equals the source byte for byte', async () => { await precopyIntoReceiver('zlib-learn', ...data(), cleanups, { channels: 4, compression: 'zlib' }, learned); });
  test('multifd 4 channels, zstd: pc.ram equals the source byte for byte', async () => { await precopyIntoReceiver('zstd-learn', ...data(), cleanups, { channels: 4, compression: 'zstd' }, learned); });
});
