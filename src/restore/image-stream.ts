import { createWriteStream } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { once } from 'node:events';
import type { Writable } from 'node:stream';
import type { CommittedImage } from '../migration/committed-image.js';
import { connectTls, type TlsClientCreds } from '../net/tls.js';
import {
  QEMU_VM_CONFIGURATION, QEMU_VM_EOF, QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION, QEMU_VM_SECTION_FOOTER,
  QEMU_VM_SECTION_START, RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_MEM_SIZE, RAM_SAVE_FLAG_PAGE,
  RAM_SAVE_FLAG_ZERO, RAM_SECTION_VERSION, TARGET_PAGE_SIZE,
} from '../wire/constants.js';

const BATCH = 1 << 20;
const ZERO = Buffer.alloc(TARGET_PAGE_SIZE);

function u64(b: Buffer, at: number, n: number): void {
  b.writeUInt32BE(Math.floor(n / 2 ** 32), at);
  b.writeUInt32BE(n >>> 0, at + 4);
}

/**
 * Replays a committed image as an ordinary precopy stream (spec §4.7.5), the way a QEMU
 * source writes one: file header, configuration, a `ram` START section with the MEM_SIZE list
 * and one PAGE or ZERO record per page (CONTINUE after the first page of a block), EOS and
 * footer, the device sections verbatim, EOF. A stock `qemu-system-x86_64 -incoming` with
 * the same machine options loads it and continues the guest. Yields ~1 MiB chunks.
 */
export function* imageStream(img: CommittedImage): Generator<Buffer> {
  const head: Buffer[] = [];
  const fh = Buffer.alloc(8);
  fh.writeUInt32BE(QEMU_VM_FILE_MAGIC, 0);
  fh.writeUInt32BE(QEMU_VM_FILE_VERSION, 4);
  head.push(fh);
  if (img.configuration) head.push(img.configuration);
  else if (img.machineType) {
    const c = Buffer.alloc(5 + img.machineType.length);
    c[0] = QEMU_VM_CONFIGURATION;
    c.writeUInt32BE(img.machineType.length, 1);
    c.write(img.machineType, 5, 'latin1');
    head.push(c);
  }
  // SECTION_START "ram", instance 0, version 4; then MEM_SIZE total | flag and the block list
  const id = img.ramSectionId >= 0 ? img.ramSectionId : 2;
  const sh = Buffer.alloc(1 + 4 + 1 + 3 + 8);
  sh[0] = QEMU_VM_SECTION_START;
  sh.writeUInt32BE(id, 1);
  sh[5] = 3;
  sh.write('ram', 6, 'latin1');
  sh.writeUInt32BE(0, 9);
  sh.writeUInt32BE(RAM_SECTION_VERSION, 13);
  head.push(sh);
  const total = img.blocks.reduce((s, b) => s + b.usedLength, 0);
  const ms = Buffer.alloc(8);
  u64(ms, 0, total + RAM_SAVE_FLAG_MEM_SIZE);
  head.push(ms);
  for (const b of img.blocks) {
    const e = Buffer.alloc(1 + b.idstr.length + 8);
    e[0] = b.idstr.length;
    e.write(b.idstr, 1, 'latin1');
    u64(e, 1 + b.idstr.length, b.usedLength);
    head.push(e);
  }
  yield Buffer.concat(head);

  let out = Buffer.allocUnsafe(BATCH + 2 * TARGET_PAGE_SIZE);
  let at = 0;
  for (const b of img.blocks) {
    let first = true;
    for (let p = 0; p < b.pages; p++) {
      const offset = p * TARGET_PAGE_SIZE;
      const v = b.page(p);
      // A page without a slot is zero; a slot may hold zeros too (7.2 multifd sends every
      // page as data): either goes out as QEMU sends it, flagged, with no payload.
      const src = v ? Buffer.from(v.buffer, v.byteOffset, TARGET_PAGE_SIZE) : null;
      const zero = src === null || src.equals(ZERO);
      const flags = (zero ? RAM_SAVE_FLAG_ZERO : RAM_SAVE_FLAG_PAGE) | (first ? 0 : RAM_SAVE_FLAG_CONTINUE);
      u64(out, at, offset + flags);
      at += 8;
      if (first) {
        out[at++] = b.idstr.length;
        at += out.write(b.idstr, at, 'latin1');
        first = false;
      }
      if (zero) out[at++] = 0;
      else { src!.copy(out, at); at += TARGET_PAGE_SIZE; }
      if (at >= BATCH) { yield out.subarray(0, at); out = Buffer.allocUnsafe(BATCH + 2 * TARGET_PAGE_SIZE); at = 0; }
    }
  }
  const tail = Buffer.alloc(8 + 5);
  u64(tail, 0, RAM_SAVE_FLAG_EOS);
  tail[8] = QEMU_VM_SECTION_FOOTER;
  tail.writeUInt32BE(id, 9);
  if (at > 0) yield Buffer.concat([out.subarray(0, at), tail]);
  else yield tail;
  yield img.deviceState;
  yield Buffer.from([QEMU_VM_EOF]);
}

/** Writes the stream with backpressure; returns the bytes written. */
export async function writeImageStream(img: CommittedImage, w: Writable, onProgress?: (bytes: number) => void): Promise<number> {
  let n = 0;
  for (const chunk of imageStream(img)) {
    n += chunk.length;
    if (!w.write(chunk)) await once(w, 'drain');
    onProgress?.(n);
  }
  return n;
}

/**
 * `secure`: `tls+tcp:` was asked for; `tls` holds the client credentials (--resume-tls-creds /
 * restore --tls-creds), attached after parsing. A secure target without them is refused.
 */
export type ResumeTarget = { kind: 'tcp'; host: string; port: number; secure?: boolean; tls?: TlsClientCreds } | { kind: 'file'; path: string };

/** Parses `tcp:HOST:PORT`, `tls+tcp:HOST:PORT` or a path (`save=PATH` / `--from PATH`). */
export function parseTarget(spec: string): ResumeTarget {
  const m = /^(tls\+)?tcp:(\[[^\]]+\]|[^:]+):(\d+)$/.exec(spec);
  if (m) return { kind: 'tcp', host: m[2]!.replace(/^\[|\]$/g, ''), port: Number(m[3]), ...(m[1] ? { secure: true } : {}) };
  if (/^(tls\+)?tcp:/.test(spec)) throw new RangeError(`bad target "${spec}": expected tcp:HOST:PORT or tls+tcp:HOST:PORT`);
  return { kind: 'file', path: spec };
}

/** How a target is written in log lines. */
export function describeTarget(t: ResumeTarget): string {
  return t.kind === 'tcp' ? `${t.secure ? 'tls+' : ''}tcp:${t.host}:${t.port}` : t.path;
}

export async function openTarget(t: ResumeTarget): Promise<Writable> {
  if (t.kind === 'file') {
    const w = createWriteStream(t.path);
    await once(w, 'open');
    return w;
  }
  if (t.secure) {
    if (!t.tls) throw new RangeError(`${describeTarget(t)}: TLS target without client credentials (--resume-tls-creds DIR)`);
    return connectTls(t.host, t.port, t.tls);
  }
  const s: Socket = connect({ host: t.host, port: t.port, noDelay: true });
  await once(s, 'connect');
  return s;
}

/** Sends the image to a waiting `-incoming` QEMU or a file, and closes it. */
export async function sendImage(img: CommittedImage, t: ResumeTarget, onProgress?: (bytes: number) => void): Promise<number> {
  const w = await openTarget(t);
  try {
    const closed = t.kind === 'tcp' ? once(w, 'close') : null;
    const n = await writeImageStream(img, w, onProgress);
    w.end();
    await once(w, 'finish');
    // QEMU closes the incoming connection once it has loaded the stream (no return path):
    // the close is the moment the destination holds the VM.
    if (closed) await closed;
    return n;
  } catch (e) {
    w.destroy();
    throw e;
  }
}
