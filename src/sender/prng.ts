// Seeded PRNG for the synthetic source: every byte the sender invents (guest pages, device
// bodies, dirty sets, when a 7.2 quirk fires) comes from here, so a seed reproduces a run.
// xoshiro128** (Blackman/Vigna, public domain) seeded through splitmix32: 32-bit integer
// math only, no BigInt, fast enough to fill guest RAM a word at a time.

/** A deterministic pseudo-random generator. Not for cryptography. */
export class Prng {
  #a: number; #b: number; #c: number; #d: number;
  #spareNormal: number | undefined;

  constructor(seed: number) {
    let s = seed >>> 0;
    const split = (): number => {        // splitmix32: spreads a small seed over 128 bits of state
      s = (s + 0x9e3779b9) >>> 0;
      let z = s;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.#a = split(); this.#b = split(); this.#c = split(); this.#d = split();
    if ((this.#a | this.#b | this.#c | this.#d) === 0) this.#a = 1;   // the all-zero state is a fixed point
  }

  /** Next uniformly distributed unsigned 32-bit integer. */
  u32(): number {
    const r = Math.imul(rotl(Math.imul(this.#b, 5), 7), 9) >>> 0;
    const t = this.#b << 9;
    this.#c ^= this.#a; this.#d ^= this.#b; this.#b ^= this.#c; this.#a ^= this.#d;
    this.#c ^= t;
    this.#d = rotl(this.#d, 11);
    return r;
  }

  /** Uniform float in [0, 1). */
  float(): number {
    return this.u32() / 4294967296;
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.float() * n);
  }

  /** True with probability p. */
  chance(p: number): boolean {
    return this.float() < p;
  }

  /** Standard normal deviate (Box-Muller, one spare kept). */
  normal(): number {
    const spare = this.#spareNormal;
    if (spare !== undefined) { this.#spareNormal = undefined; return spare; }
    let u = 0;
    while (u === 0) u = this.float();
    const v = this.float();
    const r = Math.sqrt(-2 * Math.log(u));
    this.#spareNormal = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  }

  /** Fill dst[from..to) with random words: u32() in a loop, with the state kept in locals. */
  fillWords(dst: Uint32Array, from = 0, to = dst.length): void {
    let a = this.#a, b = this.#b, c = this.#c, d = this.#d;
    for (let i = from; i < to; i++) {
      dst[i] = Math.imul(rotl(Math.imul(b, 5), 7), 9);
      const t = b << 9;
      c ^= a; d ^= b; b ^= c; a ^= d;
      c ^= t;
      d = rotl(d, 11);
    }
    this.#a = a; this.#b = b; this.#c = c; this.#d = d;
  }

  /** Fill dst with random bytes. */
  fill(dst: Uint8Array, from = 0, to = dst.length): void {
    let i = from;
    for (; i + 4 <= to; i += 4) {
      const w = this.u32();
      dst[i] = w; dst[i + 1] = w >>> 8; dst[i + 2] = w >>> 16; dst[i + 3] = w >>> 24;
    }
    if (i < to) {
      let w = this.u32();
      for (; i < to; i++, w >>>= 8) dst[i] = w;
    }
  }

  /** A new generator derived from this one, for an independent stream (e.g. per checkpoint). */
  fork(): Prng {
    return new Prng(this.u32());
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
