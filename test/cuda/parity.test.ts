// CUDA vs CPU parity of the whole model on every fixture (checks and tolerances in
// scripts/cuda-parity.ts). Skips, saying why, when the build has no CUDA or no device.
import { checkFixture, cudaAvailability, fixtureNames, passed } from '../../scripts/cuda-parity';

const { available, reason } = cudaAvailability();
if (!available) console.warn(`CUDA parity tests skipped: ${reason}`);

(available ? describe : describe.skip)('CUDA backend matches the CPU backend', () => {
  test.each(fixtureNames())('%s', async (name) => {
    const rows = await checkFixture(name);
    const failures = rows.filter((r) => !passed(r)).map((r) => `${r.check}: ${r.error} > ${r.tolerance}`);
    expect(failures).toEqual([]);
  }, 600000);
});
