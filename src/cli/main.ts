#!/usr/bin/env node
import { statSync } from 'node:fs';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { createLogger } from '../log.js';
import type { Compression } from '../migration/multifd-packet.js';
import { parseFailoverAction, type FailoverAction } from '../restore/failover.js';
import { parseDiskSpec } from '../disk/index.js';
import { receive, type ReceiveOptions } from './receive.js';
import { loadClientCreds, loadServerCreds, parseAuthzList, TlsCredsError } from '../net/tls.js';
import { parseMetricsAddress, type MetricsAddress } from '../ops/metrics.js';
import { followParent, hugePagesDecision, hugePagesState, reexecWithHugePages } from './huge-pages.js';

const HELP = `colo-receiver: a store-only QEMU COLO secondary (QEMU migration wire protocol, multifd, COLO)

Usage:
  colo-receiver listen [options]        accept one incoming migration (precopy or COLO)
  colo-receiver demo [--channels N]     synthetic QEMU source -> receiver on loopback, prints the summary
  colo-receiver inspect FILE...         decode captured main/multifd streams
  colo-receiver restore --from PATH --to tcp:HOST:PORT|tls+tcp:HOST:PORT [--tls-creds DIR]
                        [--tls-hostname NAME]
                                        replay a saved image into a waiting qemu -incoming
                                        (TLS: client credentials in QEMU's layout)
  colo-receiver --help | --version

listen options:
  --host ADDR               address to listen on (default 127.0.0.1)
  --port N                  TCP port (default 4444; 0 = any)
  --multifd-channels N      multifd-channels of the source (default: learned at the first
                            barrier, after 1.5 s without a new connection; 0 works too)
  --compression M           none | zlib | zstd (multifd-compression of the source; default none)
  --colo                    COLO secondary even if ENABLE_COLO never arrives
  --no-vmdesc               do not expect VMDESCRIPTION after the initial EOF
  --threads N               page-writer threads (default: CPU count)
  --dump-ram DIR            write the received / committed RAMBlocks to DIR/<idstr>.bin
                            and the device state to DIR/device-state.bin
  --stats-json FILE         summary: bytes per channel, pages, zero pages, duration, GB/s,
                            per-checkpoint distributions
  --checkpoints-csv FILE    one CSV row per committed checkpoint
  --expect-uuid UUID        refuse multifd channels from a VM with another -uuid
  --allow HOST[,HOST]       accept connections only from these peer addresses
  --io-timeout MS           fail when a peer stalls mid-record for MS; a connection that has
                            not identified itself (file header or MultiFDInit) within MS is
                            dropped and logged, the listener keeps waiting (default 10000)
  --max-unidentified N      connections still identifying themselves at once; more are
                            refused at accept (default 64)
  --heartbeat-timeout MS|auto
                            COLO: no checkpoint for MS means the primary is gone. auto
                            (default): 30 s until the checkpoint interval is known (QEMU's
                            default x-checkpoint-delay is 20 s), then 3x the longest of the
                            last 8 idle gaps, at least 1 s. 0 disables
  --on-failover ACTION      COLO: when the primary is lost, resume=tcp:HOST:PORT migrates the
                            committed image into a waiting 'qemu-system-x86_64 -incoming
                            tcp:HOST:PORT'; resume=tls+tcp:HOST:PORT the same over TLS (needs
                            --resume-tls-creds; the QEMU waits with -incoming defer, a
                            tls-creds-x509 endpoint=server object and migrate-set-parameters
                            tls-creds=ID before migrate-incoming); save=PATH writes it for
                            -incoming "exec:cat PATH"
  --resume-tls-creds DIR    client credentials for resume=tls+tcp: in QEMU's layout (ca-cert.pem,
                            client-cert.pem + client-key.pem when the destination verifies peers)
  --resume-tls-hostname NAME
                            name the destination's certificate must carry (QEMU's tls-hostname;
                            default: HOST of the resume target)
  --tls-creds DIR           TLS on every channel (main and each multifd connection), as a QEMU
                            destination with tls-creds-x509 endpoint=server: DIR holds ca-cert.pem,
                            server-cert.pem, server-key.pem (dh-params.pem is ignored). Client
                            certificates are required and verified against ca-cert.pem
                            (verify-peer=on). A refused connection (plaintext, untrusted or
                            missing certificate, DN not allowed, no handshake within
                            --io-timeout) is closed and logged with a reason; the listener keeps
                            waiting
  --tls-no-verify-peer      do not ask for client certificates (QEMU verify-peer=off)
  --tls-authz DN            accept only clients whose certificate subject is DN, written as QEMU
                            prints it (gnutls order, e.g. C=GB,O=Example,CN=primary); a list
                            doubles the commas inside each DN, as QEMU's -object does:
                            'CN=a,,O=x,CN=b,,O=x'; may be repeated
  --metrics HOST:PORT       serve Prometheus /metrics and /healthz (200 while the committed image
                            is usable, else 503) on HOST:PORT; a bare PORT means 127.0.0.1.
                            Off by default
  --nbd HOST:PORT           COLO with disks: NBD server for the primary's block replication
                            (QEMU's replication,mode=primary over its NBD client); needs --disk
  --disk NAME=PATH          a replicated disk (repeatable): NBD export NAME over the raw image
                            PATH, a copy of the primary's disk when COLO starts (its size is the
                            export size). Writes are held until their checkpoint commits; on
                            failover PATH is the committed checkpoint's disk: start the fresh
                            QEMU with -drive if=none,id=colo-disk0,driver=raw,file=PATH and the
                            primary's disk device (README "Disks")
  --max-disk-pending BYTES  memory for one checkpoint interval's disk writes, per disk, beyond
                            which they spill to a file beside PATH (default 268435456; while
                            the previous interval is written to PATH it holds its own)
  --disk-commit MODE        async (default): PATH is written right after the commit, while the
                            VM runs (the failover waits for it); sync: written and fdatasync'ed
                            inside the checkpoint pause
  --max-ram BYTES           cap on the total RAM a source may announce (default 64 GiB)
  --max-memory BYTES        cap on guest page memory held (committed pages + the checkpoint in
                            progress): a checkpoint that needs more fails with ERR_LIMIT and
                            the committed one is kept (default: no cap)
  --no-huge-pages           do not re-execute with glibc.malloc.hugetlb=1 (by default the
                            receiver does so once when transparent huge pages are available:
                            guest memory in huge pages, much faster wake-ups per checkpoint)
  --max-blob BYTES          cap on a COLO device-state blob (default 256 MiB)
  --max-blocks N            cap on the RAMBlocks in MEM_SIZE (default 1024)
  --max-section BYTES       cap on one device section of the initial migration (default 64 MiB)
  --max-vmdesc BYTES        cap on the VMDESCRIPTION JSON (default 64 MiB)
  --max-channels N          cap on multifd connections (default 255)
  --max-packet-payload BYTES
                            cap on a compressed multifd packet's payload (default and
                            highest 1 MiB: QEMU's receive buffer and our staging slot)
  --max-command BYTES       cap on a QEMU_VM_COMMAND payload (default 65536)
  --log-level LEVEL         pino level (default info; LOG_LEVEL also works)
  --no-progress             no progress line on a terminal

Environment: COLO_READER_THREADS=1|0 forces a reader thread per multifd connection on or off
(default: on from 4 cores, as QEMU's multifdrecv threads; off below, where the main thread
reading every channel measured faster); COLO_DIRECT_PAGES=0 sends every multifd payload
through a staging slot and a page writer (to compare).

Exit status: 0 migration completed, or COLO ended by the primary going away (the committed
checkpoint is kept); 1 usage error; 2 migration failed (protocol violation, bad input);
3 internal error.`;

const LISTEN = {
  host: { type: 'string', default: '127.0.0.1' },
  port: { type: 'string', default: '4444' },
  'multifd-channels': { type: 'string' },
  compression: { type: 'string', default: 'none' },
  colo: { type: 'boolean', default: false },
  'no-vmdesc': { type: 'boolean', default: false },
  threads: { type: 'string' },
  'dump-ram': { type: 'string' },
  'stats-json': { type: 'string' },
  'checkpoints-csv': { type: 'string' },
  'expect-uuid': { type: 'string' },
  allow: { type: 'string' },
  'io-timeout': { type: 'string', default: '10000' },
  'max-unidentified': { type: 'string', default: '64' },
  'heartbeat-timeout': { type: 'string', default: 'auto' },
  'max-ram': { type: 'string' },
  'max-memory': { type: 'string' },
  'no-huge-pages': { type: 'boolean', default: false },
  'max-blob': { type: 'string' },
  'max-blocks': { type: 'string' },
  'max-section': { type: 'string' },
  'max-vmdesc': { type: 'string' },
  'max-channels': { type: 'string' },
  'max-packet-payload': { type: 'string' },
  'max-command': { type: 'string' },
  'on-failover': { type: 'string' },
  'resume-tls-creds': { type: 'string' },
  'resume-tls-hostname': { type: 'string' },
  'tls-creds': { type: 'string' },
  'tls-no-verify-peer': { type: 'boolean', default: false },
  'tls-authz': { type: 'string', multiple: true },
  metrics: { type: 'string' },
  nbd: { type: 'string' },
  disk: { type: 'string', multiple: true },
  'max-disk-pending': { type: 'string' },
  'disk-commit': { type: 'string', default: 'async' },
  'log-level': { type: 'string' },
  'no-progress': { type: 'boolean', default: false },
  help: { type: 'boolean', short: 'h', default: false },
} satisfies ParseArgsConfig['options'];

export class UsageError extends Error {}

function int(v: unknown, name: string, min: number, max: number): number {
  const n = Number(v);
  if (typeof v !== 'string' || !/^\d+$/.test(v) || n < min || n > max) throw new UsageError(`--${name} must be an integer in ${min}..${max}, got ${String(v)}`);
  return n;
}

function heartbeat(v: unknown): number | 'auto' {
  if (v === 'auto') return 'auto';
  try { return int(v, 'heartbeat-timeout', 0, 2 ** 31 - 1); } catch { throw new UsageError(`--heartbeat-timeout must be auto or milliseconds (0..${2 ** 31 - 1}, 0 disables), got ${String(v)}`); }
}

/** Unreadable or invalid credentials are the operator's to fix: a usage error, exit 1. */
export async function creds<T>(load: () => Promise<T>): Promise<T> {
  try { return await load(); } catch (e) { if (e instanceof TlsCredsError) throw new UsageError(e.message); throw e; }
}

function failoverAction(spec: string): FailoverAction {
  try { return parseFailoverAction(spec); } catch (e) { throw new UsageError((e as Error).message); }
}

function diskOptions(o: Record<string, string | boolean | string[] | undefined>): ReceiveOptions['disks'] {
  const specs = (o.disk as string[] | undefined) ?? [];
  if (o.nbd === undefined && specs.length === 0) {
    if (o['max-disk-pending'] !== undefined) throw new UsageError('--max-disk-pending needs --nbd and --disk');
    return undefined;
  }
  if (o.nbd === undefined) throw new UsageError('--disk needs --nbd HOST:PORT (where the primary\'s NBD client connects)');
  if (specs.length === 0) throw new UsageError('--nbd needs at least one --disk NAME=PATH');
  const m = /^(.*):(\d+)$/.exec(String(o.nbd));
  if (!m || !m[1]) throw new UsageError(`--nbd must be HOST:PORT, got ${String(o.nbd)}`);
  const mode = String(o['disk-commit']);
  if (mode !== 'async' && mode !== 'sync') throw new UsageError(`--disk-commit must be async or sync, got ${mode}`);
  let list;
  try { list = specs.map(parseDiskSpec); } catch (e) { throw new UsageError((e as Error).message); }
  for (const d of list) {
    // Checked here so a wrong path is a usage error (exit 1), not a failed start.
    let st;
    try { st = statSync(d.path); } catch (e) { throw new UsageError(`--disk ${d.name}: ${(e as Error).message}`); }
    if (!st.isFile() && !st.isBlockDevice()) throw new UsageError(`--disk ${d.name}: ${d.path} is not a file or block device`);
    if (st.isFile() && st.size === 0) throw new UsageError(`--disk ${d.name}: ${d.path} is empty (PATH must be a copy of the primary's disk)`);
  }
  const names = new Set(list.map((d) => d.name));
  if (names.size !== list.length) throw new UsageError('--disk: two disks with the same NAME');
  return {
    host: m[1].replace(/^\[(.*)\]$/, '$1'), port: int(m[2], 'nbd port', 0, 65535), disks: list, commitMode: mode,
    ...(o['max-disk-pending'] !== undefined ? { maxPendingBytes: int(o['max-disk-pending'], 'max-disk-pending', 0, 2 ** 40) } : {}),
  };
}

async function listen(argv: string[]): Promise<number> {
  const { values: o } = parseArgs({ args: argv, options: LISTEN, strict: true, allowPositionals: false }) as { values: Record<string, string | boolean | string[] | undefined> };
  if (o.help) { process.stdout.write(HELP + '\n'); return 0; }
  const comp = String(o.compression);
  if (!['none', 'zlib', 'zstd'].includes(comp)) throw new UsageError(`--compression must be none, zlib or zstd, got ${comp}`);
  const uuid = o['expect-uuid'] as string | undefined;
  if (uuid !== undefined && !/^[0-9a-fA-F]{32}$/.test(uuid.replace(/-/g, ''))) throw new UsageError('--expect-uuid must be a UUID');
  const disks = diskOptions(o);
  const log = createLogger((o['log-level'] as string | undefined) ?? process.env.LOG_LEVEL ?? 'info');
  log.info(hugePagesState(argv), 'huge pages');
  const limits: Record<string, number> = {};
  if (o['max-ram'] !== undefined) limits.maxRamBytes = int(o['max-ram'], 'max-ram', 4096, 2 ** 52);
  if (o['max-blob'] !== undefined) limits.maxBlobBytes = int(o['max-blob'], 'max-blob', 1, 2 ** 40);
  if (o['max-blocks'] !== undefined) limits.maxBlocks = int(o['max-blocks'], 'max-blocks', 1, 65536);
  if (o['max-section'] !== undefined) limits.maxSectionBytes = int(o['max-section'], 'max-section', 64, 2 ** 40);
  if (o['max-vmdesc'] !== undefined) limits.maxVmdescBytes = int(o['max-vmdesc'], 'max-vmdesc', 1, 2 ** 40);
  if (o['max-channels'] !== undefined) limits.maxChannels = int(o['max-channels'], 'max-channels', 1, 255);
  if (o['max-packet-payload'] !== undefined) limits.maxPacketPayload = int(o['max-packet-payload'], 'max-packet-payload', 1, 2 ** 20);
  if (o['max-command'] !== undefined) limits.maxCommandBytes = int(o['max-command'], 'max-command', 0, 65536);
  const authzValues = (o['tls-authz'] as string[] | undefined) ?? [];
  let authz: string[] = [];
  try { authz = parseAuthzList(authzValues); } catch (e) { throw new UsageError((e as Error).message); }
  if (o['tls-creds'] === undefined && (authz.length > 0 || o['tls-no-verify-peer'])) throw new UsageError('--tls-authz and --tls-no-verify-peer need --tls-creds');
  const tls = o['tls-creds'] !== undefined ? await creds(() => loadServerCreds(String(o['tls-creds']), { verifyPeer: !o['tls-no-verify-peer'], authz })) : undefined;
  const onFailover = o['on-failover'] !== undefined ? failoverAction(String(o['on-failover'])) : undefined;
  const resumeCreds = o['resume-tls-creds'] as string | undefined;
  if (onFailover && onFailover.target.kind === 'tcp') {
    if (onFailover.target.secure && resumeCreds === undefined) throw new UsageError('--on-failover resume=tls+tcp: needs --resume-tls-creds DIR');
    if (!onFailover.target.secure && resumeCreds !== undefined) throw new UsageError('--resume-tls-creds is for resume=tls+tcp:HOST:PORT');
    if (resumeCreds !== undefined) onFailover.target.tls = await creds(() => loadClientCreds(resumeCreds, o['resume-tls-hostname'] as string | undefined));
  } else if (resumeCreds !== undefined) throw new UsageError('--resume-tls-creds is for --on-failover resume=tls+tcp:HOST:PORT');
  let metrics: MetricsAddress | undefined;
  try { metrics = o.metrics !== undefined ? parseMetricsAddress(String(o.metrics)) : undefined; } catch (e) { throw new UsageError((e as Error).message); }
  const res = await receive({
    host: String(o.host),
    port: int(o.port, 'port', 0, 65535),
    multifdChannels: o['multifd-channels'] !== undefined ? int(o['multifd-channels'], 'multifd-channels', 0, 255) : undefined,
    compression: comp as Compression,
    colo: Boolean(o.colo),
    expectVmdesc: !o['no-vmdesc'],
    ...(o.threads !== undefined ? { threads: int(o.threads, 'threads', 1, 256) } : {}),
    dumpRam: o['dump-ram'] as string | undefined,
    statsJson: o['stats-json'] as string | undefined,
    checkpointsCsv: o['checkpoints-csv'] as string | undefined,
    expectUuid: uuid,
    allow: o.allow ? String(o.allow).split(',').map((s) => s.trim()).filter(Boolean) : [],
    ioTimeoutMs: int(o['io-timeout'], 'io-timeout', 0, 2 ** 31 - 1),
    maxUnidentified: int(o['max-unidentified'], 'max-unidentified', 1, 65536),
    heartbeatTimeoutMs: heartbeat(o['heartbeat-timeout']),
    limits,
    ...(o['max-memory'] !== undefined ? { maxMemoryBytes: int(o['max-memory'], 'max-memory', 4096, 2 ** 52) } : {}),
    onFailover,
    tls,
    metrics,
    ...(disks ? { disks } : {}),
    progress: process.stderr.isTTY === true && !o['no-progress'],
    log,
  });
  process.stdout.write(JSON.stringify(res.summary, null, 2) + '\n');
  log.flush?.();
  return res.outcome.kind === 'failed' ? 2 : 0;
}

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  switch (cmd) {
    case undefined:
    case '--help':
    case '-h':
    case 'help':
      process.stdout.write(HELP + '\n');
      return cmd === undefined ? 1 : 0;
    case '--version':
      process.stdout.write('colo-receiver 0.1.0\n');
      return 0;
    case 'listen': {
      const d = hugePagesDecision(rest);
      if (d.reexec && !rest.includes('--help') && !rest.includes('-h')) return reexecWithHugePages(d.env);
      followParent();
      return listen(rest);
    }
    case 'demo':
      return (await import('./demo.js')).demo(rest);
    case 'inspect':
      return (await import('./inspect.js')).inspect(rest);
    case 'restore':
      return (await import('./restore.js')).restoreCommand(rest);
    default:
      throw new UsageError(`unknown command "${cmd}" (try --help)`);
  }
}

// `colo-receiver inspect ... | head` closes stdout early: that is not an error.
process.stdout.on('error', (e: NodeJS.ErrnoException) => { if (e.code === 'EPIPE') process.exit(0); throw e; });

// Nothing may end the process silently: a stray rejection is an internal error (exit 3).
process.on('unhandledRejection', (e) => {
  process.stderr.write(`colo-receiver: internal error (unhandled rejection): ${e instanceof Error ? e.stack : String(e)}\n`);
  process.exit(3);
});

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (e: unknown) => {
    if (e instanceof UsageError || (e instanceof TypeError && 'code' in e && String((e as { code: unknown }).code).startsWith('ERR_PARSE_ARGS'))) {
      process.stderr.write(`colo-receiver: ${(e as Error).message}\n`);
      process.exitCode = 1;
    } else {
      process.stderr.write(`colo-receiver: internal error: ${e instanceof Error ? e.stack : String(e)}\n`);
      process.exitCode = 3;
    }
  },
);
