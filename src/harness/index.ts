// Test/benchmark harness around real QEMU (not used by the receiver core).
export * from './qmp.js';
export * from './qemu.js';
export * from './guest.js';
export * from './precopy.js';
export * from './colo.js';
export * from './workload.js';
export { makePki, type Pki } from './pki.js';
export * from './disk.js';
