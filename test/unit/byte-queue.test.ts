import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ByteQueue } from '../../src/wire/byte-queue.js';

/** Bytes 0, 1, 2, ... (mod 256): every position is recognisable. */
function seq(from: number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (from + i) & 0xff;
  return b;
}

function queueOf(...chunks: Buffer[]): ByteQueue {
  const q = new ByteQueue();
  for (const c of chunks) q.push(c);
  return q;
}

describe('ByteQueue', () => {
  test('hands out a view, not a copy, when the bytes sit in one chunk', () => {
    const c = seq(0, 16);
    const q = queueOf(c);
    const t = q.take(4);
    assert.deepEqual([...t], [0, 1, 2, 3]);
    assert.equal(t.buffer, c.buffer, 'a view shares the chunk memory');
    assert.equal(q.length, 12);
    assert.equal(q.consumed, 4);
  });

  test('hands out the whole head chunk when take matches its length', () => {
    const a = seq(0, 8), b = seq(8, 8);
    const q = queueOf(a, b);
    assert.equal(q.take(8), a);
    assert.deepEqual([...q.take(8)], [...b]);
    assert.equal(q.length, 0);
    assert.equal(q.consumed, 16);
  });

  test('copies a take that spans three chunks', () => {
    const q = queueOf(seq(0, 3), seq(3, 2), seq(5, 10));
    const t = q.take(7);
    assert.deepEqual([...t], [0, 1, 2, 3, 4, 5, 6]);
    assert.equal(q.length, 8);
    assert.equal(q.consumed, 7);
    assert.deepEqual([...q.take(8)], [7, 8, 9, 10, 11, 12, 13, 14]);
  });

  test('ignores empty chunks', () => {
    const q = queueOf(Buffer.alloc(0), seq(0, 2), Buffer.alloc(0), seq(2, 2));
    assert.equal(q.length, 4);
    assert.deepEqual([...q.take(4)], [0, 1, 2, 3]);
  });

  test('take(0) consumes nothing', () => {
    const q = queueOf(seq(0, 4));
    assert.equal(q.take(0).length, 0);
    assert.equal(q.consumed, 0);
    assert.equal(q.length, 4);
    const empty = new ByteQueue();
    assert.equal(empty.take(0).length, 0);
  });

  test('peekByte reads across chunks without consuming', () => {
    const q = queueOf(seq(0, 2), seq(2, 1), seq(3, 5));
    assert.equal(q.peekByte(), 0);
    assert.equal(q.peekByte(2), 2);
    assert.equal(q.peekByte(7), 7);
    assert.equal(q.length, 8);
    assert.equal(q.consumed, 0);
  });

  test('peek returns the first n bytes across chunks without consuming', () => {
    const q = queueOf(seq(0, 2), seq(2, 3), seq(5, 5));
    assert.deepEqual([...q.peek(6)], [0, 1, 2, 3, 4, 5]);
    assert.deepEqual([...q.peek(2)], [0, 1]);
    assert.equal(q.consumed, 0);
    assert.equal(q.length, 10);
    assert.deepEqual([...q.peekAll()], [...seq(0, 10)]);
  });

  test('peek(0) and peekAll() of an empty queue return an empty buffer', () => {
    const q = new ByteQueue();
    assert.equal(q.peek(0).length, 0);
    assert.equal(q.peekAll().length, 0);
  });

  test('copyInto moves bytes across chunks to the given offset', () => {
    const q = queueOf(seq(0, 3), seq(3, 3), seq(6, 4));
    const dst = new Uint8Array(12).fill(0xee);
    q.copyInto(dst, 2, 8);
    assert.deepEqual([...dst], [0xee, 0xee, 0, 1, 2, 3, 4, 5, 6, 7, 0xee, 0xee]);
    assert.equal(q.consumed, 8);
    assert.equal(q.length, 2);
    assert.deepEqual([...q.take(2)], [8, 9]);
  });

  test('copyInto does not alias the destination with a chunk', () => {
    const c = seq(0, 4);
    const q = queueOf(c);
    const dst = new Uint8Array(4);
    q.copyInto(dst, 0, 4);
    c[0] = 0x99;
    assert.equal(dst[0], 0);
  });

  test('skip drops bytes across chunks', () => {
    const q = queueOf(seq(0, 2), seq(2, 2), seq(4, 4));
    q.skip(5);
    assert.equal(q.consumed, 5);
    assert.equal(q.length, 3);
    assert.deepEqual([...q.take(3)], [5, 6, 7]);
  });

  test('unshift gives bytes back as the new head and rewinds consumed', () => {
    const q = queueOf(seq(0, 10));
    const taken = Buffer.from(q.take(6));
    assert.equal(q.consumed, 6);
    q.unshift(taken.subarray(3));
    assert.equal(q.consumed, 3);
    assert.equal(q.length, 7);
    assert.deepEqual([...q.take(7)], [3, 4, 5, 6, 7, 8, 9]);
    q.unshift(Buffer.alloc(0));
    assert.equal(q.length, 0);
    assert.equal(q.consumed, 10);
  });

  test('unshift after a whole chunk was read puts the bytes before the next chunk', () => {
    const q = queueOf(seq(0, 4), seq(4, 4));
    const first = Buffer.from(q.take(4));
    q.unshift(first.subarray(2));
    assert.equal(q.consumed, 2);
    assert.deepEqual([...q.take(6)], [2, 3, 4, 5, 6, 7]);
  });

  test('peekU32 reads a be32 inside one chunk and across chunks without consuming', () => {
    const q = queueOf(Buffer.from([0xde]), Buffer.from([0xad, 0xbe]), Buffer.from([0xef, 0x01, 0x02, 0x03, 0x04]));
    assert.equal(q.peekU32(0), 0xdeadbeef);
    assert.equal(q.peekU32(4), 0x01020304);
    assert.equal(q.length, 8);
    q.skip(4);
    assert.equal(q.peekU32(), 0x01020304);
    assert.throws(() => q.peekU32(1), { code: 'ERR_ASSERTION' });
  });

  test('reads through thousands of small chunks in order', () => {
    const whole = seq(0, 5000);
    const q = new ByteQueue();
    for (let i = 0; i < whole.length; i += 2) q.push(whole.subarray(i, i + 2));
    const out: number[] = [];
    while (q.length >= 7) out.push(...q.take(7));
    out.push(...q.take(q.length));
    assert.deepEqual(Buffer.from(out), whole);
    assert.equal(q.consumed, 5000);
    q.push(seq(0, 3));
    assert.deepEqual([...q.peek(3)], [0, 1, 2]);
  });

  test('clear drops everything and counts it as consumed', () => {
    const q = queueOf(seq(0, 3), seq(3, 4));
    q.take(1);
    q.clear();
    assert.equal(q.length, 0);
    assert.equal(q.consumed, 7);
    q.push(seq(7, 1));
    assert.equal(q.take(1)[0], 7);
    assert.equal(q.consumed, 8);
  });

  test('asserts on reading past the end (an internal invariant, not bad input)', () => {
    const q = queueOf(seq(0, 4));
    assert.throws(() => q.take(5), { code: 'ERR_ASSERTION' });
    assert.throws(() => q.peek(5), { code: 'ERR_ASSERTION' });
    assert.throws(() => q.peekByte(4), { code: 'ERR_ASSERTION' });
    assert.throws(() => q.copyInto(new Uint8Array(8), 0, 5), { code: 'ERR_ASSERTION' });
    assert.throws(() => q.skip(5), { code: 'ERR_ASSERTION' });
    assert.equal(q.length, 4, 'a refused read consumes nothing');
    assert.equal(q.consumed, 0);
  });

  test('mixed operations read the stream in order', () => {
    const whole = seq(0, 300);
    const q = queueOf(whole.subarray(0, 7), whole.subarray(7, 8), whole.subarray(8, 130), whole.subarray(130));
    const out: number[] = [];
    out.push(...q.take(5));
    out.push(q.peekByte(0));
    q.skip(1);
    const dst = new Uint8Array(200);
    q.copyInto(dst, 0, 200);
    out.push(...dst);
    out.push(...q.peek(94));
    out.push(...q.take(94));
    assert.equal(q.length, 0);
    assert.equal(q.consumed, 300);
    assert.deepEqual(out.slice(0, 206), [...whole.subarray(0, 206)]);
    assert.deepEqual(out.slice(206, 300), [...whole.subarray(206)]);
    assert.deepEqual(out.slice(300), [...whole.subarray(206)]);
  });
});
