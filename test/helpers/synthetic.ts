import type { Server } from 'node:net';
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
