import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

/**
 * `--help` for a benchmark: its opening comment (usage line and what it measures), which tsc
 * keeps in the built file, so the text a reader sees in the source is the text printed.
 */
export function printUsageAndExit(moduleUrl: string): never {
  const lines = readFileSync(fileURLToPath(moduleUrl), 'utf8').split('\n');
  const out: string[] = [];
  for (const l of lines) {
    if (!l.startsWith('//')) break;
    out.push(l.replace(/^\/\/ ?/, ''));
  }
  console.log(out.join('\n'));
  process.exit(0);
}
