// `colo-receiver inspect` decodes every real capture in test/fixtures/captures to its end:
// main and multifd channels together, precopy and COLO, whatever QEMU recorded them.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';

const MAIN = new URL('../../src/cli/main.js', import.meta.url).pathname;
const FIXTURES = new URL('../../../test/fixtures/', import.meta.url).pathname;
// captures: QEMU 7.2; captures-qemu10: QEMU 10.0.2 (stock for precopy, the COLO build for COLO)
const ROOTS = ['captures', 'captures-qemu10'];

const dirs = ROOTS.flatMap((r) => readdirSync(join(FIXTURES, r), { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => `${r}/${d.name}`)).sort();

describe('inspect on real captures', () => {
  test('there are captures of both QEMU versions to decode', () => { assert.ok(dirs.length >= 8, dirs.join(',')); });
  for (const name of dirs) {
    test(`${name}: every stream decodes to its end`, () => {
      const dir = join(FIXTURES, name);
      const streams = readdirSync(dir).filter((f) => /^(main|multifd-\d+)\.bin(\.gz)?$/.test(f)).map((f) => join(dir, f));
      const comp = /zstd/.test(name) ? 'zstd' : /zlib/.test(name) ? 'zlib' : 'none';
      const r = spawnSync(process.execPath, [MAIN, 'inspect', `--compression=${comp}`, ...streams], { encoding: 'utf8', timeout: 60_000 });
      assert.equal(r.status, 0, r.stdout.slice(-2000) + r.stderr);
      assert.doesNotMatch(r.stdout, /ERROR|left over/);
      const main = /(\d+) bytes parsed/.exec(r.stdout);
      assert.ok(main, 'the main channel was decoded');
      if (/colo/.test(name)) assert.match(r.stdout, /\d+ COLO checkpoints/);
      const multifd = streams.filter((s) => /multifd-/.test(s)).length;
      assert.equal((r.stdout.match(/ packets, /g) ?? []).length, multifd, 'one summary per multifd channel');
    });
  }
});
