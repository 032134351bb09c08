// Public surface of the synthetic source: byte builders for tests and fixtures, the guest and
// device models, and the TCP source / COLO primary used by benchmarks and fault injection.

export { StreamBuilder, type SectionHeader, type RamBlockInfo } from './stream-builder.js';
export {
  encodeMultiFDInit,
  encodeMultiFDPacketHeader,
  MultiFDPacketImage,
  NoCompEncoder,
  type MultiFDInitFields,
  type MultiFDPacketHeaderFields,
  type MultiFDPacketFill,
  type MultiFDPacketImageOptions,
  type MultiFDEncoder,
} from './multifd-builder.js';
export { ZlibEncoder, ZstdEncoder } from './multifd-compress.js';
export {
  DeviceState,
  DEFAULT_DEVICES,
  mayStartRecord,
  vmsdBodyLength,
  type DeviceSpec,
  type DeviceSection,
  type DeviceStateOptions,
  type VmdescField,
  type VmdescVmsd,
} from './device-state.js';
export {
  MemoryModel,
  GuestBlock,
  defaultRamBlocks,
  drawLoadBytes,
  LOAD_MEDIAN_BYTES,
  LOAD_SIGMA,
  type RAMBlockSpec,
  type Workload,
  type DirtySet,
  type MemoryModelOptions,
} from './memory-model.js';
export { Prng } from './prng.js';
export { QUIRKS_72_ALL, QUIRKS_72_NONE, type Layout, type SyncScheme, type Quirks72 } from './ram-saver.js';
export {
  SyntheticSource,
  type SyntheticSourceOptions,
  type SourceResult,
  type CheckpointInfo,
  type KillAt,
} from './source.js';
