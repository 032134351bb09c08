/**
 * Something outside guest RAM whose state must move in lock-step with the committed checkpoint
 * (a replicated disk). The migration calls it at the commit points and once at the end; it
 * never sees the stream.
 */
export interface CheckpointParticipant {
  readonly name: string;
  /**
   * Checkpoint `checkpoint` is complete: make everything received for it part of the committed
   * state. Awaited before the checkpoint's RAM is flushed and VMSTATE_LOADED is sent (for the
   * initial migration, checkpoint 0, before CHECKPOINT_READY), so a participant that cannot
   * commit (throws) leaves the whole checkpoint uncommitted. A MigrationError with code
   * ERR_PEER ends COLO as "primary lost" (failover), any other error as a failure.
   */
  commit(checkpoint: number): Promise<void>;
  /**
   * The session ended holding `committed` (-1: nothing committed). Drop whatever belongs to a
   * later, incomplete checkpoint and resolve once the committed state is final (the migration's
   * `done` waits for this, so a failover starts from it). Must not reject.
   */
  end(committed: number): Promise<void>;
}
