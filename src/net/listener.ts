import { createServer, type Server, type Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import { hex } from '../errors.js';
import type { Logger } from '../log.js';
import type { IncomingMigration } from '../migration/incoming.js';
import { acceptTls, type TlsServerConfig } from './tls.js';
import { directReadReady } from './direct-read.js';
import { readerThreadsSelfTest } from './threaded-read.js';
import { MULTIFD_INIT_LEN, MULTIFD_MAGIC, QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION } from '../wire/constants.js';

export interface ListenOptions {
  host?: string;
  port?: number;
  /** Peer addresses allowed to connect; empty: anyone who can reach host:port. */
  allow?: string[];
  /** A connection must identify itself (a complete file header or MultiFDInit) within this many ms. */
  identifyTimeoutMs?: number;
  /** Connections still identifying themselves at once; more are refused at accept. */
  maxUnidentified?: number;
  /**
   * Every connection is a TLS server session first (--tls-creds); classification reads the
   * decrypted bytes. The handshake counts against identifyTimeoutMs.
   */
  tls?: TlsServerConfig | undefined;
  /** Told about every connection refused or dropped before it reached the migration (metrics). */
  onRefused?: (reason: string, peer: string) => void;
  /** Told about every connection handed to the migration. */
  onAccepted?: (kind: 'main' | 'multifd', peer: string) => void;
  log: Logger;
}

export const DEFAULT_IDENTIFY_TIMEOUT_MS = 10_000;
export const DEFAULT_MAX_UNIDENTIFIED = 64;

/** Bytes a channel must have sent before it is handed to the migration. */
const MAIN_HEADER_LEN = 8;   // QEMU_VM_FILE_MAGIC + QEMU_VM_FILE_VERSION

/**
 * Accepts connections for one incoming migration and classifies each by what it sent first
 * (spec §1.2: "QEVM" + version 3 is the main channel, a complete MultiFDInit a multifd
 * channel), never by accept order: multifd data can arrive before the main channel's first
 * byte (spec §1.1).
 *
 * Until a connection has identified itself it belongs to nobody: silence, a partial header
 * or garbage only costs that connection (dropped, logged), never the migration. Otherwise one
 * idle TCP connection would hold the listener, or be taken for the main channel and lock the
 * real primary out.
 */
export async function listenForMigration(mig: IncomingMigration, opts: ListenOptions): Promise<Server> {
  await directReadReady(opts.log);
  await readerThreadsSelfTest(opts.log);
  const allow = new Set((opts.allow ?? []).flatMap((a) => [a, `::ffff:${a}`]));
  const identifyMs = opts.identifyTimeoutMs ?? DEFAULT_IDENTIFY_TIMEOUT_MS;
  const maxPending = opts.maxUnidentified ?? DEFAULT_MAX_UNIDENTIFIED;
  const pending = new Set<Socket>();
  const refuse = (level: 'warn' | 'error', fields: Record<string, unknown> & { peer: string; reason: string }, msg: string) => {
    opts.log[level](fields, msg);
    opts.onRefused?.(fields.reason, fields.peer);
  };
  const server = createServer({ noDelay: true }, (raw: Socket) => {
    const peer = `${raw.remoteAddress}:${raw.remotePort}`;
    if (allow.size > 0 && !allow.has(raw.remoteAddress ?? '')) {
      refuse('warn', { peer, reason: 'not-allowed' }, 'connection refused: peer not in --allow');
      raw.destroy();
      return;
    }
    if (pending.size >= maxPending) {
      refuse('warn', { peer, reason: 'too-many-unidentified', pending: pending.size }, `connection refused: ${pending.size} connections have not identified themselves yet`);
      raw.destroy();
      return;
    }
    pending.add(raw);
    if (!opts.tls) { identify(raw, raw, peer); return; }
    // TLS wraps the TCP connection before anything is read from it: a refused session never
    // reaches the classification, let alone the migration.
    const t0 = performance.now();
    void acceptTls(raw, opts.tls, identifyMs).then((r) => {
      if (!r.ok) {
        pending.delete(raw);
        refuse('warn', { peer, reason: r.reason, ...(r.dn !== undefined ? { dn: r.dn } : {}) }, `connection refused: ${r.detail}`);
        raw.destroy();
        return;
      }
      opts.log.debug({ peer, dn: r.dn, tls: r.protocol }, 'TLS session established');
      identify(r.sock, raw, peer, Math.max(1, identifyMs - (performance.now() - t0)));
    });
  });
  /**
   * Classifies one connection by its first bytes (decrypted ones under TLS). `key` is the
   * TCP socket counted in `pending`; `ms` what is left of the identify timeout.
   */
  const identify = (sock: Socket, key: Socket, peer: string, ms = identifyMs) => {
    let got: Buffer[] = [];
    let n = 0;
    const drop = (reason: string, msg: string, level: 'warn' | 'error' = 'warn') => {
      finish();
      refuse(level, { peer, reason, bytes: n }, `connection dropped: ${msg}`);
      sock.destroy();
    };
    const timer = identifyMs > 0 ? setTimeout(() => drop('identify-timeout', `not identified within ${identifyMs} ms`), ms) : null;
    timer?.unref();
    const finish = () => {
      if (timer) clearTimeout(timer);
      pending.delete(key);
      sock.off('data', onData);
      sock.off('end', onEarlyEnd);
    };
    const onData = (c: Buffer) => {
      got.push(c);
      n += c.length;
      if (n < 4) return;
      const head = got.length === 1 ? got[0]! : Buffer.concat(got);
      got = [head];
      const magic = head.readUInt32BE(0);
      let kind: 'main' | 'multifd';
      if (magic === QEMU_VM_FILE_MAGIC) {
        if (n < MAIN_HEADER_LEN) return;
        const version = head.readUInt32BE(4);
        if (version !== QEMU_VM_FILE_VERSION) { drop('bad-version', `migration stream version ${version}, expected ${QEMU_VM_FILE_VERSION}`, 'error'); return; }
        kind = 'main';
      } else if (magic === MULTIFD_MAGIC) {
        if (n < MULTIFD_INIT_LEN) return;
        kind = 'multifd';
      } else {
        drop('bad-magic', `unknown channel magic 0x${hex(magic)}`, 'error');
        return;
      }
      finish();
      sock.pause();
      got = [];
      // The channel parses (and checks) the header bytes itself.
      const accepted = kind === 'main' ? mig.attachMain(sock, head) : mig.attachMultifd(sock, head);
      if (!accepted) {
        refuse('warn', { peer, reason: 'migration-active' }, 'connection refused: a migration is already active or all channels are connected');
        sock.destroy();
      } else {
        opts.onAccepted?.(kind, peer);
      }
      // An accepted socket is resumed by its channel, which knows whether it may take bytes.
    };
    const onEarlyEnd = () => drop('closed', 'closed before identifying itself');
    sock.on('data', onData);
    sock.on('end', onEarlyEnd);
    sock.on('error', () => { if (pending.has(key)) finish(); sock.destroy(); });
  };
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port ?? 0, opts.host ?? '127.0.0.1', () => { server.off('error', reject); resolve(); });
  });
  return server;
}
