/**
 * Numbers for SharedArrayBuffers that threads name in Atomics control words (page-writer
 * rings, socket readers): a buffer reaches a thread once, over its MessagePort, and is named by
 * its number afterwards. When the main thread's object is collected (a slab chunk given back),
 * every listener hears its number, so the threads drop their reference too and the memory
 * really goes back to the system.
 */
export class SabIds {
  readonly #uids = new WeakMap<SharedArrayBuffer, number>();
  #uid = 0;
  readonly #listeners = new Set<(uid: number) => void>();
  readonly #gone = new FinalizationRegistry<number>((uid) => { for (const f of this.#listeners) f(uid); });

  /** The buffer's number (from 1), assigned on first use. */
  uidOf(sab: SharedArrayBuffer): number {
    let uid = this.#uids.get(sab);
    if (uid === undefined) {
      uid = ++this.#uid;
      this.#uids.set(sab, uid);
      this.#gone.register(sab, uid);
    }
    return uid;
  }

  /** Calls `f` with the number of every buffer collected from now on; returns the unsubscribe. */
  onGone(f: (uid: number) => void): () => void {
    this.#listeners.add(f);
    return () => { this.#listeners.delete(f); };
  }
}

/** The process's one numbering: a buffer keeps its number whichever thread it is sent to. */
export const sabIds = new SabIds();
