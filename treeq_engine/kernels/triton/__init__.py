"""The Triton backend of the kernel ops: activation quantization (act_quant.py), the plain-Triton packed GEMM
(gemm.py, every GPU and the interpreter) and the Gluon sm_90 GEMM (gluon_gemm.py), registered by backend.py.
Importing this package needs Triton; ``treeq_engine.kernels`` imports it only if Triton is installed."""
