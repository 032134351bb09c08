export async function inspect(_argv: string[]): Promise<number> { throw new Error('inspect: not built yet'); }
