"""How a model runs: PyTorch eager, or ONNX Runtime from an exported copy (issues 9 and 14).

- `export` (torch, only ever in a short-lived child process): the torch pipeline → ONNX files,
  a parity check against eager on a probe batch and the bundled samples, eager-vs-ORT timings,
  and a JSON sidecar with everything the torch-free side needs.
- `cache` (no torch): where exported files live (`weights_dir/onnx/<model>/<key>/`), the key
  (weights' digest + library versions + export format), the sidecar's checks.
- `sessions`, `pipelines`, `captioning` (numpy, Pillow and onnxruntime only): the ONNX Runtime
  pipelines, same `inference.pipeline.Pipeline` contract as the torch ones.
- `loader` (no torch unless it picks torch): `load_for_worker`, the one entry point a worker
  calls; it decides the runtime (`INFERENCE_RUNTIME`) and runs the export in its own process.

A worker that ends up on ONNX Runtime never imports torch or torchvision: that is the point of
issue 14 (a torch worker costs 500-700 MB before any model).
"""
