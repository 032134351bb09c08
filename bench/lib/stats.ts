// Distributions (the receiver's own nearest-rank definition, so our CSV and the traces are
// summarised the same way) and number formatting for the reports.
import { distribution, type Dist } from '../../src/migration/checkpoint-stats.js';

export { distribution, type Dist };

/** Distribution of the finite values only (a missing trace line gives NaN / undefined). */
export function dist(xs: readonly (number | undefined)[]): Dist {
  return distribution(xs.filter((x): x is number => typeof x === 'number' && Number.isFinite(x)));
}

export function sum(xs: readonly number[]): number {
  let s = 0;
  for (const x of xs) s += x;
  return s;
}

/** Milliseconds with 2 decimals (3 below 1 ms: idle checkpoints are sub-millisecond). */
export function ms(x: number | undefined): string {
  if (x === undefined || !Number.isFinite(x)) return '–';
  return x < 1 ? x.toFixed(3) : x.toFixed(2);
}

export function ratio(a: number | undefined, b: number | undefined): string {
  if (a === undefined || b === undefined || !Number.isFinite(a) || !Number.isFinite(b) || b === 0) return '–';
  return `${(a / b).toFixed(2)}×`;
}
