export async function restoreCommand(_argv: string[]): Promise<number> { throw new Error('restore: not built yet'); }
