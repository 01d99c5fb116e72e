{
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
        "csrc/bench.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags!": ["-fno-exceptions", "-O2"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti", "-O2"],
      "cflags_cc": ["-std=c++17", "-O3", "-fexceptions", "-Wall", "-Wno-unused-parameter"],
      "cflags": ["-O3"]
    }
  ]
}
