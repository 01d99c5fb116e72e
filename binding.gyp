{
  "variables": {
    "cuda_nvcc": "<!(node cuda/detect-cuda.js nvcc)",
    "cuda_lib_dir": "<!(node cuda/detect-cuda.js libdir)"
  },
  "targets": [
    {
      "target_name": "retnet",
      "sources": [
        "csrc/addon.cc",
        "csrc/model.cc",
        "csrc/train.cc",
        "csrc/ops_cpu.cc",
        "csrc/gemm.cc",
        "csrc/threadpool.cc",
        "csrc/bench.cc",
        "csrc/quant.cc",
        "csrc/panels.cc",
        "csrc/sampler.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_CPP_EXCEPTIONS_ALL", "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags!": ["-fno-exceptions", "-O2"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti", "-O2"],
      "cflags_cc": ["-std=c++17", "-O3", "-fexceptions", "-Wall", "-Wno-unused-parameter"],
      "cflags": ["-O3"],
      "conditions": [
        ["cuda_nvcc!=''", {
          "sources": ["cuda/ops_cuda.cu"],
          "include_dirs": ["cuda", "csrc"],
          "defines": ["RETNET_WITH_CUDA"],
          "libraries": ["-L<(cuda_lib_dir)", "-lcudart_static", "-ldl", "-lrt", "-lpthread"],
          "rules": [
            {
              "rule_name": "nvcc",
              "extension": "cu",
              "inputs": ["csrc/ops.h", "csrc/gemm.h", "csrc/counter_rng.h", "cuda/ops_cuda.h"],
              "outputs": ["<(INTERMEDIATE_DIR)/<(RULE_INPUT_ROOT).o"],
              "action": [
                "<(cuda_nvcc)", "-c", "<(RULE_INPUT_PATH)", "-o", "<@(_outputs)",
                "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Icsrc", "-Icuda", "--threads", "0",
                "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"
              ],
              "message": "nvcc <(RULE_INPUT_PATH)",
              "process_outputs_as_sources": 1
            }
          ]
        }]
      ]
    }
  ]
}
