// One operation of the bench-cuda model, for a kernel profiler: it runs the operation `--reps`
// times after one warm-up and prints the wall time of each, so the profile's kernel times can
// be set against the call's (the difference is host work and copies).
//   node dist/scripts/cuda-profile.js OP [--reps N] [--device cpu]
//   OP: forward-parallel | forward-chunkwise | prefill | step-1 | step-16 | step-64 | train
// scripts/cuda-check.sh --profile runs every OP under Nsight Compute on the GPU machine.
import { RetNet } from '../lib/model';
import { benchConfig, benchOperations } from './bench-cuda';

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const reps = args.includes('--reps') ? Number(args[args.indexOf('--reps') + 1]) : 3;
  if (!Number.isInteger(reps) || reps < 1) throw new Error(`cuda-profile: --reps must be a positive integer`);
  const device = args.includes('--device') ? args[args.indexOf('--device') + 1] : 'cuda';
  if (device !== 'cuda' && device !== 'cpu') throw new Error(`cuda-profile: --device must be cuda or cpu, got '${device}'`);
  const config = benchConfig(false);
  const model = await RetNet.create(config, { device });
  try {
    const ops = benchOperations(model.native(), model.config, false, [1, 16, 64]);
    const op = ops.find((o) => o.id === args[0]);
    if (!op) throw new Error(`cuda-profile: OP must be one of ${ops.map((o) => o.id).join(', ')}, got '${args[0]}'`);
    await op.run();
    const times: string[] = [];
    for (let i = 0; i < reps; i++) {
      const t0 = process.hrtime.bigint();
      await op.run();
      times.push((Number(process.hrtime.bigint() - t0) / 1e6).toFixed(3));
    }
    console.log(`cuda-profile ${op.id}: wall ms ${times.join(' ')}`);
    ops.forEach((o) => o.dispose?.());
  } finally {
    model.dispose();
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exitCode = 1;
});
