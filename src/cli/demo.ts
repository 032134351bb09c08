export async function demo(_argv: string[]): Promise<number> { throw new Error('demo: not built yet'); }
