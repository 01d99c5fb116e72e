// `npm run test:cuda`: the CUDA backend's tests only (they skip, saying why, without a GPU).
const base = require('./jest.config.js');

/** @type {import('jest').Config} */
module.exports = { ...base, roots: ['<rootDir>/test/cuda'], testTimeout: 600000 };
