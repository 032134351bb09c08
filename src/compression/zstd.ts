// zstd-napi's low-level binding (ZSTD_DCtx / ZSTD_CCtx streaming calls). Node 20's zlib has no
// zstd (spec §2.5.3, §8.8); the package builds its bundled libzstd at install time.
import zstd from 'zstd-napi/binding.js';

export { zstd };

/** zstd's default window limit (ZSTD_WINDOWLOG_LIMIT_DEFAULT): higher levels use larger windows. */
export const ZSTD_WINDOWLOG_MAX = 27;
