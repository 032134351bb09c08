import assert from 'node:assert/strict';
import type { Server } from 'node:net';
import type { CommittedImage } from '../../src/migration/committed-image.js';
import { SyntheticSource, type SyntheticSourceOptions } from '../../src/sender/source.js';
import { compareImage } from '../../src/verify/compare.js';
import { IncomingMigration, type IncomingOptions } from '../../src/migration/incoming.js';
import { listenForMigration } from '../../src/net/listener.js';
import { silentLogger } from '../../src/log.js';

/** A receiver on an ephemeral loopback port, for tests that drive it with the synthetic source. */
export async function startReceiver(opts: IncomingOptions = {}): Promise<{ mig: IncomingMigration; server: Server; port: number; close: () => Promise<void> }> {
  const mig = new IncomingMigration({ threads: 2, log: silentLogger, ...opts });
  const server = await listenForMigration(mig, { port: 0, log: silentLogger });
  const port = (server.address() as { port: number }).port;
  const close = async () => { server.close(); await mig.close().catch(() => undefined); };
  return { mig, server, port, close };
}

/** The model's memory as the compare helpers want it. */
export function modelImage(model: { readonly blocks: readonly { idstr: string; host: Buffer }[] }): Map<string, Uint8Array> {
  return new Map(model.blocks.map((b) => [b.idstr, b.host as Uint8Array]));
}

/**
 * The synthetic source migrates to `port` (the receiver's, or a proxy in front of it): the
 * migration must complete and the received memory equal the source's.
 */
export async function migrateAndVerify(mig: IncomingMigration, port: number, source: Omit<SyntheticSourceOptions, 'port'>): Promise<{ src: SyntheticSource; img: CommittedImage }> {
  const src = new SyntheticSource({ ...source, port });
  const res = await src.run();
  src.close();
  assert.equal(res.killed, false);
  const outcome = await mig.done;
  assert.equal(outcome.kind, 'completed', JSON.stringify(outcome));
  const img = await mig.committedImage();
  assert.ok(img);
  assert.equal(compareImage(img, modelImage(src.model)), null);
  return { src, img };
}

/**
 * Precopy from the synthetic source into a fresh receiver; asserts the migration completed
 * and the received memory equals the source's. Returns the finished pieces for more checks.
 */
export async function precopyRoundTrip(receiver: IncomingOptions, source: Omit<SyntheticSourceOptions, 'port'>): Promise<{ mig: IncomingMigration; src: SyntheticSource; img: CommittedImage }> {
  const r = await startReceiver(receiver);
  try {
    return { mig: r.mig, ...await migrateAndVerify(r.mig, r.port, source) };
  } finally {
    await r.close();
  }
}

/**
 * COLO from the synthetic primary: after every checkpoint (VMSTATE_LOADED seen by the primary)
 * the receiver's committed image must equal the primary's memory and device blob.
 */
export async function coloRoundTrip(receiver: IncomingOptions, source: Omit<SyntheticSourceOptions, 'port' | 'onCheckpoint'> & { checkpoints: number }): Promise<IncomingMigration> {
  const r = await startReceiver(receiver);
  try {
    const mismatches: string[] = [];
    let checked = 0;
    const src: SyntheticSource = new SyntheticSource({
      ...source, colo: true, port: r.port,
      onCheckpoint: async (info) => {
        const img = await r.mig.committedImage();
        assert.ok(img);
        assert.equal(img.checkpoint, info.index + 1);
        const d = compareImage(img, modelImage(info.model));
        if (d) mismatches.push(`checkpoint ${info.index + 1}: ${d}`);
        if (!img.deviceState.equals(src.devices.coloBlob().subarray(0, -1))) mismatches.push(`checkpoint ${info.index + 1}: device blob`);
        checked++;
      },
    });
    const res = await src.run();
    src.close();
    assert.equal(res.checkpoints, source.checkpoints);
    assert.deepEqual(mismatches, []);
    assert.equal(checked, source.checkpoints);
    const outcome = await r.mig.done;
    assert.equal(outcome.kind, 'primary-lost');
    assert.equal((r.mig.summary() as { checkpoints: { count: number } }).checkpoints.count, source.checkpoints);
    return r.mig;
  } finally {
    await r.close();
  }
}
