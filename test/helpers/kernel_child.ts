// Runs products in a child process under another RETNET_CPU_ISA (the addon picks its kernel
// set once per process) through gemm_child.js, which documents the case formats.
import { spawnSync } from 'child_process';
import * as path from 'path';

export function runWithIsa(isa: string, cases: unknown[]): { gemm: string; outputs: number[][] } {
  const child = spawnSync(process.execPath, [path.join(__dirname, 'gemm_child.js')], {
    input: JSON.stringify(cases),
    env: { ...process.env, RETNET_CPU_ISA: isa },
    encoding: 'utf8',
    maxBuffer: 1 << 28,
  });
  if (child.stderr !== '' || child.status !== 0) throw new Error(`gemm_child.js under ${isa} failed (${child.status}): ${child.stderr}`);
  return JSON.parse(child.stdout) as { gemm: string; outputs: number[][] };
}
