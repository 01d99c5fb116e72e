// Build-time CUDA detection for binding.gyp: `node cuda/detect-cuda.js nvcc|libdir` prints the
// nvcc path or the directory holding libcudart_static.a, or nothing for a CPU-only build.
// RETNET_CUDA=0 disables CUDA; RETNET_CUDA=1 makes a missing toolkit an error.
'use strict';
const { spawnSync } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const force = process.env.RETNET_CUDA;

function nvccCandidates() {
  const out = [];
  for (const root of [process.env.CUDA_HOME, process.env.CUDA_PATH]) if (root) out.push(path.join(root, 'bin', 'nvcc'));
  out.push('nvcc', '/usr/local/cuda/bin/nvcc');
  return out;
}

// The toolkit's bin directory as nvcc reports it (`_HERE_`), which also sees through wrapper scripts.
function toolkitBin(nvcc) {
  // A dry run prints its variables (on stderr) without compiling anything.
  const run = spawnSync(nvcc, ['--dryrun', '-E', '-x', 'cu', os.devNull], { encoding: 'utf8' });
  const here = /_HERE_=(.*)/.exec(`${run.stdout || ''}${run.stderr || ''}`);
  return here ? here[1].trim() : undefined;
}

function detect() {
  if (force === '0') return undefined;
  for (const nvcc of nvccCandidates()) {
    const bin = toolkitBin(nvcc);
    if (!bin) continue;
    const root = path.dirname(bin);
    const libdir = ['lib64', path.join('targets', 'x86_64-linux', 'lib'), path.join('targets', 'sbsa-linux', 'lib'), 'lib']
      .map((d) => path.join(root, d))
      .find((d) => fs.existsSync(path.join(d, 'libcudart_static.a')));
    if (libdir && fs.existsSync(path.join(bin, 'nvcc'))) return { nvcc: path.join(bin, 'nvcc'), libdir };
  }
  return undefined;
}

const what = process.argv[2];
if (what !== 'nvcc' && what !== 'libdir') {
  process.stderr.write('usage: node cuda/detect-cuda.js nvcc|libdir\n');
  process.exit(2);
}
const found = detect();
if (!found && force === '1') {
  process.stderr.write('RETNET_CUDA=1 but no CUDA toolkit (nvcc and libcudart_static.a) was found; set CUDA_HOME\n');
  process.exit(1);
}
process.stdout.write(found ? found[what] : '');
