// Checkpoint statistics stay bounded in a long session: distributions over a window, the total
// counted, CSV rows formatted one at a time.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { CheckpointStats } from '../../src/migration/checkpoint-stats.js';

function commit(st: CheckpointStats, index: number, transferMs: number): void {
  const c = st.begin(index, 1000 * index);
  Object.assign(c, { tSend: 1000 * index + 1, tRamDone: 1000 * index + 1 + transferMs, tBlob: 1000 * index + 2 + transferMs, tFlushStart: 0, tFlushEnd: 1, tLoaded: 1000 * index + 3 + transferMs, pages: index, channelBytes: [0, 4096 * index] });
  st.finish(c);
}

describe('CheckpointStats', () => {
  test('keeps the last `window` records, counts all of them', () => {
    const st = new CheckpointStats(5);
    for (let i = 1; i <= 23; i++) commit(st, i, i);
    assert.equal(st.count, 23);
    assert.deepEqual(st.done.map((c) => c.index), [19, 20, 21, 22, 23]);
    const s = st.summary() as { count: number; window: number; transferMs: { n: number; max: number; mean: number } };
    assert.equal(s.count, 23);
    assert.equal(s.window, 5);
    assert.equal(s.transferMs.n, 5);
    assert.equal(s.transferMs.max, 23);
    assert.equal(s.transferMs.mean, 21);
  });

  test('after 10,000 checkpoints only the window is held', () => {
    const st = new CheckpointStats(100);
    for (let i = 1; i <= 10_000; i++) commit(st, i, 1);
    assert.equal(st.done.length, 100);
    assert.equal(st.done[0]!.index, 9901);
  });

  test('CSV header and rows', () => {
    const st = new CheckpointStats();
    commit(st, 7, 2.5);
    const [head, row] = st.csv().trim().split('\n');
    assert.equal(head, 'checkpoint,transfer_ms,transfer_busy_ms,blob_ms,flush_ms,pause_ms,pages,zero_pages,flushed_pages,blob_bytes,bytes_main,bytes_multifd0');
    assert.equal(row, '7,2.500,0.000,1.000,1.000,5.500,7,0,0,0,0,28672');
    assert.equal(CheckpointStats.csvRow(st.done[0]!, 2), row);
  });
});
