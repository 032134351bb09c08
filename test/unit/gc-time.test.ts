// The GC-pause accounting behind the checkpoint log line's gcMs (src/ops/gc-time.ts), with
// real collections of this process.
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { gcMsBetween, unwatchGc, watchGc, type GcPause } from '../../src/ops/gc-time.js';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;
after(unwatchGc);

test('full collections inside a window are counted, none outside it', async () => {
  const long: GcPause[] = [];
  watchGc((p) => long.push(p));
  const t0 = performance.now();
  // a heap with something to mark, then full collections
  let keep: object[] = [];
  for (let i = 0; i < 200_000; i++) keep.push({ i, s: `x${i}` });
  for (let i = 0; i < 3; i++) gc();
  const t1 = performance.now();
  keep = [];
  await new Promise((r) => setTimeout(r, 50));
  const inside = gcMsBetween(t0, t1);
  assert.ok(inside > 0, `GC time counted in the window: ${inside} ms`);
  assert.ok(inside <= t1 - t0, `no more GC time than the window lasted (${inside} of ${t1 - t0} ms)`);
  assert.equal(gcMsBetween(t1 + 10_000, t1 + 20_000), 0);
  assert.equal(gcMsBetween(0, t0 - 1e-6) <= gcMsBetween(0, t1 + 1), true);
  for (const p of long) assert.ok(p.ms >= 20 && typeof p.kind === 'string');
});
