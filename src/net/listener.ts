import { createServer, type Server, type Socket } from 'node:net';
import { MigrationError, hex } from '../errors.js';
import type { Logger } from '../log.js';
import type { IncomingMigration } from '../migration/incoming.js';
import { MULTIFD_MAGIC, QEMU_VM_FILE_MAGIC } from '../wire/constants.js';

export interface ListenOptions {
  host?: string;
  port?: number;
  /** Peer addresses allowed to connect; empty: anyone who can reach host:port. */
  allow?: string[];
  log: Logger;
}

/**
 * Accepts connections for one incoming migration and classifies each by its first 4 bytes
 * (spec §1.2: "QEVM" is the main channel, 0x11223344 a multifd channel), never by accept
 * order: multifd data can arrive before the main channel's first byte (spec §1.1).
 */
export async function listenForMigration(mig: IncomingMigration, opts: ListenOptions): Promise<Server> {
  const allow = new Set((opts.allow ?? []).flatMap((a) => [a, `::ffff:${a}`]));
  const server = createServer({ noDelay: true }, (sock: Socket) => {
    const peer = `${sock.remoteAddress}:${sock.remotePort}`;
    if (allow.size > 0 && !allow.has(sock.remoteAddress ?? '')) {
      opts.log.warn({ peer }, 'connection refused: peer not in --allow');
      sock.destroy();
      return;
    }
    let got: Buffer[] = [];
    let n = 0;
    const onData = (c: Buffer) => {
      got.push(c);
      n += c.length;
      if (n < 4) return;
      sock.off('data', onData);
      sock.off('end', onEarlyEnd);
      sock.pause();
      const first = Buffer.concat(got);
      got = [];
      const magic = first.readUInt32BE(0);
      let accepted: boolean;
      if (magic === QEMU_VM_FILE_MAGIC) accepted = mig.attachMain(sock, first);
      else if (magic === MULTIFD_MAGIC) accepted = mig.attachMultifd(sock, first);
      else {
        opts.log.error({ peer }, `connection with unknown channel magic 0x${hex(magic)}`);
        sock.destroy();
        mig.badConnection(new MigrationError('ERR_BAD_MAGIC', `unknown channel magic 0x${hex(magic)} from ${peer}`, `unclassified ${peer}`, 0));
        return;
      }
      if (!accepted) {
        opts.log.warn({ peer }, 'connection refused: a migration is already active or all channels are connected');
        sock.destroy();
      }
      // An accepted socket is resumed by its channel, which knows whether it may take bytes.
    };
    const onEarlyEnd = () => { sock.destroy(); };
    sock.on('data', onData);
    sock.on('end', onEarlyEnd);
    sock.on('error', () => sock.destroy());
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port ?? 0, opts.host ?? '127.0.0.1', () => { server.off('error', reject); resolve(); });
  });
  return server;
}
