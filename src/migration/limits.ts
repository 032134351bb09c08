/**
 * Caps on every wire number, checked before any allocation or write (STYLE §3; ws's
 * maxPayload). Defaults admit any guest this machine can hold and refuse absurd values.
 */
export interface Limits {
  /** Sum of all RAMBlock used_length (MEM_SIZE total). */
  maxRamBytes: number;
  maxBlocks: number;
  /** COLO device-state blob (VMSTATE_SIZE). */
  maxBlobBytes: number;
  /** One device section of the initial migration (footer scan stops here). */
  maxSectionBytes: number;
  maxVmdescBytes: number;
  /** Compressed payload of one multifd packet (QEMU's receive buffer is 1 MiB). */
  maxPacketPayload: number;
  maxChannels: number;
  /** QEMU_VM_COMMAND payload. */
  maxCommandBytes: number;
}

export const DEFAULT_LIMITS: Limits = {
  maxRamBytes: 64 * 2 ** 30,
  maxBlocks: 1024,
  maxBlobBytes: 256 * 2 ** 20,
  maxSectionBytes: 64 * 2 ** 20,
  maxVmdescBytes: 64 * 2 ** 20,
  maxPacketPayload: 2 ** 20,
  maxChannels: 255,
  maxCommandBytes: 65536,
};
